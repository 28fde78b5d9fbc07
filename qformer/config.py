"""Typed configuration for the Q-Former, with named presets, and the registry of built-in image encoders.

Every real preset has a tiny twin that runs the same code path on a CPU in seconds, so tests exercise the
real model rather than a stand-in. Invalid combinations fail at construction, naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from qformer.dtypes import DTYPES


@dataclass
class QFormerConfig:
    """Shape and regularisation of the Q-Former (DESIGN.md section 2; defaults are the paper's)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    # BERT's 30522 word pieces plus the added bos token `[DEC]` (id 30522).
    vocab_size: int = 30523
    max_position_embeddings: int = 512
    pad_token_id: int = 0
    num_query_tokens: int = 32
    # Layers with `i % cross_attention_freq == 0` cross-attend to the image (0, 2, ..., 10 by default).
    cross_attention_freq: int = 2
    # Width of the frozen image features: 1408 for EVA ViT-g/14, 1024 for CLIP ViT-L/14.
    encoder_width: int = 1408
    initializer_range: float = 0.02
    # Stage 2 keeps only the query path: no word/position embeddings, text FFNs or LM head.
    with_text: bool = True
    # How queries read the image: "direct" forms image keys/values; "absorbed" folds the key/value projections
    # into the queries (same math, about half the FLOPs for 32 queries over 257 ViT tokens); "auto" picks the
    # cheaper per call.
    cross_attention_impl: str = "auto"

    def __post_init__(self) -> None:
        positive = (
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
            "num_query_tokens",
            "cross_attention_freq",
            "encoder_width",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"QFormerConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"QFormerConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"QFormerConfig.{name} must be in [0, 1), got {value!r}")
        if self.cross_attention_impl not in ("auto", "direct", "absorbed"):
            raise ValueError(
                "QFormerConfig.cross_attention_impl must be auto, direct or absorbed, "
                f"got {self.cross_attention_impl!r}"
            )
        if self.layer_norm_eps <= 0:
            raise ValueError(f"QFormerConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"QFormerConfig.pad_token_id ({self.pad_token_id}) must be a valid id below "
                f"vocab_size ({self.vocab_size})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_freq == 0

    def replace(self, **changes) -> QFormerConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> QFormerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown QFormerConfig key(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **changes) -> QFormerConfig:
        """A named preset (see `QFORMER_PRESETS`), optionally with some fields changed."""
        if name not in QFORMER_PRESETS:
            raise KeyError(f"unknown Q-Former preset {name!r}; known: {', '.join(sorted(QFORMER_PRESETS))}")
        return dataclasses.replace(QFORMER_PRESETS[name], **changes)


_TINY = dict(
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    vocab_size=100,
    max_position_embeddings=64,
    num_query_tokens=4,
)

QFORMER_PRESETS: dict[str, QFormerConfig] = {
    # BLIP-2 with EVA-CLIP ViT-g/14 features (1408 wide).
    "paper": QFormerConfig(),
    # BLIP-2 with CLIP ViT-L/14 features (1024 wide).
    "paper_vitl": QFormerConfig(encoder_width=1024),
    # Tiny twins: the same code path, seconds on a CPU.
    "tiny": QFormerConfig(**_TINY, encoder_width=48),
    "tiny_vitl": QFormerConfig(**_TINY, encoder_width=40),
}


@dataclass(frozen=True)
class ArchSpec:
    """Shape of a built-in image encoder. `file_depth` is how many blocks its reference weight file holds."""

    family: str  # "eva" or "clip": selects the timm class and the key map
    width: int
    depth: int
    file_depth: int
    num_heads: int
    mlp_hidden: int
    patch_size: int
    norm_eps: float


# The built-in image encoders, the one registry (qformer.vision builds them; other archs are timm:<name>).
ARCHS: dict[str, ArchSpec] = {
    "eva_vit_g": ArchSpec("eva", 1408, 39, 40, 16, 6144, 14, 1e-6),
    "clip_vit_l": ArchSpec("clip", 1024, 23, 24, 16, 4096, 14, 1e-5),
    "tiny": ArchSpec("eva", 48, 2, 3, 4, 96, 14, 1e-6),
    "tiny_vitl": ArchSpec("clip", 40, 2, 3, 4, 160, 14, 1e-5),
}
# The pixel statistics both encoder families were trained with (OpenAI CLIP's; DESIGN.md section 6): every image
# transform and exported image processor normalises with them.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
PRECISIONS = tuple(DTYPES)


@dataclass
class VisionConfig:
    """The frozen image encoder (DESIGN.md section 7).

    arch: "eva_vit_g" (EVA-CLIP ViT-g/14, 39 of 40 blocks), "clip_vit_l" (CLIP ViT-L/14, 23 of 24 blocks),
    "tiny" / "tiny_vitl" (test twins of those two), or "timm:<model name>" for any other timm ViT.
    """

    arch: str = "eva_vit_g"
    image_size: int = 224
    precision: str = "fp16"  # the frozen encoder's weights and activations
    frozen: bool = True
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    weights: str | None = None  # a local file: LAVIS .pth, transformers folder/safetensors, or timm state dict
    weights_format: str = "auto"  # auto | lavis | transformers | timm
    # Shape overrides for the built-in families (0 keeps the arch's value): a small EVA- or CLIP-style ViT of your
    # own, e.g. arch "tiny" with width 96, depth 4, patch_size 8 at image_size 64.
    width_override: int = 0
    depth_override: int = 0
    heads_override: int = 0
    mlp_override: int = 0
    patch_size_override: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ARCHS and not self.arch.startswith("timm:"):
            raise ValueError(f"VisionConfig.arch {self.arch!r} is not one of {', '.join(ARCHS)} or 'timm:<model name>'")
        if self.precision not in PRECISIONS:
            raise ValueError(f"VisionConfig.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.weights_format not in ("auto", "lavis", "transformers", "timm"):
            raise ValueError(f"VisionConfig.weights_format {self.weights_format!r} is not auto/lavis/transformers/timm")
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"VisionConfig.image_size must be a positive integer, got {self.image_size!r}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"VisionConfig.drop_path_rate must be in [0, 1), got {self.drop_path_rate!r}")

    @property
    def width(self) -> int | None:
        """Token width for built-in archs; None for timm models (known once built)."""
        if self.arch not in ARCHS:
            return None
        return self.width_override or ARCHS[self.arch].width


@dataclass
class LLMConfig:
    """The frozen language model of stage 2 (DESIGN.md section 5): OPT or LLaMA/Vicuna (decoder-only) or Flan-T5
    (encoder-decoder)."""

    path: str | None = None  # a local transformers folder (config, weights, tokenizer), or a hub name you can reach
    dtype: str = "fp16"  # the frozen LLM's precision; T5 overflows in fp16, so it must be bf16 or fp32
    # Prepended to every training caption (e.g. "a photo of" for captioning fine-tuning); its tokens get no loss.
    prompt: str = ""
    max_text_length: int = 32
    # The longest training target given as `text_output` (instruction data: answer + end), in LLM tokens; None:
    # `max_text_length`. LAVIS's InstructBLIP cuts the input at 128 and the output at 256 (`max_output_txt_len`).
    max_output_length: int | None = None
    end_of_text: str = "\n"  # OPT: appended to training captions, and the token that ends generation
    # T5 pretraining: split each caption at a uniform word in [1, len/2]: the prefix goes to the encoder after the
    # soft prompt, the rest is the decoder's target. With a prompt (captioning fine-tuning) the prompt is the prefix.
    prefix_lm: bool = True
    # The share of captions given whole to the decoder, with no text prefix after the soft prompt (the rest are split
    # as above). The paper says only "prefix LM" and our default never leaves the prefix empty; a toy T5 that falls
    # back on the prefix learns the soft prompt faster when part of the captions must come from the image alone
    # (the shapes demo uses 0.5; README, "The shapes demo").
    prefix_lm_full_caption: float = 0.0
    # The gated-FFN activation (`dense_act_fn`) given to a T5-family LLM (an encoder-decoder config that has
    # `dense_act_fn`) when it is loaded; any name in transformers' ACT2FN, or None to keep the folder's own. Flan-T5's
    # own config says "gelu_new" (tanh approximation), but LAVIS and transformers' BLIP-2 conversion both ran it with
    # exact "gelu", and the published numbers come from that. Decoder-only LLMs (OPT) ignore it. Checkpoints written
    # before this field existed read as None: they ran with the folder's own activation.
    t5_dense_act_fn: str | None = "gelu"
    # InstructBLIP / BLIP-2 VQA fine-tuning: the Q-Former also reads the instruction (or question), `[queries;
    # instruction]` in its self-attention, and only the query outputs go on to the LLM. The Q-Former then keeps its
    # word/position embeddings and text FFN (no LM head). False is plain BLIP-2 stage 2 (query path only).
    qformer_instruction: bool = False
    # The longest instruction the Q-Former reads, in its (BERT) tokens, cut from the left as LAVIS's InstructBLIP
    # does (`max_txt_len` 128, tokenizer `truncation_side="left"`).
    max_instruction_length: int = 128

    @property
    def output_length(self) -> int:
        """The longest `text_output` target in LLM tokens (`max_output_length`, else `max_text_length`)."""
        return self.max_text_length if self.max_output_length is None else self.max_output_length

    def __post_init__(self) -> None:
        if self.max_instruction_length < 1:
            raise ValueError(f"LLMConfig.max_instruction_length must be >= 1, got {self.max_instruction_length}")
        if self.dtype not in PRECISIONS:
            raise ValueError(f"LLMConfig.dtype must be one of {', '.join(PRECISIONS)}, got {self.dtype!r}")
        if self.max_text_length < 2:
            raise ValueError(f"LLMConfig.max_text_length must be >= 2, got {self.max_text_length}")
        if self.max_output_length is not None and self.max_output_length < 2:
            raise ValueError(f"LLMConfig.max_output_length must be >= 2 (or None), got {self.max_output_length}")
        if not 0.0 <= self.prefix_lm_full_caption <= 1.0:
            raise ValueError(f"LLMConfig.prefix_lm_full_caption must be in [0, 1], got {self.prefix_lm_full_caption!r}")
        if self.t5_dense_act_fn is not None:
            check_activation(self.t5_dense_act_fn, "LLMConfig.t5_dense_act_fn")


def check_activation(name: str, what: str) -> None:
    """A one-line ValueError naming `name` unless it is a key of transformers' ACT2FN (what model configs name)."""
    from transformers.activations import ACT2FN  # lazy: configs are built in places that never touch an LLM

    if not isinstance(name, str) or name not in ACT2FN:
        raise ValueError(f"{what} {name!r} is not an activation transformers knows; known: {', '.join(sorted(ACT2FN))}")


@dataclass
class Blip2Config:
    """A BLIP-2 model: frozen image encoder + Q-Former + stage-1 heads."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    embed_dim: int = 256  # ITC projection width
    max_text_length: int = 32
    # LAVIS's ln_vision is torch's default LayerNorm (1e-5); transformers' `post_layernorm` takes the vision
    # config's eps (1e-6 in Salesforce/blip2-* folders). Loading a transformers folder should set 1e-6.
    ln_vision_eps: float = 1e-5
    llm: LLMConfig = field(default_factory=LLMConfig)  # stage 2 only
    # ITC's cross-rank gather: "faithful" = the reference's no-grad gather (own rank included, so image->text
    # trains only the image side and text->image only the text side); "connected" = autograd through the gather.
    itc_gather: str = "faithful"

    def __post_init__(self) -> None:
        width = self.vision.width
        if width is not None and width != self.qformer.encoder_width:
            raise ValueError(
                f"Q-Former encoder_width ({self.qformer.encoder_width}) must equal the {self.vision.arch} "
                f"token width ({width})"
            )
        if self.itc_gather not in ("faithful", "connected"):
            raise ValueError(f"Blip2Config.itc_gather must be faithful or connected, got {self.itc_gather!r}")
        if self.embed_dim < 1 or self.max_text_length < 2:
            raise ValueError("Blip2Config.embed_dim must be >= 1 and max_text_length >= 2")

    @classmethod
    def preset(cls, name: str) -> Blip2Config:
        presets = {
            "paper": (VisionConfig(), "paper"),
            "paper_vitl": (VisionConfig(arch="clip_vit_l"), "paper_vitl"),
            "tiny": (VisionConfig(arch="tiny", image_size=28, precision="fp32"), "tiny"),
            "tiny_vitl": (VisionConfig(arch="tiny_vitl", image_size=28, precision="fp32"), "tiny_vitl"),
        }
        if name not in presets:
            raise KeyError(f"unknown BLIP-2 preset {name!r}; known: {', '.join(sorted(presets))}")
        vision, qformer = presets[name]
        embed = 16 if name.startswith("tiny") else 256
        return cls(vision=vision, qformer=QFormerConfig.preset(qformer), embed_dim=embed)


__all__ = [
    "QFormerConfig",
    "QFORMER_PRESETS",
    "VisionConfig",
    "LLMConfig",
    "Blip2Config",
    "ARCHS",
    "ArchSpec",
    "CLIP_MEAN",
    "CLIP_STD",
    "check_activation",
]
