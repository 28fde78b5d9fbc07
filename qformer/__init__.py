"""qformer: a BLIP-2 Q-Former research library (models, losses, conversion; no process group needed)."""

from qformer.config import QFORMER_PRESETS, Blip2Config, QFormerConfig, VisionConfig
from qformer.qformer import KVCache, QFormer, QFormerOutput

__all__ = ["QFORMER_PRESETS", "Blip2Config", "KVCache", "QFormer", "QFormerConfig", "QFormerOutput", "VisionConfig"]
__version__ = "0.1.0"
