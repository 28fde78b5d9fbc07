"""Writing our models as transformers BLIP-2 folders (the `Salesforce/blip2-*` layout, DESIGN.md section 8).

    export_stage2(model, folder)   our stage-2 model -> a `Blip2ForConditionalGeneration` folder: config.json,
                                   safetensors (sharded above `max_shard_size`), generation_config.json, and a
                                   `Blip2Processor` (image processor + the LLM tokenizer with an `<image>` token)
    export_stage1(model, folder)   our stage-1 model -> a `Blip2ForImageTextRetrieval` folder (+ processor when a
                                   BERT tokenizer is given); the ITC temperature and the Q-Former LM head have no
                                   place there and are named in the result

The folder layout's names below are shared with the reading side, `qformer.hf_folders`, whose docstring says what
the two sides do differently and how the folders handle it.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from qformer.config import ARCHS, CLIP_MEAN, CLIP_STD, ArchSpec, QFormerConfig
from qformer.convert import convert_state_dict

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
LLM_PREFIX = "language_model."
STAGE2_CLASS = "Blip2ForConditionalGeneration"
STAGE1_CLASS = "Blip2ForImageTextRetrieval"
INSTRUCT_CLASS = "InstructBlipForConditionalGeneration"  # an instruction-aware stage 2 (`llm.qformer_instruction`)
# vision_config key naming the qformer.config.ARCHS entry an encoder with shape overrides was built from.
ARCH_KEY = "qformer_arch"
# QFormerConfig field -> transformers' Blip2QFormerConfig field: one table for export and import.
QFORMER_CONFIG_FIELDS = (
    ("vocab_size", "vocab_size"),
    ("hidden_size", "hidden_size"),
    ("num_layers", "num_hidden_layers"),
    ("num_heads", "num_attention_heads"),
    ("intermediate_size", "intermediate_size"),
    ("hidden_dropout", "hidden_dropout_prob"),
    ("attention_dropout", "attention_probs_dropout_prob"),
    ("max_position_embeddings", "max_position_embeddings"),
    ("initializer_range", "initializer_range"),
    ("layer_norm_eps", "layer_norm_eps"),
    ("pad_token_id", "pad_token_id"),
    ("cross_attention_freq", "cross_attention_frequency"),
    ("encoder_width", "encoder_hidden_size"),
)


class ExportError(ValueError):
    """A model that transformers' BLIP-2 classes cannot express (e.g. a CLIP-family image encoder)."""


@dataclass
class ExportResult:
    folder: Path
    architecture: str  # the transformers class the folder is for
    left_out: list[str] = field(default_factory=list)  # our keys with no place in that class
    notes: list[str] = field(default_factory=list)  # where the folder differs from our model, in words
    image_token_index: int | None = None


