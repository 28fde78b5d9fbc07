"""Checkpoint interop with transformers' BLIP-2 folders (the `Salesforce/blip2-*` layout, DESIGN.md section 8).

    export_stage2(model, folder)       our stage-2 model -> a `Blip2ForConditionalGeneration` folder: config.json,
                                       safetensors (sharded above `max_shard_size`), generation_config.json, and a
                                       `Blip2Processor` (image processor + the LLM tokenizer with an `<image>` token)
    export_stage1(model, folder)       our stage-1 model -> a `Blip2ForImageTextRetrieval` folder (+ processor when a
                                       BERT tokenizer is given); the ITC temperature and the Q-Former LM head have
                                       no place there and are named in the result
    load_transformers_folder(folder)   either kind of folder -> our `Blip2Stage1` / `Blip2Stage2`, loaded strictly

What the two sides do differently, and how the folders handle it:
- transformers' image encoder is EVA-style only (fused qkv with q/v biases, exact GELU, no pre-norm): a CLIP-family
  (ViT-L) or generic timm encoder cannot be exported, and `ExportError` says so.
- `ln_vision` is transformers' `vision_model.post_layernorm`, whose eps is `vision_config.layer_norm_eps`, the same
  field as the ViT's own LayerNorms. LAVIS's `ln_vision` uses 1e-5, EVA's LayerNorms 1e-6: an export keeps the ViT's
  eps (changing it would change every block) and warns that the folder's `ln_vision` runs at the ViT's eps; loading
  a folder sets our `ln_vision_eps` to the folder's eps.
- transformers 5 finds the soft prompt's slots by `image_token_index`: the exported tokenizer gets an `<image>` token
  when it has none (reusing a vocabulary entry of that name when there is one), and the processor puts
  `num_query_tokens` of them in front of each row. When the new id does not fit the LLM's embedding rows, the
  exported copy (only) gets zero rows added and `text_config.vocab_size` grows; the result's `notes` say so. A zero
  output row gives the new id a logit of 0 (OPT's and T5's heads have no bias), so transformers' `generate` could
  pick it where every real logit is negative: pass `suppress_tokens=[id]` to rule that out
  (`Blip2ForConditionalGeneration.generate` reads the language model's generation config, built from `text_config`,
  which cannot carry `suppress_tokens`).
- Flan-T5 keeps its LM head apart from its input embeddings; transformers 5's `T5Config` always says tied, so loading
  such an export (like loading Flan-T5 itself) logs transformers' "both are present ... will NOT tie them" warning and
  keeps the two tensors apart, which is right. `load_transformers_folder` ties only keys the folder leaves out.
- T5-family LLMs: the gated-FFN activation travels as `text_config.dense_act_fn` (exact "gelu" in the
  Salesforce/blip2-flan-t5-* folders, as LAVIS ran Flan-T5, not the "gelu_new" of Flan-T5's own config): an export
  copies our LLM's config; loading a folder builds the LLM from text_config, and `Blip2Stage2` records that LLM's
  activation as `llm.t5_dense_act_fn`, so saving the model as ours and loading it again keeps it.
- decoder-only LLMs: `text_config.eos_token_id` is set to our end-of-text token (`"\n"` for OPT, as in the
  Salesforce/blip2-opt-* folders), so transformers' `generate` stops where ours does; the exported tokenizer pads on
  the left (batched generation), as our `Blip2Stage2.generate` does.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from qformer.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from qformer.convert import CheckpointError, convert_state_dict
from qformer.stage2 import DTYPES

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # DESIGN.md section 6
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKEN = "<image>"
LLM_PREFIX = "language_model."
STAGE2_CLASS = "Blip2ForConditionalGeneration"
STAGE1_CLASS = "Blip2ForImageTextRetrieval"
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin")


class ExportError(ValueError):
    """A model that transformers' BLIP-2 classes cannot express (e.g. a CLIP-family image encoder)."""


@dataclass
class ExportResult:
    folder: Path
    architecture: str  # the transformers class the folder is for
    left_out: list[str] = field(default_factory=list)  # our keys with no place in that class
    notes: list[str] = field(default_factory=list)  # where the folder differs from our model, in words
    image_token_index: int | None = None


# ----------------------------------------------------------------------------------------------------------------
# Export


