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
