"""Run configs: YAML validated against dataclasses (OmegaConf structured configs), with `key=value` overrides.

A run YAML names a model preset and overrides any of its fields:

    stage: stage1
    model_preset: paper            # Blip2Config.preset(...): every field below `model:` overrides it
    model:
      vision: {weights: /models/eva_vit_g.pth}
    bert: /models/bert-base-uncased
    data: {datasets: [{ann_paths: [/data/coco/train.json], image_root: /data/coco}], batch_size: 100}
    optim: {lr: 1e-4, total_steps: 250000}

An unknown key or a value of the wrong type is an error that names it, before any work starts; so is a config path
that is missing or a folder, or a file that is not valid YAML (`read_yaml`, the one YAML reader of the configs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qformer.config import Blip2Config
from tasks.data.captions import DEFAULT_MAX_IMAGE_PIXELS


@dataclass
class DatasetConfig:
    """One source of training samples: caption JSON files (+ image root), webdataset shards, or VQAv2-format
    questions + annotations (`kind: vqa`, `tasks.data.vqa_train`)."""

    # caption: JSON lists of {"image", "caption", "image_id"}; vqa: the official annotations files, one per questions
    ann_paths: list[str] = field(default_factory=list)
    image_root: str = ""
    shards: str = ""  # webdataset tar shards, brace notation: /data/laion/{00000..00999}.tar
    ratio: float = 1.0  # sampling weight when several datasets are mixed (with data.mix=sqrt: a factor on it)
    kind: str = "caption"  # caption | vqa
    questions: list[str] = field(default_factory=list)  # vqa: the official questions files, paired with ann_paths
    image_pattern: str = "COCO_train2014_{image_id:012d}.jpg"  # vqa: an image's path under image_root
    # Instruction templates, one drawn per sample (`tasks.data.instructions`; a leading <Image> is dropped). Caption
    # data with templates trains (template -> caption); vqa needs them, each with one {} for the question.
    instructions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in ("caption", "vqa"):
            raise ValueError(f"data.datasets: kind must be caption or vqa, got {self.kind!r}")
        if self.kind == "vqa":
            if self.shards or not self.ann_paths or len(self.questions) != len(self.ann_paths):
                raise ValueError(
                    "data.datasets: kind vqa needs questions and ann_paths (annotations), one for one, and no shards"
                )
            if not self.instructions:
                raise ValueError("data.datasets: kind vqa needs instructions, e.g. ['Question: {} Answer:']")
        elif self.questions:
            raise ValueError("data.datasets: questions belong to kind vqa")
        if self.shards and self.instructions:
            raise ValueError("data.datasets: instructions are for caption JSON or vqa datasets, not shards")


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = field(default_factory=list)
    batch_size: int = 100  # per GPU (per process)
    num_workers: int = 4
    max_skip_fraction: float = 0.05  # stop with an error once more bad images than this have been skipped
    min_samples_before_check: int = 1000
    max_words: int = 50
    # Images of more pixels are refused as possible decompression bombs (skipped and counted); 0 = no limit.
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    # How several JSON/vqa datasets are mixed: "ratio" (their ratios) or "sqrt" (ratio x sqrt(dataset size), as
    # InstructBLIP samples its training sets in proportion to the square root of their sizes).
    mix: str = "ratio"
    # The training images' augmentation (BLIP-2's: a random crop of 50-100% of the area, resized, and a random
    # horizontal flip). Captions that name positions ("on the left") or counts are wrong for a flipped or cropped
    # image: `hflip: false` keeps left and right, `min_scale: 1.0` keeps the whole image (a plain resize).
    min_scale: float = 0.5
    hflip: bool = True

    def __post_init__(self) -> None:
        if self.mix not in ("ratio", "sqrt"):
            raise ValueError(f"data.mix must be ratio or sqrt, got {self.mix!r}")
        if not 0.0 < self.min_scale <= 1.0:
            raise ValueError(f"data.min_scale must be in (0, 1], got {self.min_scale!r}")
        instructed = {d.kind == "vqa" or bool(d.instructions) for d in self.datasets}
        if len(instructed) > 1:  # a batch is either (instruction, target) pairs or captions, never both
            raise ValueError(
                "data.datasets: mix instruction datasets (vqa, or captions with instructions) only with "
                "each other: give the plain caption datasets instructions too"
            )


@dataclass
class OptimConfig:
    lr: float = 1e-4  # peak
    min_lr: float = 1e-5  # the cosine ends here
    warmup_lr: float = 1e-6  # the linear warmup starts here
    warmup_steps: int = 2000
    total_steps: int = 250_000
    weight_decay: float = 0.05  # not on biases, norms or 1-D parameters
    beta1: float = 0.9
    beta2: float = 0.98
    grad_accum: int = 1
    clip_grad: float = 0.0  # max gradient norm; 0 = no clipping
    # Fine-tuning with the ViT unfrozen: block i of D gets lr * layer_decay ** (D - i) (the reference's
    # `lr_layer_decay` is silently ignored; ours takes effect). 1.0 = off.
    layer_decay: float = 1.0
    vit_lr_scale: float = 1.0  # an extra factor for every ViT parameter


@dataclass
class TrainConfig:
    stage: str = "stage1"  # stage1 | stage2
    model_preset: str = "paper"
    model: Blip2Config = field(default_factory=Blip2Config)
    bert: str = ""  # BERT folder: initialises the Q-Former text side (stage 1) and gives the tokenizer
    init_from: str = ""  # stage 2: a stage-1 checkpoint folder (ours) to start the query path from
    # Fine-tuning an instruction-aware model from a plain stage-2 init_from: the stage-1 checkpoint whose Q-Former
    # text side (word/position embeddings, text FFN) the stage-2 checkpoint does not hold.
    init_text_from: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    output_dir: str = MISSING
    precision: str = "bf16"  # autocast dtype: bf16 | fp16 (with a GradScaler) | fp32
    seed: int = 42
    # torch.use_deterministic_algorithms for this process (warn-only). On 2 CPU threads a shapes-demo stage 1 drifts in
    # the 7th digit within 20 steps without it, and ends a few points of VQA away; on CUDA also set
    # CUBLAS_WORKSPACE_CONFIG=:4096:8.
    deterministic: bool = False
    save_every: int = 5000  # steps between checkpoints (and one at the end)
    keep_last: int = 3
    log_every: int = 50
    # Stop with an error after this many consecutive steps whose loss is not finite (each is skipped, and no
    # checkpoint is written on one, so the newest checkpoint predates the divergence); 0 = never stop.
    max_nonfinite_steps: int = 10
    resume: str = "auto"  # auto (newest valid checkpoint in output_dir) | none | a checkpoint folder
    vit_grad_checkpointing: bool = False
    use_image_ids: bool = False  # ITC/ITM treat every pair of the same image as positive (retrieval fine-tuning)
    # Stage 1: null leaves the learnable ITC temperature unclamped, as LAVIS's BLIP-2 (`Blip2Qformer`) does;
    # [0.001, 0.5] clamps it before every step, as LAVIS's BLIP-1 and ALBEF do.
    itc_temp_clamp: list[float] | None = None
    tensorboard: bool = True
    # The accelerator's dense peak in TFLOP/s, for the logged `mfu`; null takes it from tasks.throughput's table
    # (A100, H100, H200 bf16) on CUDA, and logs no mfu elsewhere.
    peak_tflops: float | None = None

    def __post_init__(self) -> None:
        if self.peak_tflops is not None and not 0 < self.peak_tflops < math.inf:
            raise ValueError(f"peak_tflops must be null or a positive number of TFLOP/s, got {self.peak_tflops!r}")
        if self.stage not in ("stage1", "stage2"):
            raise ValueError(f"stage must be stage1 or stage2, got {self.stage!r}")
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be bf16, fp16 or fp32, got {self.precision!r}")
        if self.optim.grad_accum < 1 or self.optim.total_steps < 1:
            raise ValueError("optim.grad_accum and optim.total_steps must be >= 1")
        clamp = self.itc_temp_clamp
        if clamp is not None and not (len(clamp) == 2 and 0 < clamp[0] < clamp[1] < math.inf):
            raise ValueError(
                "itc_temp_clamp must be null (no clamp, as BLIP-2) or [min, max] with 0 < min < max, e.g. "
                f"[0.001, 0.5] (BLIP-1), got {list(clamp)}"
            )
        if self.max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0 (0 = never stop), got {self.max_nonfinite_steps}")


class ConfigError(ValueError):
    pass


def read_yaml(path: str | Path) -> DictConfig:
    """The mapping in a YAML config file; a missing path, a folder, invalid YAML (with its line and column) or a
    top level that is not a mapping is a ConfigError naming the file."""
    if not Path(path).exists():
        raise ConfigError(f"config file not found: {path}")
    if Path(path).is_dir():
        hint = f" (did you mean {Path(path) / 'config.yaml'}?)" if (Path(path) / "config.yaml").is_file() else ""
        raise ConfigError(f"{path} is a folder, not a YAML config file{hint}")
    try:
        raw = OmegaConf.load(path)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML: {e.problem or e.context}{where}") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of config keys, got a {type(raw).__name__}")
    return raw


def load_structured(schema_of, path: str | Path | None, overrides: list[str] = ()):
    """A validated config dataclass from a YAML file plus `key=value` overrides (the YAML may be None), every
    problem a one-line `ConfigError` naming the file and key. `schema_of(raw, cli)` gives the dataclass
    class (or an instance, for defaults chosen by the config itself) to merge onto."""
    raw = read_yaml(path) if path else OmegaConf.create({})
    try:
        cli = OmegaConf.from_dotlist(list(overrides))
        merged = OmegaConf.merge(OmegaConf.structured(schema_of(raw, cli)), raw, cli)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        # OmegaConf names the key (full path) and the offending value/type; keep that, drop its traceback.
        raise ConfigError(f"{path or 'config'}: {str(e).splitlines()[0]} (key: {getattr(e, 'full_key', '?')})") from e
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{path or 'config'}: {e}") from e


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """A validated TrainConfig from a YAML file plus `key=value` overrides (the YAML may be None)."""

    def schema(raw, cli) -> TrainConfig:
        preset = cli.get("model_preset", raw.get("model_preset", "paper"))
        return TrainConfig(model=Blip2Config.preset(preset), model_preset=preset)

    return load_structured(schema, path, overrides)


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
