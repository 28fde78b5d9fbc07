"""qformer: a BLIP-2 Q-Former research library (models, losses, conversion; no process group needed)."""

from qformer.config import QFORMER_PRESETS, QFormerConfig
from qformer.qformer import KVCache, QFormer, QFormerOutput

__all__ = ["QFORMER_PRESETS", "KVCache", "QFormer", "QFormerConfig", "QFormerOutput"]
__version__ = "0.1.0"
