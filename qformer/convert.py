"""Checkpoint key maps between our Q-Former, LAVIS and transformers, and strict loading.

Maps are declarative: one row per module, `{i}` standing for a layer index; a key is the module name plus
its parameter suffix (`.weight`, `.bias`, or none for a bare parameter). `None` means the format has no such
module. Converting names every key it drops, and loading checks every key and shape before touching the
model, listing all problems at once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

FORMATS = ("ours", "lavis", "transformers")

_L = "layers.{i}"
_LAVIS_L = "Qformer.bert.encoder.layer.{i}"
_HF_L = "qformer.encoder.layer.{i}"

# (ours, LAVIS, transformers `Blip2ForImageTextRetrieval` / `Blip2ForConditionalGeneration`)
QFORMER_KEY_MAP: tuple[tuple[str, str | None, str | None], ...] = (
    ("qformer.query_tokens", "query_tokens", "query_tokens"),
    ("qformer.embeddings.word", "Qformer.bert.embeddings.word_embeddings", "embeddings.word_embeddings"),
    ("qformer.embeddings.position", "Qformer.bert.embeddings.position_embeddings", "embeddings.position_embeddings"),
    ("qformer.embeddings.norm", "Qformer.bert.embeddings.LayerNorm", "qformer.layernorm"),
    *(
        (f"qformer.{_L}.{ours}.{a}", f"{_LAVIS_L}.{lavis}.{b}", f"{_HF_L}.{hf}.{c}")
        for ours, lavis, hf in (
            ("self_attn", "attention", "attention"),
            ("cross_attn", "crossattention", "crossattention"),
        )
        for a, b, c in (
            ("q", "self.query", "attention.query"),
            ("k", "self.key", "attention.key"),
            ("v", "self.value", "attention.value"),
            ("out", "output.dense", "output.dense"),
            ("norm", "output.LayerNorm", "output.LayerNorm"),
        )
    ),
    (f"qformer.{_L}.ffn_query.fc1", f"{_LAVIS_L}.intermediate_query.dense", f"{_HF_L}.intermediate_query.dense"),
    (f"qformer.{_L}.ffn_query.fc2", f"{_LAVIS_L}.output_query.dense", f"{_HF_L}.output_query.dense"),
    (f"qformer.{_L}.ffn_query.norm", f"{_LAVIS_L}.output_query.LayerNorm", f"{_HF_L}.output_query.LayerNorm"),
    (f"qformer.{_L}.ffn_text.fc1", f"{_LAVIS_L}.intermediate.dense", f"{_HF_L}.intermediate.dense"),
    (f"qformer.{_L}.ffn_text.fc2", f"{_LAVIS_L}.output.dense", f"{_HF_L}.output.dense"),
    (f"qformer.{_L}.ffn_text.norm", f"{_LAVIS_L}.output.LayerNorm", f"{_HF_L}.output.LayerNorm"),
    # transformers' BLIP-2 classes have no Q-Former LM head.
    ("qformer.lm_head.dense", "Qformer.cls.predictions.transform.dense", None),
    ("qformer.lm_head.norm", "Qformer.cls.predictions.transform.LayerNorm", None),
    ("qformer.lm_head.bias", "Qformer.cls.predictions.bias", None),
)

# LAVIS stores tied or derived tensors under extra names: on import they are checked and dropped, on export
# written. Each maps the extra key to the LAVIS key it must equal.
LAVIS_TIED = {
    "Qformer.cls.predictions.decoder.weight": "Qformer.bert.embeddings.word_embeddings.weight",
    "Qformer.cls.predictions.decoder.bias": "Qformer.cls.predictions.bias",
}
# Buffers that LAVIS files carry but that hold no learned state.
LAVIS_IGNORED = ("Qformer.bert.embeddings.position_ids",)


@dataclass
class KeyMap:
    """Rows of equivalent module names across formats, compiled for renaming."""

    rows: tuple[tuple[str | None, ...], ...]
    formats: tuple[str, ...] = FORMATS
    _patterns: dict = field(default_factory=dict, repr=False)

    def _compiled(self, fmt: str) -> list[tuple[re.Pattern, int]]:
        if fmt not in self._patterns:
            col = self._column(fmt)
            compiled = []
            for r, row in enumerate(self.rows):
                if row[col] is None:
                    continue
                body = re.escape(row[col]).replace(re.escape("{i}"), r"(?P<i>\d+)")
                compiled.append((re.compile(rf"^{body}(?P<suffix>(\.weight|\.bias)?)$"), r))
            self._patterns[fmt] = compiled
        return self._patterns[fmt]

    def _column(self, fmt: str) -> int:
        if fmt not in self.formats:
            raise ValueError(f"unknown checkpoint format {fmt!r}; known: {', '.join(self.formats)}")
        return self.formats.index(fmt)

    def rename(self, key: str, src: str, dst: str) -> tuple[str | None, bool]:
        """(new key, matched): new key None when `dst` has no such module; matched False for an unknown key."""
        dst_col = self._column(dst)
        for pattern, r in self._compiled(src):
            m = pattern.match(key)
            if m:
                target = self.rows[r][dst_col]
                if target is None:
                    return None, True
                if m.groupdict().get("i") is not None:
                    target = target.replace("{i}", m.group("i"))
                return target + m.group("suffix"), True
        return None, False

    def __add__(self, other: KeyMap) -> KeyMap:
        return KeyMap(self.rows + other.rows, self.formats)


QFORMER_KEYS = KeyMap(QFORMER_KEY_MAP)

# The instruction-aware Q-Former (InstructBLIP): transformers' `InstructBlipForConditionalGeneration` keeps the
# text embeddings and their LayerNorm inside `qformer.embeddings` (BLIP-2's classes: `embeddings.*` at the top and
# `qformer.layernorm`); the layers are named as in BLIP-2. Neither LAVIS's InstructBLIP (`Qformer.cls = None`) nor
# transformers has a Q-Former LM head. The LAVIS column is stage 1's.
_INSTRUCT_EMBEDDINGS = {
    "qformer.embeddings.word": "qformer.embeddings.word_embeddings",
    "qformer.embeddings.position": "qformer.embeddings.position_embeddings",
    "qformer.embeddings.norm": "qformer.embeddings.layernorm",
}
INSTRUCT_QFORMER_KEY_MAP: tuple[tuple[str, str | None, str | None], ...] = tuple(
    (ours, lavis, _INSTRUCT_EMBEDDINGS.get(ours, hf))
    for ours, lavis, hf in QFORMER_KEY_MAP
    if not ours.startswith("qformer.lm_head.")
)
INSTRUCT_QFORMER_KEYS = KeyMap(INSTRUCT_QFORMER_KEY_MAP)


@dataclass
class Converted:
    state: dict[str, Tensor]
    dropped: list[str]  # keys the target format has no place for
    unknown: list[str]  # keys no row of the map knows


def convert_state_dict(state: Mapping[str, Tensor], src: str, dst: str, key_map: KeyMap = QFORMER_KEYS) -> Converted:
    """Rename every key of `state` from format `src` to `dst`; report what was dropped and what was unknown."""
    key_map._column(src), key_map._column(dst)  # an unknown format is an error even for an empty state
    out: dict[str, Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    items = dict(state)
    if src == "lavis":
        items = _absorb_lavis_extras(items)
    for key, value in items.items():
        new, matched = key_map.rename(key, src, dst)
        if not matched:
            unknown.append(key)
        elif new is None:
            dropped.append(key)
        else:
            out[new] = value
    if dst == "lavis":
        for extra, source in LAVIS_TIED.items():
            if source in out:
                out[extra] = out[source]
    if dropped:
        logger.info("converting %s -> %s dropped %d keys with no place in %s: %s", src, dst, len(dropped), dst, dropped)
    return Converted(out, dropped, unknown)


def _absorb_lavis_extras(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Check LAVIS's tied copies equal their sources, then drop them and the buffers that hold nothing."""
    state = dict(state)
    for extra, source in LAVIS_TIED.items():
        if extra in state:
            if source in state and not torch.equal(state[extra], state[source]):
                raise ValueError(f"LAVIS checkpoint: {extra} should be tied to {source} but differs")
            del state[extra]
    for key in LAVIS_IGNORED:
        state.pop(key, None)
    return state


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names every missing, unexpected and misshapen key."""


def check_state_dict(
    model: nn.Module,
    state: Mapping[str, Tensor],
    *,
    source: str = "checkpoint",
    allowed_missing: Iterable[str] = (),
) -> None:
    """Raise `CheckpointError` listing every problem unless `state` fits `model` exactly.

    allowed_missing: model keys that the format is known not to carry (e.g. the frozen ViT in LAVIS stage-1
    files); each must be named explicitly or by a prefix ending in '.'.
    """
    expected = model.state_dict()
    allowed = tuple(allowed_missing)

    def is_allowed(key: str) -> bool:
        return any(key == a or (a.endswith(".") and key.startswith(a)) for a in allowed)

    missing = sorted(k for k in expected if k not in state and not is_allowed(k))
    unexpected = sorted(k for k in state if k not in expected)
    misshapen = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state
        if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if misshapen:
        problems.append(f"shape mismatches ({len(misshapen)}): {'; '.join(misshapen)}")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}:\n  " + "\n  ".join(problems))


def load_converted(
    model: nn.Module,
    state: Mapping[str, Tensor],
    fmt: str,
    *,
    key_map: KeyMap = QFORMER_KEYS,
    source: str = "checkpoint",
    allowed_missing: Iterable[str] = (),
    prefix: str = "",
) -> list[str]:
    """Convert `state` from `fmt` to our names, check it strictly against `model`, load it; returns dropped keys.

    prefix: strip this from our names before loading (e.g. "qformer." to load into a bare `QFormer`).
    Nothing is loaded unless every key and shape fits.
    """
    converted = convert_state_dict(state, fmt, "ours", key_map)
    if converted.unknown:
        raise CheckpointError(
            f"{source}: {len(converted.unknown)} key(s) unknown to the {fmt} map: "
            + ", ".join(sorted(converted.unknown))
        )
    ours = converted.state
    if prefix:
        outside = sorted(k for k in ours if not k.startswith(prefix))
        if outside:
            raise CheckpointError(f"{source}: key(s) outside {prefix!r} for this model: {', '.join(outside)}")
        ours = {k[len(prefix) :]: v for k, v in ours.items()}
    check_state_dict(model, ours, source=source, allowed_missing=allowed_missing)
    model.load_state_dict(ours, strict=False)  # strictness was checked above, with allowances
    return converted.dropped


def qformer_state_dict(model: nn.Module, fmt: str, key_map: KeyMap = QFORMER_KEYS) -> dict[str, Tensor]:
    """A bare `QFormer`'s weights under `fmt` names (keys without a place in `fmt` are dropped and logged)."""
    state = {f"qformer.{k}": v for k, v in model.state_dict().items()}
    return convert_state_dict(state, "ours", fmt, key_map).state