def export_stage2(
    model,
    folder: str | Path,
    *,
    image_size: int | None = None,
    max_shard_size: str | int = "5GB",
) -> ExportResult:
    """Write `model` (a `Blip2Stage2`) as a folder `Blip2ForConditionalGeneration.from_pretrained` loads strictly.

    image_size: the exported encoder's input size (the position embedding is resampled, bicubic, when it differs
    from the model's `cfg.vision.image_size`); the processor resizes images to it.
    The weights are the model's own tensors (no copy, whatever their dtype) assigned into a transformers model built
    on the meta device, then saved with `save_pretrained` (sharded above `max_shard_size`).
    """
    from transformers import Blip2Config as HFBlip2Config
    from transformers import Blip2ForConditionalGeneration

    from qformer.stage2 import stage2_keys, stage2_state_dict

    folder = Path(folder)
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

    config = HFBlip2Config(
        vision_config=vision_config,
        qformer_config=_hf_qformer_config(model.cfg.qformer, text=False),
        text_config=text_config.to_dict(),
        num_query_tokens=model.cfg.qformer.num_query_tokens,
        image_token_index=image_id,
    )
    hf = _assign(Blip2ForConditionalGeneration, config, state, folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(folder, max_shard_size=max_shard_size)
    _processor(tokenizer, size, model.cfg.qformer.num_query_tokens).save_pretrained(folder)
    if left_out:
        logger.warning("%s: no place in %s for: %s", folder, STAGE2_CLASS, ", ".join(left_out))
    logger.info("exported stage 2 to %s (image token id %d)%s", folder, image_id, "".join(f"; {n}" for n in notes))
    return ExportResult(folder, STAGE2_CLASS, left_out, notes, image_id)


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
    from qformer.vision import ARCHS

    if model.visual is None:
        raise ExportError(
            "this model was built without an image encoder (build_visual=False): a transformers BLIP-2 folder needs "
            "the encoder's weights; build the model with its encoder to export it"
        )
    arch = model.cfg.vision.arch
    spec = ARCHS.get(arch)
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
    return config, size


def _hf_qformer_config(cfg: QFormerConfig, *, text: bool) -> dict:
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range,
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=cfg.pad_token_id,
        cross_attention_frequency=cfg.cross_attention_freq,
        encoder_hidden_size=cfg.encoder_width,
        use_qformer_text_input=text,
    )


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


def _processor(tokenizer, size: int, num_query_tokens: int | None):
    from transformers import Blip2Processor, BlipImageProcessor
    from transformers.image_utils import PILImageResampling

    image_processor = BlipImageProcessor(
        size={"height": size, "width": size},
        resample=PILImageResampling.BICUBIC,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )
    return Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_query_tokens)


# ----------------------------------------------------------------------------------------------------------------
# Import


def load_transformers_folder(folder: str | Path, *, dtype: str | torch.dtype = "fp32", tokenizer=None):
    """A transformers BLIP-2 folder -> our `Blip2Stage2` (`Blip2ForConditionalGeneration`) or `Blip2Stage1`
    (`Blip2ForImageTextRetrieval`), every weight loaded strictly.

    dtype: the frozen image encoder's and LLM's precision ("fp32", "fp16", "bf16" or a torch dtype); the Q-Former,
    `ln_vision` and the LLM projection stay fp32. tokenizer: the LLM's tokenizer, when the folder has none.
    Stage 1: the temperature and the Q-Former LM head are not in such folders and keep their initial values.
    """
    from transformers import Blip2Config as HFBlip2Config

    folder = Path(folder)
    dtype_name = _dtype_name(dtype)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (expected a transformers BLIP-2 folder)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: missing; a transformers BLIP-2 folder has a config.json")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({err})") from err
    model_type = raw.get("model_type")
    if model_type != HFBlip2Config.model_type:
        raise CheckpointError(
            f"{config_file}: model_type is {model_type!r}, not {HFBlip2Config.model_type!r}: "
            "this is not a transformers BLIP-2 folder"
        )
    config = HFBlip2Config.from_pretrained(folder)
    stage = _stage_of(raw, config, config_file)
    if stage == 2 and config.text_config.is_encoder_decoder and dtype_name == "fp16":
        raise ValueError(f"{config_file}: T5-style models overflow in fp16; use dtype bf16 (or fp32)")
    cfg = _our_config(config, dtype_name, config_file)
    state = read_folder_weights(folder)

    from qformer.vision import build_vision_encoder

    with torch.device("meta"):  # the weights come from the folder: no random init of the (large) encoder
        visual = build_vision_encoder(cfg.vision)
    visual.to_empty(device="cpu")
    if stage == 1:
        from qformer.blip2 import Blip2Stage1, load_stage1_state

        model = Blip2Stage1(cfg, visual=visual)
        load_stage1_state(model, state, "transformers", source=str(folder), require_visual=True)
        return model.eval()

    from qformer.stage2 import Blip2Stage2, load_stage2_state

    llm = _build_llm(config.text_config, state, DTYPES[dtype_name], folder)
    if tokenizer is None:
        tokenizer = _folder_tokenizer(folder)
    model = Blip2Stage2(cfg, visual=visual, llm=llm, tokenizer=tokenizer)
    # The LLM is loaded already; its tensors go through the strict check once more (copied onto themselves).
    state.update({LLM_PREFIX + k: v for k, v in llm.state_dict().items()})
    load_stage2_state(model, state, "transformers", source=str(folder), require_visual=True)
    return model.eval()


