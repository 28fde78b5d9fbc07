"""CapFilt run configs (`qformer capfilt CONFIG [key=value ...]`), validated like the training and eval configs."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from qformer.dtypes import DTYPES
from tasks.config import load_structured
from tasks.data.captions import DEFAULT_MAX_IMAGE_PIXELS

RANKERS = ("itc", "itm", "open_clip")


@dataclass
class CapfiltConfig:
    # Input: caption JSON files in the training format ({"image": path under image_root, "caption": str | [str]}).
    # Their entries, in order, are cut into shards of `shard_size` images: the unit of work, resume and rank split.
    ann_paths: list[str] = field(default_factory=list)
    image_root: str = ""
    shard_size: int = 1000
    # Or webdataset tar shards (brace notation: /data/laion/{00000..00999}.tar; the training loader's format: an image
    # member and a `txt` or `json` caption, see caption_from), each its own unit of work. The output is one tar per
    # input shard (shards/NNNNN.tar): the image bytes, and a `json` member with the kept captions.
    shards: str = ""
    caption_from: list[str] = field(default_factory=lambda: ["txt", "json:caption"])  # the first present wins
    output_dir: str = MISSING
    # Captioner: one of our checkpoint folders. Stage 2 (OPT / Flan-T5) is prompted with `prompt`; a stage-1
    # checkpoint captions with the Q-Former's own LM head (no prompt) and needs its tokenizer/ folder.
    captioner: str = MISSING
    prompt: str = "a photo of"
    # N captions per image by nucleus sampling (paper: N = 10, top_p 0.9).
    num_captions: int = 10
    top_p: float = 0.9
    top_k: int = 0  # 0 = off: nucleus sampling alone, as the paper
    temperature: float = 1.0
    max_new_tokens: int = 30
    min_new_tokens: int = 5
    # Ranker: "itc", a stage-1 checkpoint's image-text similarity (max over queries; `ranker_checkpoint`, or the
    # captioner when empty and it is a stage-1 model); "itm", the same checkpoint's ITM match probability (BLIP's
    # filter; a joint pass per caption, slower); "open_clip", a CLIP model through open_clip
    # (`open_clip_model` architecture name, `ranker_checkpoint` its local weights file; pip install open_clip_torch).
    ranker: str = "itc"
    ranker_checkpoint: str = ""
    open_clip_model: str = "ViT-L-14"
    keep: int = 2  # captions kept per image (paper: 2), chosen among the N synthetic and the web caption(s)
    max_words: int = 50  # captions are cleaned (LAVIS pre_caption) before ranking and in the output
    batch_size: int = 16  # images per captioning / ranking batch
    num_workers: int = 2  # image decoding processes per rank
    precision: str = "bf16"  # autocast dtype on a GPU; CPUs run fp32
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # larger images are skipped and listed; 0 = no limit
    seed: int = 0  # shard s samples from a seed mixed from (seed, s): a re-run or resumed shard repeats its captions
    report_samples: int = 24  # images shown in report.html

    def __post_init__(self) -> None:
        if bool(self.ann_paths) == bool(self.shards):
            raise ValueError("give exactly one input: ann_paths (caption JSON files) or shards (webdataset tars)")
        for source in self.caption_from:
            if source != "txt" and not source.startswith("json:"):
                raise ValueError(f"caption_from entries must be 'txt' or 'json:<field>', got {source!r}")
        if self.ranker not in RANKERS:
            raise ValueError(f"ranker must be one of {', '.join(RANKERS)}, got {self.ranker!r}")
        if self.ranker == "open_clip" and not self.ranker_checkpoint:
            raise ValueError("ranker open_clip needs ranker_checkpoint: a local open_clip weights file")
        if self.precision not in DTYPES:
            raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {self.precision!r}")
        for name in ("shard_size", "num_captions", "keep", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0 or self.max_image_pixels < 0:
            raise ValueError("num_workers and max_image_pixels must be >= 0")


def load_capfilt_config(path: str | None, overrides: list[str] = ()) -> CapfiltConfig:
    """A validated CapfiltConfig from a YAML file plus `key=value` overrides (the YAML may be None)."""
    return load_structured(lambda raw, cli: CapfiltConfig, path, overrides)