def load_qformer(model: nn.Module, state: Mapping[str, Tensor], fmt: str, *, source: str = "checkpoint") -> list[str]:
    """Load a bare `QFormer` strictly from a state dict in `fmt` names; returns the keys it dropped."""
    return load_converted(model, state, fmt, source=source, prefix="qformer.")


def split_transformers_qformer(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split transformers-named weights into (`Blip2QFormerModel` state, the rest: query tokens, embeddings)."""
    inner = {k[len("qformer.") :]: v for k, v in state.items() if k.startswith("qformer.")}
    rest = {k: v for k, v in state.items() if not k.startswith("qformer.")}
    return inner, rest


# --- image encoders ---
# Key maps for the frozen image encoders built in vision.py. Our names are the timm module's own (`Eva` for EVA
# ViT-g/14 and its tiny twin, `VisionTransformer` for CLIP ViT-L/14 and its twin), so the "timm" column is ours.
# "lavis" is the layout of LAVIS's weight files: for EVA (eva_vit_g.pth) that is timm's names already; for CLIP
# (clip_vit_L.pth) it is OpenAI's CLIP layout. "transformers" is `Blip2VisionModel` without its `vision_model.`
# prefix (EVA only: transformers has no CLIP-based BLIP-2 vision tower).

VISION_FORMATS = ("timm", "lavis", "transformers")
VISION_FAMILIES = ("eva", "clip", "generic")  # generic: any other timm model, timm names only

_EVA_B = "blocks.{i}"
_HF_VB = "encoder.layers.{i}"
_OAI_B = "transformer.resblocks.{i}"

# (timm = ours, LAVIS eva_vit_g.pth, transformers Blip2VisionModel)
EVA_KEY_MAP: tuple[tuple[str | None, ...], ...] = (
    ("cls_token", "cls_token", "embeddings.class_embedding"),
    ("pos_embed", "pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj", "patch_embed.proj", "embeddings.patch_embedding"),
    (f"{_EVA_B}.norm1", f"{_EVA_B}.norm1", f"{_HF_VB}.layer_norm1"),
    # Only the weight: the fused qkv has no bias of its own in EVA (see the q/v rows and VISION_PACKED_QKV_BIAS).
    (f"{_EVA_B}.attn.qkv", f"{_EVA_B}.attn.qkv", f"{_HF_VB}.self_attn.qkv"),
    # transformers stores these two packed in `qkv.bias`; the names here are the unpacked halves.
    (f"{_EVA_B}.attn.q_bias", f"{_EVA_B}.attn.q_bias", f"{_HF_VB}.self_attn.q_bias"),
    (f"{_EVA_B}.attn.v_bias", f"{_EVA_B}.attn.v_bias", f"{_HF_VB}.self_attn.v_bias"),
    (f"{_EVA_B}.attn.proj", f"{_EVA_B}.attn.proj", f"{_HF_VB}.self_attn.projection"),
    (f"{_EVA_B}.norm2", f"{_EVA_B}.norm2", f"{_HF_VB}.layer_norm2"),
    (f"{_EVA_B}.mlp.fc1", f"{_EVA_B}.mlp.fc1", f"{_HF_VB}.mlp.fc1"),
    (f"{_EVA_B}.mlp.fc2", f"{_EVA_B}.mlp.fc2", f"{_HF_VB}.mlp.fc2"),
)

# (timm = ours, LAVIS clip_vit_L.pth = OpenAI CLIP visual layout, transformers: none)
CLIP_KEY_MAP: tuple[tuple[str | None, ...], ...] = (
    ("cls_token", "class_embedding", None),
    ("pos_embed", "positional_embedding", None),
    ("patch_embed.proj", "conv1", None),  # no bias: CLIP's patch conv has none
    ("norm_pre", "ln_pre", None),
    (f"{_EVA_B}.norm1", f"{_OAI_B}.ln_1", None),
    # nn.MultiheadAttention names its fused projection `in_proj_weight` / `in_proj_bias` (rows on whole keys).
    (f"{_EVA_B}.attn.qkv.weight", f"{_OAI_B}.attn.in_proj_weight", None),
    (f"{_EVA_B}.attn.qkv.bias", f"{_OAI_B}.attn.in_proj_bias", None),
    (f"{_EVA_B}.attn.proj", f"{_OAI_B}.attn.out_proj", None),
    (f"{_EVA_B}.norm2", f"{_OAI_B}.ln_2", None),
    (f"{_EVA_B}.mlp.fc1", f"{_OAI_B}.mlp.c_fc", None),
    (f"{_EVA_B}.mlp.fc2", f"{_OAI_B}.mlp.c_proj", None),
)

VISION_KEY_MAPS = {
    "eva": KeyMap(EVA_KEY_MAP, VISION_FORMATS),
    "clip": KeyMap(CLIP_KEY_MAP, VISION_FORMATS),
}

# One transformer block's key prefix per format (None: no such format), to recognise whole blocks a file carries
# beyond the ones we build: LAVIS builds 39 of the 40 EVA blocks and 23 of the 24 CLIP blocks in its files.
VISION_BLOCK_PREFIX: dict[str, tuple[str | None, ...]] = {
    "eva": (f"{_EVA_B}.", f"{_EVA_B}.", f"{_HF_VB}."),
    "clip": (f"{_EVA_B}.", f"{_OAI_B}.", None),
    "generic": (f"{_EVA_B}.", None, None),
}

# Modules a full checkpoint carries that a BLIP-2 image encoder leaves out on purpose; on import they are named as
# dropped. A full timm model's final norm and classifier (LAVIS's EVA names are timm's); OpenAI's final norm
# `ln_post` and joint-space projection `proj`; and transformers' `post_layernorm`, which is BLIP-2's `ln_vision`
# and belongs to the caller, not to the encoder.
VISION_UNUSED: dict[str, tuple[tuple[str, ...], ...]] = {
    "eva": (("norm", "fc_norm", "head"), ("norm", "fc_norm", "head"), ("post_layernorm",)),
    "clip": (("norm", "fc_norm", "head"), ("ln_post", "proj"), ()),
    "generic": (("norm", "fc_norm", "head"), (), ()),
}

# transformers packs EVA's q and v biases around a zero k part: `qkv.bias = [q_bias, 0, v_bias]`.
# (packed key, q key, v key) in transformers names.
VISION_PACKED_QKV_BIAS = (
    f"{_HF_VB}.self_attn.qkv.bias",
    f"{_HF_VB}.self_attn.q_bias",
    f"{_HF_VB}.self_attn.v_bias",
)

# OpenAI stores the class and position embeddings without timm's leading singleton dims:
# our key -> how many leading dims of size 1 the "lavis" (OpenAI) layout drops.
CLIP_SQUEEZED = {"cls_token": 2, "pos_embed": 1}


def _vision_column(family: str, fmt: str) -> int:
    if family not in VISION_FAMILIES:
        raise ValueError(f"unknown image encoder family {family!r}; known: {', '.join(VISION_FAMILIES)}")
    if fmt not in VISION_FORMATS:
        raise ValueError(f"unknown image encoder format {fmt!r}; known: {', '.join(VISION_FORMATS)}")
    col = VISION_FORMATS.index(fmt)
    if VISION_BLOCK_PREFIX[family][col] is None:
        raise ValueError(f"the {fmt} format has no layout for a {family} image encoder")
    return col


def _block_pattern(family: str, fmt: str) -> re.Pattern:
    prefix = VISION_BLOCK_PREFIX[family][_vision_column(family, fmt)]
    return re.compile("^" + re.escape(prefix).replace(re.escape("{i}"), r"(?P<i>\d+)"))


def _is_unused(key: str, family: str, fmt: str) -> bool:
    return any(key == m or key.startswith(m + ".") for m in VISION_UNUSED[family][_vision_column(family, fmt)])


def _unpack_qkv_bias(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers `qkv.bias = [q, 0, v]` -> separate q and v biases; the k third must be exactly zero."""
    packed, q_name, v_name = VISION_PACKED_QKV_BIAS
    pattern = re.compile("^" + re.escape(packed).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = pattern.match(key)
        if not m:
            out[key] = value
            continue
        if value.dim() != 1 or value.shape[0] % 3:
            raise CheckpointError(f"{key}: a packed q/k/v bias must be 1-D with length 3 * D: {tuple(value.shape)}")
        q, k, v = value.chunk(3)
        if torch.count_nonzero(k):
            # EVA has no k bias; a non-zero one cannot be represented, so refuse rather than silently drop it.
            raise CheckpointError(f"{key}: the k third of the packed q/k/v bias must be zero (EVA has no k bias)")
        out[q_name.replace("{i}", m.group("i"))] = q
        out[v_name.replace("{i}", m.group("i"))] = v
    return out


def _pack_qkv_bias(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Separate q and v biases (transformers names) -> transformers' packed `qkv.bias = [q, 0, v]`."""
    packed, q_name, v_name = VISION_PACKED_QKV_BIAS
    q_pattern = re.compile("^" + re.escape(q_name).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")
    out = {k: v for k, v in state.items() if not q_pattern.match(k)}
    for key, q in state.items():
        m = q_pattern.match(key)
        if m:
            v_key = v_name.replace("{i}", m.group("i"))
            if v_key not in out:
                raise CheckpointError(f"{key} has no matching {v_key} to pack into the q/k/v bias")
            v = out.pop(v_key)
            out[packed.replace("{i}", m.group("i"))] = torch.cat((q, torch.zeros_like(q), v))
    return out


def convert_vision_state_dict(
    state: Mapping[str, Tensor], family: str, src: str, dst: str, *, drop_blocks: Iterable[int] = ()
) -> Converted:
    """Rename an image encoder's weights from format `src` to `dst` (see VISION_FORMATS).

    family: "eva", "clip" or "generic" (any other timm model: timm names only).
    drop_blocks: block indices the target does not build (LAVIS's last block); their keys are named as dropped,
    like the modules in VISION_UNUSED. Keys no row knows are returned as `unknown`, never silently kept.
    """
    _vision_column(family, src), _vision_column(family, dst)
    drop_blocks = set(drop_blocks)
    blocks = _block_pattern(family, src)
    dropped: list[str] = []
    items: dict[str, Tensor] = {}
    for key, value in state.items():
        m = blocks.match(key)
        if _is_unused(key, family, src) or (m and int(m.group("i")) in drop_blocks):
            dropped.append(key)
        else:
            items[key] = value
    if src == "transformers":
        items = _unpack_qkv_bias(items)
    if family == "clip" and dst == "lavis":
        for key, n in CLIP_SQUEEZED.items():
            if key in items:
                value = items[key]
                if tuple(value.shape[:n]) != (1,) * n:
                    raise CheckpointError(f"{key}: expected {n} leading dims of size 1, got {tuple(value.shape)}")
                items[key] = value.reshape(value.shape[n:])

    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    if family == "generic":
        out = items  # timm -> timm: nothing to rename
    else:
        key_map = VISION_KEY_MAPS[family]
        for key, value in items.items():
            new, matched = key_map.rename(key, src, dst)
            if not matched:
                unknown.append(key)
            elif new is None:
                dropped.append(key)
            else:
                out[new] = value

    if family == "clip" and src == "lavis":
        for key, n in CLIP_SQUEEZED.items():
            if key in out:
                out[key] = out[key].reshape((1,) * n + tuple(out[key].shape))
    if dst == "transformers":
        out = _pack_qkv_bias(out)
    if dropped:
        logger.info("image encoder %s -> %s: dropped %d keys on purpose: %s", src, dst, len(dropped), dropped)
    return Converted(out, dropped, unknown)