def _dtype_name(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in DTYPES.items()}
        if dtype not in names:
            raise ValueError(f"dtype must be one of {', '.join(map(str, names))}, got {dtype}")
        return names[dtype]
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def _stage_of(raw: dict, config, config_file: Path) -> int:
    archs = raw.get("architectures") or []
    if STAGE2_CLASS in archs:
        return 2
    if STAGE1_CLASS in archs:
        return 1
    if archs:
        raise CheckpointError(
            f"{config_file}: architectures {archs} are neither {STAGE2_CLASS} (stage 2) nor {STAGE1_CLASS} (stage 1)"
        )
    return 1 if config.qformer_config.use_qformer_text_input else 2


def _vision_arch(vc, config_file: Path) -> str:
    """The entry of `qformer.vision.ARCHS` with this vision_config's shape."""
    from qformer.vision import ARCHS

    shape = (vc.hidden_size, vc.num_hidden_layers, vc.num_attention_heads, vc.intermediate_size, vc.patch_size)
    for name, spec in ARCHS.items():
        if spec.family == "eva" and (spec.width, spec.depth, spec.num_heads, spec.mlp_hidden, spec.patch_size) == shape:
            if not math.isclose(spec.norm_eps, vc.layer_norm_eps, rel_tol=1e-9):
                raise CheckpointError(
                    f"{config_file}: vision_config.layer_norm_eps {vc.layer_norm_eps:g} differs from the "
                    f"{name} encoder's LayerNorm eps {spec.norm_eps:g}"
                )
            return name
    w, d, h, m, p = shape
    raise CheckpointError(
        f"{config_file}: no image encoder in qformer.vision.ARCHS has this vision_config's shape (EVA-style, "
        f"width {w}, depth {d}, heads {h}, MLP {m}, patch {p}, LayerNorm eps {vc.layer_norm_eps:g}); add one: "
        f'ARCHS["<name>"] = ArchSpec("eva", {w}, {d}, {d}, {h}, {m}, {p}, {vc.layer_norm_eps:g}) in '
        f'qformer/vision.py and VISION_WIDTHS["<name>"] = {w} in qformer/config.py'
    )


def _our_config(config, dtype_name: str, config_file: Path) -> Blip2Config:
    vc, qc = config.vision_config, config.qformer_config
    for name, act in (("vision_config", vc.hidden_act), ("qformer_config", qc.hidden_act)):
        if act != "gelu":
            raise CheckpointError(f"{config_file}: {name}.hidden_act is {act!r}; ours is exact GELU ('gelu')")
    if not vc.qkv_bias:
        raise CheckpointError(f"{config_file}: vision_config.qkv_bias is false; EVA encoders have q/v biases")
    size = vc.image_size
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise CheckpointError(f"{config_file}: vision_config.image_size {size} is not square")
        size = size[0]
    vision = VisionConfig(arch=_vision_arch(vc, config_file), image_size=int(size), precision=dtype_name)
    qformer = QFormerConfig(
        hidden_size=qc.hidden_size,
        num_layers=qc.num_hidden_layers,
        num_heads=qc.num_attention_heads,
        intermediate_size=qc.intermediate_size,
        hidden_dropout=qc.hidden_dropout_prob,
        attention_dropout=qc.attention_probs_dropout_prob,
        layer_norm_eps=qc.layer_norm_eps,
        vocab_size=qc.vocab_size,
        max_position_embeddings=qc.max_position_embeddings,
        pad_token_id=qc.pad_token_id if qc.pad_token_id is not None else 0,
        num_query_tokens=config.num_query_tokens,
        cross_attention_freq=qc.cross_attention_frequency,
        encoder_width=vc.hidden_size,
        initializer_range=qc.initializer_range,
    )
    return Blip2Config(
        vision=vision,
        qformer=qformer,
        embed_dim=config.image_text_hidden_size,
        ln_vision_eps=vc.layer_norm_eps,  # transformers' post_layernorm = our ln_vision
        llm=LLMConfig(dtype=dtype_name),  # t5_dense_act_fn: Blip2Stage2 records the activation of the LLM built here
    )


