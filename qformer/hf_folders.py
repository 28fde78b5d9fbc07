"""Checkpoint interop with transformers' BLIP-2 folders (the `Salesforce/blip2-*` layout, DESIGN.md section 8).

    export_stage2(model, folder)       our stage-2 model -> a `Blip2ForConditionalGeneration` folder: config.json,
                                       safetensors (sharded above `max_shard_size`), generation_config.json, and a
                                       `Blip2Processor` (image processor + the LLM tokenizer with an `<image>` token)
    export_stage1(model, folder)       our stage-1 model -> a `Blip2ForImageTextRetrieval` folder (+ processor when a
                                       BERT tokenizer is given); the ITC temperature and the Q-Former LM head have
                                       no place there and are named in the result
    load_transformers_folder(folder)   either kind of folder -> our `Blip2Stage1` / `Blip2Stage2`, loaded strictly;
                                       an `InstructBlipForConditionalGeneration` folder (`Salesforce/instructblip-*`)
                                       -> an instruction-aware `Blip2Stage2` (`llm.qformer_instruction`) with the
                                       processor's `qformer_tokenizer/` as its Q-Former tokenizer

This module reads folders; the writing side lives in `qformer.hf_export` (its names are re-exported here).

What the two sides do differently, and how the folders handle it:
- transformers' image encoder is EVA-style only (fused qkv with q/v biases, exact GELU, no pre-norm): a CLIP-family
  (ViT-L) or generic timm encoder cannot be exported, and `ExportError` says so.
- an EVA-family encoder with shape overrides (VisionConfig's `*_override` fields) is exported with its own shape
  (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, patch_size) and the arch it was built
  from as `vision_config.qformer_arch` (transformers keeps the extra key), so loading the folder rebuilds that arch
  with the same overrides. A folder without that key must match an ARCHS entry's shape exactly.
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

import json
import logging
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from qformer.config import ARCHS, CLIP_MEAN, CLIP_STD, Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from qformer.convert import CheckpointError, check_state_dict
from qformer.dtypes import dtype_name, to_dtype
from qformer.hf_export import (
    ARCH_KEY,
    LLM_PREFIX,
    QFORMER_CONFIG_FIELDS,
    STAGE1_CLASS,
    STAGE2_CLASS,
    ExportError,
    ExportResult,
    arch_shape,
    export_stage1,
    export_stage2,
)
from qformer.tensor_files import read_state_dict

logger = logging.getLogger(__name__)


def load_transformers_folder(folder: str | Path, *, dtype: str | torch.dtype = "fp32", tokenizer=None):
    """A transformers BLIP-2 folder -> our `Blip2Stage2` (`Blip2ForConditionalGeneration`) or `Blip2Stage1`
    (`Blip2ForImageTextRetrieval`), every weight loaded strictly.

    dtype: the frozen image encoder's and LLM's precision ("fp32", "fp16", "bf16" or a torch dtype); the Q-Former,
    `ln_vision` and the LLM projection stay fp32. tokenizer: the LLM's tokenizer, when the folder has none.
    Stage 1: the temperature and the Q-Former LM head are not in such folders and keep their initial values.
    """
    from transformers import Blip2Config as HFBlip2Config
    from transformers import InstructBlipConfig

    folder = Path(folder)
    precision = dtype_name(dtype)
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
    if model_type not in (HFBlip2Config.model_type, InstructBlipConfig.model_type):
        raise CheckpointError(
            f"{config_file}: model_type is {model_type!r}, not {HFBlip2Config.model_type!r} or "
            f"{InstructBlipConfig.model_type!r}: this is not a transformers BLIP-2 or InstructBLIP folder"
        )
    instruct = model_type == InstructBlipConfig.model_type
    config = (InstructBlipConfig if instruct else HFBlip2Config).from_pretrained(folder)
    stage = 2 if instruct else _stage_of(raw, config, config_file)
    if stage == 2 and config.text_config.is_encoder_decoder and precision == "fp16":
        raise ValueError(f"{config_file}: T5-style models overflow in fp16; use dtype bf16 (or fp32)")
    cfg = _our_config(config, precision, config_file)
    state = read_state_dict(folder)

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

    llm = _build_llm(config.text_config, state, to_dtype(precision), folder)
    if tokenizer is None:
        tokenizer = _folder_tokenizer(folder)
    qformer_tokenizer = None
    if instruct:
        cfg = _instruct_llm_config(cfg, config.text_config, tokenizer)
        qformer_tokenizer = _folder_tokenizer(folder / "qformer_tokenizer", what="the Q-Former's (BERT)")
    model = Blip2Stage2(cfg, visual=visual, llm=llm, tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer)
    # The LLM is loaded already; its tensors go through the strict check once more (copied onto themselves).
    state.update({LLM_PREFIX + k: v for k, v in llm.state_dict().items()})
    load_stage2_state(model, state, "transformers", source=str(folder), require_visual=True)
    return model.eval()


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


# ArchSpec field -> the VisionConfig field that overrides it (the shape vision_config holds).
_OVERRIDES = (
    ("width", "width_override"),
    ("depth", "depth_override"),
    ("num_heads", "heads_override"),
    ("mlp_hidden", "mlp_override"),
    ("patch_size", "patch_size_override"),
)


def _vision_arch(vc, config_file: Path) -> tuple[str, dict[str, int]]:
    """The entry of `qformer.config.ARCHS` for this vision_config, and the VisionConfig shape overrides it needs.

    A folder we exported from an encoder with shape overrides names its arch (`ARCH_KEY`); any other folder must
    have the exact shape of an EVA-family entry.
    """
    shape = (vc.hidden_size, vc.num_hidden_layers, vc.num_attention_heads, vc.intermediate_size, vc.patch_size)
    named = getattr(vc, ARCH_KEY, None)
    if named is not None:
        spec = ARCHS.get(named)
        if spec is None or spec.family != "eva":
            eva = [n for n, s in ARCHS.items() if s.family == "eva"]
            raise CheckpointError(
                f"{config_file}: vision_config.{ARCH_KEY} {named!r} is not an EVA-family encoder of "
                f"qformer.config.ARCHS ({', '.join(eva)})"
            )
        candidates = {named: spec}
    else:
        candidates = {n: s for n, s in ARCHS.items() if s.family == "eva" and arch_shape(s) == shape}
    for name, spec in candidates.items():
        if not math.isclose(spec.norm_eps, vc.layer_norm_eps, rel_tol=1e-9):
            raise CheckpointError(
                f"{config_file}: vision_config.layer_norm_eps {vc.layer_norm_eps:g} differs from the "
                f"{name} encoder's LayerNorm eps {spec.norm_eps:g}"
            )
        overrides = {
            field: value for (attr, field), value in zip(_OVERRIDES, shape, strict=True) if getattr(spec, attr) != value
        }
        return name, overrides
    w, d, h, m, p = shape
    raise CheckpointError(
        f"{config_file}: no image encoder in qformer.config.ARCHS has this vision_config's shape (EVA-style, "
        f"width {w}, depth {d}, heads {h}, MLP {m}, patch {p}, LayerNorm eps {vc.layer_norm_eps:g}); add one: "
        f'ARCHS["<name>"] = ArchSpec("eva", {w}, {d}, {d}, {h}, {m}, {p}, {vc.layer_norm_eps:g}) in '
        f"qformer/config.py, or name an EVA-family entry as vision_config.{ARCH_KEY} to build it with that shape"
    )


def _our_config(config, precision: str, config_file: Path) -> Blip2Config:
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
    arch, overrides = _vision_arch(vc, config_file)
    vision = VisionConfig(arch=arch, image_size=int(size), precision=precision, **overrides)
    fields = {ours: getattr(qc, theirs) for ours, theirs in QFORMER_CONFIG_FIELDS}
    fields.update(
        pad_token_id=qc.pad_token_id if qc.pad_token_id is not None else 0,
        num_query_tokens=config.num_query_tokens,
        encoder_width=vc.hidden_size,  # the width of the encoder built from vision_config
    )
    qformer = QFormerConfig(**fields)
    return Blip2Config(
        vision=vision,
        qformer=qformer,
        embed_dim=getattr(config, "image_text_hidden_size", 256),  # InstructBLIP has no stage-1 heads
        ln_vision_eps=vc.layer_norm_eps,  # transformers' post_layernorm = our ln_vision
        llm=LLMConfig(dtype=precision),  # t5_dense_act_fn: Blip2Stage2 records the activation of the LLM built here
    )


def _instruct_llm_config(cfg: Blip2Config, text_config, tokenizer) -> Blip2Config:
    """An InstructBLIP folder's model reads instructions; a decoder-only LLM (Vicuna) ends on its eos token, the one
    transformers' `generate` stops at (LAVIS's Vicuna appends `eos_token` to its training targets)."""
    import dataclasses

    llm = dataclasses.replace(cfg.llm, qformer_instruction=True)
    if not text_config.is_encoder_decoder:
        from qformer.instruct import default_pad_token

        default_pad_token(tokenizer)  # batched prompts are padded (LAVIS adds `[PAD]` to Vicuna's)
        eos = text_config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        llm = dataclasses.replace(llm, end_of_text=tokenizer.convert_ids_to_tokens(eos))
    return dataclasses.replace(cfg, llm=llm)


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
    missing = set(llm.state_dict()) - llm_state.keys()
    tied = llm.get_expanded_tied_weights_keys(all_submodels=True)  # {target: source}
    ties = []
    for target, source in tied.items():
        if target in missing and source in llm_state:
            ties.append((target, source))
        elif source in missing and target in llm_state:
            ties.append((source, target))
    # A key tied to a missing source that another key provides is tied through it (T5: three names share `shared`).
    for target, source in tied.items():
        if target in missing and source in {t for t, _ in ties}:
            ties.append((target, source))
    check_state_dict(llm, llm_state, source=f"{folder} ({LLM_PREFIX}*)", allowed_missing=[t for t, _ in ties])
    llm.load_state_dict(llm_state, strict=False, assign=True)
    for target, source in ties:
        parent, _, name = target.rpartition(".")
        setattr(llm.get_submodule(parent), name, llm.get_parameter(source))
    return llm.requires_grad_(False).eval()


def _folder_tokenizer(folder: Path, what: str = "the LLM's"):
    from transformers import AutoTokenizer

    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise FileNotFoundError(
            f"{folder}: no tokenizer files (tokenizer.json / tokenizer_config.json); stage 2 needs {what} "
            "tokenizer" + (": pass tokenizer=" if what == "the LLM's" else "")
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
]