def export_stage2(
    model,
    folder: str | Path,
    *,
    image_size: int | None = None,
    max_shard_size: str | int = "5GB",
) -> ExportResult:
    """Write `model` (a `Blip2Stage2`) as a folder `Blip2ForConditionalGeneration.from_pretrained` loads strictly;
    an instruction-aware model as an `InstructBlipForConditionalGeneration` folder, its processor carrying the
    Q-Former tokenizer (`qformer_tokenizer/`, truncating on the left as the model does).

    image_size: the exported encoder's input size (the position embedding is resampled, bicubic, when it differs
    from the model's `cfg.vision.image_size`); the processor resizes images to it.
    The weights are the model's own tensors (no copy, whatever their dtype) assigned into a transformers model built
    on the meta device, then saved with `save_pretrained` (sharded above `max_shard_size`).
    """
    from transformers import Blip2Config as HFBlip2Config
    from transformers import Blip2ForConditionalGeneration, InstructBlipConfig, InstructBlipForConditionalGeneration

    from qformer.stage2 import stage2_keys, stage2_state_dict

    folder = Path(folder)
    instruct = getattr(model, "instruct", False)
    qformer_tokenizer = None
    if instruct:
        if model.qformer_tokenizer is None:
            raise ExportError("an InstructBLIP folder's processor needs the Q-Former tokenizer: the model has none")
        qformer_tokenizer = copy.deepcopy(model.qformer_tokenizer)
        qformer_tokenizer.truncation_side = "left"
        qformer_tokenizer.init_kwargs["truncation_side"] = "left"  # saved with the tokenizer
    notes: list[str] = []
    vision_config, size = _hf_vision_config(model, image_size, notes)
    tokenizer = copy.deepcopy(model.tokenizer)  # the model's own tokenizer stays as it was
    image_id = _ensure_image_token(tokenizer)
    if not model.is_encoder_decoder:
        tokenizer.padding_side = "left"
        tokenizer.init_kwargs["padding_side"] = "left"  # saved with the tokenizer

    state = stage2_state_dict(model, "transformers")
    left_out = convert_state_dict(_own_state(model), "ours", "transformers", stage2_keys(model)).dropped
    _resample_exported_pos_embed(model, state, size, notes)
    text_config = copy.deepcopy(model.llm.config)
    _fit_image_token(model.llm, state, text_config, image_id, notes)
    if not model.is_encoder_decoder:
        # Generation ends at our end-of-text token ("\n" for OPT), as in the Salesforce/blip2-opt-* folders.
        text_config.eos_token_id = model.end_token_id

    qformer_config = _hf_qformer_config(model.cfg.qformer, text=instruct)
    if instruct:
        qformer_config.pop("use_qformer_text_input")  # InstructBLIP's Q-Former always reads text
    config = (InstructBlipConfig if instruct else HFBlip2Config)(
        vision_config=vision_config,
        qformer_config=qformer_config,
        text_config=text_config.to_dict(),
        num_query_tokens=model.cfg.qformer.num_query_tokens,
        image_token_index=image_id,
    )
    cls = InstructBlipForConditionalGeneration if instruct else Blip2ForConditionalGeneration
    hf = _assign(cls, config, state, folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(folder, max_shard_size=max_shard_size)
    _processor(tokenizer, size, model.cfg.qformer.num_query_tokens, qformer_tokenizer).save_pretrained(folder)
    if left_out:
        logger.warning("%s: no place in %s for: %s", folder, cls.__name__, ", ".join(left_out))
    logger.info("exported stage 2 to %s (image token id %d)%s", folder, image_id, "".join(f"; {n}" for n in notes))
    return ExportResult(folder, cls.__name__, left_out, notes, image_id)


def export_stage1(
    model,
    folder: str | Path,
    *,
    tokenizer=None,
    image_size: int | None = None,
    max_shard_size: str | int = "5GB",
) -> ExportResult:
    """Write `model` (a `Blip2Stage1`) as a folder `Blip2ForImageTextRetrieval.from_pretrained` loads strictly.

    tokenizer: the Q-Former's BERT tokenizer; when given, a `Blip2Processor` (image processor + tokenizer, no image
    tokens: `image_token_index` stays unset, as the retrieval class expects plain text ids) is saved too.
    transformers keeps no ITC temperature and no Q-Former LM head: they are left out, logged and returned.
    """
    from transformers import Blip2Config as HFBlip2Config
    from transformers import Blip2ForImageTextRetrieval

    from qformer.blip2 import STAGE1_KEYS, stage1_state_dict

    folder = Path(folder)
    notes: list[str] = []
    vision_config, size = _hf_vision_config(model, image_size, notes)
    state = stage1_state_dict(model, "transformers")
    left_out = convert_state_dict(_own_state(model), "ours", "transformers", STAGE1_KEYS).dropped
    _resample_exported_pos_embed(model, state, size, notes)
    config = HFBlip2Config(
        vision_config=vision_config,
        qformer_config=_hf_qformer_config(model.cfg.qformer, text=True),
        num_query_tokens=model.cfg.qformer.num_query_tokens,
        image_text_hidden_size=model.cfg.embed_dim,
    )
    hf = _assign(Blip2ForImageTextRetrieval, config, state, folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(folder, max_shard_size=max_shard_size)
    if tokenizer is not None:
        _processor(copy.deepcopy(tokenizer), size, None).save_pretrained(folder)
    if left_out:
        logger.warning("%s: %s has no place for %s: they are not exported", folder, STAGE1_CLASS, ", ".join(left_out))
    return ExportResult(folder, STAGE1_CLASS, left_out, notes, None)


def _own_state(model) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith(("visual.", "llm."))}


def _vision_spec(model):
    """The `ArchSpec` of the model's image encoder; `ExportError` unless transformers can express it."""
    if model.visual is None:
        raise ExportError(
            "this model was built without an image encoder (build_visual=False): a transformers BLIP-2 folder needs "
            "the encoder's weights; build the model with its encoder to export it"
        )
    from qformer.vision import arch_spec

    arch = model.cfg.vision.arch
    # The shape the encoder was built with: the arch's own, with the config's shape overrides applied.
    spec = arch_spec(model.cfg.vision)
    family = spec.family if spec else getattr(model.visual, "family", "generic")
    if spec is None or family != "eva":
        raise ExportError(
            f"the {arch!r} image encoder ({family} family) cannot be expressed as transformers' Blip2VisionModel, "
            "which is EVA-style only (fused qkv with q/v biases and no k bias, exact GELU, no pre-norm); "
            "only EVA-family encoders (eva_vit_g, tiny) can be exported"
        )
    return spec


def _hf_vision_config(model, image_size: int | None, notes: list[str]) -> tuple[dict, int]:
    spec = _vision_spec(model)
    size = image_size or model.cfg.vision.image_size
    if size % spec.patch_size:
        raise ExportError(f"image_size {size} is not a multiple of the patch size {spec.patch_size}")
    ln_eps = model.ln_vision.eps
    if not math.isclose(ln_eps, spec.norm_eps, rel_tol=1e-9):
        note = (
            f"ln_vision eps {ln_eps:g} differs from the ViT's LayerNorm eps {spec.norm_eps:g}: transformers' "
            f"post_layernorm (our ln_vision) uses vision_config.layer_norm_eps, which is kept at {spec.norm_eps:g} "
            "for the ViT's own LayerNorms, so the exported ln_vision runs at that eps"
        )
        logger.warning(note)
        notes.append(note)
    config = dict(
        hidden_size=spec.width,
        intermediate_size=spec.mlp_hidden,
        num_hidden_layers=model.visual.depth,
        num_attention_heads=spec.num_heads,
        image_size=size,
        patch_size=spec.patch_size,
        hidden_act="gelu",
        layer_norm_eps=spec.norm_eps,
        qkv_bias=True,
    )
    if arch_shape(spec) != arch_shape(ARCHS[model.cfg.vision.arch]):
        # A shape of the user's own (VisionConfig's *_override fields): transformers keeps this extra key, and our
        # loader reads it to rebuild the encoder as that arch with the folder's shape.
        config[ARCH_KEY] = model.cfg.vision.arch
    return config, size


def arch_shape(spec: ArchSpec) -> tuple[int, int, int, int, int]:
    """What vision_config holds of an encoder's shape: width, depth, heads, MLP width, patch size."""
    return spec.width, spec.depth, spec.num_heads, spec.mlp_hidden, spec.patch_size


def _hf_qformer_config(cfg: QFormerConfig, *, text: bool) -> dict:
    fields = {theirs: getattr(cfg, ours) for ours, theirs in QFORMER_CONFIG_FIELDS}
    return fields | dict(hidden_act="gelu", use_qformer_text_input=text)


def _resample_exported_pos_embed(model, state: dict[str, Tensor], size: int, notes: list[str]) -> None:
    if size == model.cfg.vision.image_size:
        return
    from timm.layers import resample_abs_pos_embed

    key = "vision_model.embeddings.position_embedding"
    grid = size // model.visual.model.patch_embed.patch_size[0]
    old = model.visual.model.patch_embed.grid_size
    pos = state[key]
    # transformers interpolates with align_corners=False, without antialiasing.
    state[key] = resample_abs_pos_embed(
        pos.float(), new_size=[grid, grid], old_size=list(old), num_prefix_tokens=1, antialias=False
    ).to(pos.dtype)
    note = f"position embedding resampled from {old[0]}x{old[1]} to {grid}x{grid} patches ({size} px)"
    logger.info(note)
    notes.append(note)


def _ensure_image_token(tokenizer) -> int:
    """Add `<image>` as a special added token unless the tokenizer already has it; returns its id."""
    from tokenizers import AddedToken

    if IMAGE_TOKEN not in tokenizer.get_added_vocab():
        # A vocabulary entry of that name (if any) keeps its id; otherwise the token gets the next free id.
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    ids = tokenizer(IMAGE_TOKEN * 2, add_special_tokens=False).input_ids
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if ids != [image_id, image_id]:
        raise ExportError(f"the tokenizer splits {IMAGE_TOKEN!r} into {ids}: it must be one token")
    return image_id


def _fit_image_token(llm: nn.Module, state: dict[str, Tensor], text_config, image_id: int, notes: list[str]):
    """Grow the exported LLM's embedding rows (zeros) when `image_id` does not fit; returns the new ids."""
    rows = llm.get_input_embeddings().weight.shape[0]
    if image_id < rows:
        return []
    new_rows = image_id + 1
    names = {m: n for n, m in llm.named_modules()}
    keys = [LLM_PREFIX + names[llm.get_input_embeddings()] + ".weight"]
    out = llm.get_output_embeddings()
    if out is not None:
        keys.append(LLM_PREFIX + names[out] + ".weight")
        if getattr(out, "bias", None) is not None:
            keys.append(LLM_PREFIX + names[out] + ".bias")
    padded: dict[int, Tensor] = {}  # by storage, so tied tensors stay one tensor
    for key, value in list(state.items()):
        if key.startswith(LLM_PREFIX) and value.dim() >= 1 and value.shape[0] == rows:
            ptr = value.data_ptr()
            if key in keys or ptr in padded:
                if ptr not in padded:
                    extra = value.new_zeros((new_rows - rows, *value.shape[1:]))
                    padded[ptr] = torch.cat([value, extra])
                state[key] = padded[ptr]
    text_config.vocab_size = new_rows
    new_ids = list(range(rows, new_rows))
    note = (
        f"the {IMAGE_TOKEN} token id {image_id} does not fit the LLM's {rows} embedding rows: the exported copy has "
        f"{new_rows} (new rows zero, text_config.vocab_size {new_rows}); pass suppress_tokens={new_ids} to "
        "transformers' generate to keep it from ever picking them"
    )
    logger.warning(note)
    notes.append(note)
    return new_ids


def _assign(cls, config, state: dict[str, Tensor], folder: Path):
    """A transformers model of `cls` holding exactly `state` (assigned, not copied); strict."""
    with torch.device("meta"):
        hf = cls(config)
    try:
        hf.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ExportError(f"{folder}: our weights do not fit transformers' {cls.__name__}: {err}") from err
    # Non-persistent buffers (e.g. position_ids) stay on the meta device: they are not saved, and rebuilt on load.
    meta = [n for n, t in hf.state_dict().items() if t.is_meta]
    if meta:
        raise ExportError(f"{folder}: {cls.__name__} tensors left without a value: {', '.join(meta)}")
    return hf.eval()


def _processor(tokenizer, size: int, num_query_tokens: int | None, qformer_tokenizer=None):
    from transformers import Blip2Processor, BlipImageProcessor, InstructBlipProcessor
    from transformers.image_utils import PILImageResampling

    image_processor = BlipImageProcessor(
        size={"height": size, "width": size},
        resample=PILImageResampling.BICUBIC,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )
    if qformer_tokenizer is not None:
        return InstructBlipProcessor(image_processor, tokenizer, qformer_tokenizer, num_query_tokens=num_query_tokens)
    return Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_query_tokens)


__all__ = [
    "ARCH_KEY",
    "LLM_PREFIX",
    "QFORMER_CONFIG_FIELDS",
    "INSTRUCT_CLASS",
    "STAGE1_CLASS",
    "STAGE2_CLASS",
    "ExportError",
    "ExportResult",
    "arch_shape",
    "export_stage1",
    "export_stage2",
]