def read_folder_weights(folder: str | Path) -> dict[str, Tensor]:
    """Every tensor of a transformers folder: sharded or single safetensors, or pytorch_model.bin (weights only)."""
    folder = Path(folder)
    index = folder / WEIGHT_FILES[0]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map'): {err}") from err
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
        state: dict[str, Tensor] = {}
        for shard, keys in shards.items():
            part = _read_safetensors(folder / shard)
            absent = sorted(set(keys) - part.keys())
            if absent:
                raise CheckpointError(f"{folder / shard}: lacks {len(absent)} key(s) {index.name} puts there: {absent}")
            state.update(part)
        return state
    single = folder / WEIGHT_FILES[1]
    if single.is_file():
        return _read_safetensors(single)
    pt = folder / WEIGHT_FILES[2]
    if pt.is_file():
        try:
            return dict(torch.load(pt, map_location="cpu", weights_only=True, mmap=True))
        except Exception as err:  # truncated zip, bad pickle: many failure types
            raise CheckpointError(f"{pt}: cannot read it ({type(err).__name__}: {err}); truncated or corrupt?") from err
    raise FileNotFoundError(f"{folder}: no weights ({' / '.join(WEIGHT_FILES)})")


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing weights file")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error type for bad headers and short files
        raise CheckpointError(
            f"{path}: cannot read it as safetensors ({type(err).__name__}: {err}); the file is truncated or corrupt"
        ) from err


def _build_llm(text_config, state: dict[str, Tensor], dtype: torch.dtype, folder: Path) -> nn.Module:
    """The folder's LLM built from its text_config, holding the `language_model.*` tensors (assigned, cast to dtype).

    Keys a tied model saves once (OPT's lm_head, T5's embed_tokens) are tied to the saved one; any other absence or
    surplus is an error. The state's LLM keys are consumed (removed from `state`).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights

    cls = AutoModelForSeq2SeqLM if text_config.is_encoder_decoder else AutoModelForCausalLM
    # No init: the parameters are replaced below; buffers computed at construction (e.g. rotary tables) stay right.
    with no_init_weights():
        llm = cls.from_config(text_config, dtype=dtype)
    llm_state = {}
    for key in [k for k in state if k.startswith(LLM_PREFIX)]:
        value = state.pop(key)
        llm_state[key[len(LLM_PREFIX) :]] = value.to(dtype) if value.is_floating_point() else value
    if not llm_state:
        raise CheckpointError(f"{folder}: no {LLM_PREFIX}* weights")
    expected = llm.state_dict()
    missing = set(expected) - llm_state.keys()
    unexpected = sorted(llm_state.keys() - expected.keys())
    misshapen = sorted(
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in llm_state.items()
        if k in expected and v.shape != expected[k].shape
    )
    tied = llm.get_expanded_tied_weights_keys(all_submodels=True)  # {target: source}
    ties = []
    for target, source in tied.items():
        if target in missing and source in llm_state:
            ties.append((target, source))
        elif source in missing and target in llm_state:
            ties.append((source, target))
    missing -= {t for t, _ in ties}
    # A key tied to a missing source that another key provides is tied through it (T5: three names share `shared`).
    for target, source in tied.items():
        if target in missing and source in {t for t, _ in ties}:
            ties.append((target, source))
            missing.discard(target)
    problems = []
    if missing:
        problems.append(f"missing: {', '.join(LLM_PREFIX + k for k in sorted(missing))}")
    if unexpected:
        problems.append(f"unexpected: {', '.join(LLM_PREFIX + k for k in unexpected)}")
    if misshapen:
        problems.append(f"shape mismatches: {'; '.join(misshapen)}")
    if problems:
        raise CheckpointError(
            f"{folder}: the language model weights do not fit its text_config:\n  " + "\n  ".join(problems)
        )
    llm.load_state_dict(llm_state, strict=False, assign=True)
    for target, source in ties:
        parent, _, name = target.rpartition(".")
        setattr(llm.get_submodule(parent), name, llm.get_parameter(source))
    return llm.requires_grad_(False).eval()


def _folder_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise FileNotFoundError(
            f"{folder}: no tokenizer files (tokenizer.json / tokenizer_config.json); stage 2 needs the LLM's "
            "tokenizer: pass tokenizer="
        )
    return AutoTokenizer.from_pretrained(folder)


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ExportError",
    "ExportResult",
    "export_stage1",
    "export_stage2",
    "load_transformers_folder",
    "read_folder_weights",
]
