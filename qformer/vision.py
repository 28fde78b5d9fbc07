"""Frozen image encoders built with timm, and their weight loading (DESIGN.md section 7).

`build_vision_encoder(cfg)` gives a `VisionEncoder` that maps images `[B, 3, H, W]` to all its tokens `[B, N, E]`
(class token first, no final norm: BLIP-2's `ln_vision` lives with the Q-Former side). The architectures:

    eva_vit_g   EVA-CLIP ViT-g/14 as LAVIS builds it: timm `Eva`, width 1408, 39 of the file's 40 blocks,
                16 heads, MLP 6144, exact GELU, LayerNorm eps 1e-6, q/v biases without a k bias, no rope.
    clip_vit_l  OpenAI CLIP ViT-L/14 as LAVIS builds it: timm `VisionTransformer`, width 1024, 23 of 24 blocks,
                16 heads, MLP 4096, QuickGELU, `ln_pre` before the blocks, LayerNorm eps 1e-5, no `ln_post`.
    tiny        EVA-style twin (width 48, 2 blocks; its files may carry a third, dropped like EVA's 40th).
    tiny_vitl   CLIP-style twin (width 40, 2 blocks; likewise).
    timm:<name> any other timm ViT, built without head or final norm, loaded from timm state dicts only.

Weights come from local files or state dicts in three layouts (convert.py, "image encoders"): LAVIS's
(`eva_vit_g.pth`; OpenAI's layout for `clip_vit_L.pth`), transformers' `Blip2VisionModel` (`vision_model.*`, q/v
biases packed as `qkv.bias = [q, 0, v]`) and timm's own names. Loading is strict: every key and shape must fit, and
what a file carries but the encoder leaves out on purpose is returned by name. Position embeddings are resampled
when the file's grid differs from the configured image size (e.g. 224 px weights used at 364 px).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import timm
import torch
from timm.layers import LayerNormFp32, QuickGELU, resample_abs_pos_embed
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from qformer.config import ARCHS, ArchSpec, VisionConfig
from qformer.convert import VISION_FORMATS, CheckpointError, check_state_dict, convert_vision_state_dict
from qformer.dtypes import to_dtype
from qformer.tensor_files import TensorFile

logger = logging.getLogger(__name__)

# How LAVIS resamples position embeddings for each family (both bicubic, without antialiasing): its EVA code uses
# align_corners=False, its CLIP code align_corners=True. timm's default (False) for everything else.
_ALIGN_CORNERS = {"eva": False, "clip": True, "generic": False}

# Wrappers around the encoder's keys in whole-model checkpoints, tried when no prefix is given.
_KNOWN_PREFIXES = ("vision_model.", "visual_encoder.", "visual.")


class VisionEncoder(nn.Module):
    """A timm ViT trunk returning every token: images `[B, 3, H, W]` -> `[B, N, E]`, class token first.

    Build it with `build_vision_encoder`. When frozen it stays in eval mode whatever `train()` is called with,
    its parameters need no grad, and `forward` runs without autograd.
    """

    def __init__(self, model: nn.Module, cfg: VisionConfig, family: str, file_depth: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.family = family
        self.width = int(getattr(model, "embed_dim", None) or model.num_features)
        # Blocks a reference file may hold beyond the ones built: LAVIS drops the last EVA / CLIP block.
        self.file_depth = file_depth if file_depth is not None else len(model.blocks)
        self.frozen = False
        self.dtype = torch.float32

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    def num_tokens(self) -> int:
        """N: patches of the configured image size plus the class token (257 for 224 px at patch 14)."""
        return self.model.patch_embed.num_patches + self.model.num_prefix_tokens

    def train(self, mode: bool = True) -> VisionEncoder:
        # A frozen encoder never trains: a parent's `.train()` must not switch on its drop path or dropout
        # (LAVIS replaces `train` on the frozen ViT for the same reason).
        return super().train(mode and not self.frozen)

    def freeze(self) -> VisionEncoder:
        self.frozen = True
        self.requires_grad_(False)
        return self.train(False)

    def forward(self, images: Tensor) -> Tensor:
        """`[B, 3, H, W]` -> `[B, N, E]` in the encoder's precision; H and W must be the configured image size."""
        size = self.cfg.image_size
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (size, size):
            raise ValueError(f"VisionEncoder expects images [B, 3, {size}, {size}], got {tuple(images.shape)}")
        images = images.to(self.dtype)
        # no_grad rather than inference_mode: the Q-Former saves these features for its own backward pass.
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            return self.model.forward_features(images)


def arch_spec(cfg: VisionConfig) -> ArchSpec | None:
    """The built-in shape of `cfg.arch` with the config's overrides applied (None for timm:* archs)."""
    spec = ARCHS.get(cfg.arch)
    if spec is None:
        return None
    changes = {
        name: value
        for name, value in (
            ("width", cfg.width_override),
            ("num_heads", cfg.heads_override),
            ("mlp_hidden", cfg.mlp_override),
            ("patch_size", cfg.patch_size_override),
        )
        if value
    }
    if cfg.depth_override:
        changes.update(depth=cfg.depth_override, file_depth=cfg.depth_override)
    return dataclasses.replace(spec, **changes) if changes else spec


def _build_trunk(cfg: VisionConfig) -> tuple[nn.Module, str, int | None]:
    """The timm module for `cfg` (fp32, on the current default device): (module, family, file depth)."""
    spec = arch_spec(cfg)
    if spec is None:
        return _build_timm_trunk(cfg), "generic", None
    if cfg.image_size % spec.patch_size:
        raise ValueError(
            f"VisionConfig.image_size {cfg.image_size} is not a multiple of the patch size {spec.patch_size}"
        )
    # Norms compute in fp32 even when the weights are half: LAVIS's CLIP LayerNorm does so explicitly and its EVA
    # runs under autocast, where layer_norm is an fp32 op. In fp32 this is plain LayerNorm.
    norm = functools.partial(LayerNormFp32, eps=spec.norm_eps)
    # int(width * ratio) must give the hidden width exactly; +0.5 keeps float rounding from landing one below.
    mlp_ratio = (spec.mlp_hidden + 0.5) / spec.width
    common = dict(
        img_size=cfg.image_size,
        patch_size=spec.patch_size,
        num_classes=0,
        global_pool="",
        embed_dim=spec.width,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=True,
        drop_path_rate=cfg.drop_path_rate,
        norm_layer=norm,
    )
    if spec.family == "eva":
        # Fused qkv with q and v biases and a fixed zero k bias, exact GELU, pre-norm blocks, absolute position
        # embedding, no rope, no layer scale; no norm after the blocks and no head.
        model = Eva(**common, qkv_fused=True, use_rot_pos_emb=False, use_post_transformer_norm=False, use_fc_norm=False)
    else:
        # CLIP: `ln_pre` after the embeddings (timm's pre_norm, which also drops the patch conv's bias), QuickGELU,
        # no final norm (LAVIS never applies `ln_post`).
        model = VisionTransformer(**common, pre_norm=True, final_norm=False, fc_norm=False, act_layer=QuickGELU)
    assert model.blocks[0].mlp.fc1.out_features == spec.mlp_hidden
    return model, spec.family, spec.file_depth


def _build_timm_trunk(cfg: VisionConfig) -> nn.Module:
    name = cfg.arch[len("timm:") :]
    try:
        # pretrained=False: weights only ever come from local files (cfg.weights), never from a hub.
        model = timm.create_model(
            name,
            pretrained=False,
            num_classes=0,
            global_pool="",
            img_size=cfg.image_size,
            drop_path_rate=cfg.drop_path_rate,
        )
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"VisionConfig.arch {cfg.arch!r}: timm cannot build it as a ViT at {cfg.image_size} px: {err}"
        ) from err
    if not hasattr(model, "patch_embed") or not hasattr(model, "blocks") or not hasattr(model, "forward_features"):
        raise ValueError(f"VisionConfig.arch {cfg.arch!r} is not a ViT-style timm model (needs patch_embed and blocks)")
    # The encoder returns un-normalised tokens for every arch: the final norm role is ln_vision's.
    if isinstance(getattr(model, "norm", None), nn.Module) and not isinstance(model.norm, nn.Identity):
        model.norm = nn.Identity()
    return model


def build_vision_encoder(cfg: VisionConfig) -> VisionEncoder:
    """Build the encoder for `cfg` with timm, load `cfg.weights` if set, then apply precision and freezing.

    Builds on the current default device: `with torch.device("meta"):` gives a shape-only model.
    """
    model, family, file_depth = _build_trunk(cfg)
    encoder = VisionEncoder(model, cfg, family, file_depth)
    if cfg.weights:
        # Loaded in fp32 before the cast, so position-embedding resampling happens at full precision.
        load_vision_weights(encoder, cfg.weights, cfg.weights_format)
    encoder.dtype = to_dtype(cfg.precision)
    encoder.to(encoder.dtype)
    if cfg.frozen:
        if cfg.grad_checkpointing:
            logger.warning("grad_checkpointing ignored: the %s image encoder is frozen", cfg.arch)
        encoder.freeze()
    elif cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    n_params = sum(p.numel() for p in encoder.parameters())
    logger.info(
        "image encoder %s: %d blocks, width %d, %d tokens, %.1fM params, %s, %s",
        cfg.arch,
        encoder.depth,
        encoder.width,
        encoder.num_tokens(),
        n_params / 1e6,
        cfg.precision,
        "frozen" if cfg.frozen else "trainable",
    )
    return encoder


def vision_width(cfg: VisionConfig) -> int:
    """Token width E of `cfg`'s encoder; timm models are built on the meta device to read it (no memory, no weights)."""
    if cfg.width is not None:
        return cfg.width
    with torch.device("meta"):
        model, _, _ = _build_trunk(cfg)
    return int(getattr(model, "embed_dim", None) or model.num_features)


# ----------------------------------------------------------------------------------------------------------------
# Weights


def _read_weights(path: Path, prefix: str | None) -> tuple[dict[str, Tensor], str, int]:
    """(the tensors under the prefix, the prefix, how many keys the file holds); safetensors read only those."""
    tensors = TensorFile(path)
    keys = tensors.keys()
    prefix = _choose_prefix(keys, prefix)
    return tensors.read(lambda k: k.startswith(prefix)), prefix, len(keys)


def _choose_prefix(keys: Iterable[str], prefix: str | None) -> str:
    """The given prefix, or the one known wrapper (`vision_model.`, `visual_encoder.`, `visual.`) the keys use."""
    if prefix:
        return prefix
    found = [p for p in _KNOWN_PREFIXES if any(k.startswith(p) for k in keys)]
    if len(found) > 1:
        raise CheckpointError(f"image encoder weights under several prefixes {found}: pass prefix= to pick one")
    return found[0] if found else ""


def detect_vision_format(keys: Mapping[str, object] | list[str]) -> str:
    """The layout of an image encoder's keys (prefix stripped): "transformers", "lavis" (OpenAI CLIP) or "timm".

    LAVIS's EVA file uses timm's names, so it is reported as "timm"; both read the same way.
    """
    keys = list(keys)
    if any(k.startswith(("embeddings.patch_embedding", "encoder.layers.")) for k in keys):
        return "transformers"
    if any(
        k in ("conv1.weight", "class_embedding", "positional_embedding") or k.startswith("transformer.") for k in keys
    ):
        return "lavis"
    if any(k in ("cls_token", "pos_embed") or k.startswith(("patch_embed.", "blocks.")) for k in keys):
        return "timm"
    raise CheckpointError(f"cannot tell the layout of these image encoder keys: {', '.join(sorted(keys)[:8])}, ...")


def _resample_pos_embed(encoder: VisionEncoder, state: dict[str, Tensor], source: str) -> None:
    """Resample the checkpoint's position embedding to the encoder's grid (bicubic, class-token slot kept)."""
    pos = state.get("pos_embed")
    target = getattr(encoder.model, "pos_embed", None)
    if pos is None or target is None or pos.dim() != 3 or tuple(pos.shape) == tuple(target.shape):
        return
    prefix_tokens = 0 if getattr(encoder.model, "no_embed_class", False) else encoder.model.num_prefix_tokens
    old = pos.shape[1] - prefix_tokens
    side = round(old**0.5)
    new_grid = tuple(encoder.model.patch_embed.grid_size)
    if side * side != old or pos.shape[2] != target.shape[2]:
        return  # not a square grid of the same width: check_state_dict reports the mismatch
    logger.info("%s: resampling position embedding from a %dx%d to a %dx%d grid", source, side, side, *new_grid)
    state["pos_embed"] = resample_abs_pos_embed(
        pos.float(),
        new_size=list(new_grid),
        old_size=[side, side],
        num_prefix_tokens=prefix_tokens,
        interpolation="bicubic",
        antialias=False,  # plain F.interpolate bicubic, as LAVIS and transformers do
        align_corners=_ALIGN_CORNERS[encoder.family],
    ).to(pos.dtype)


def load_vision_weights(
    encoder: VisionEncoder,
    source: str | Path | Mapping[str, Tensor],
    fmt: str = "auto",
    prefix: str = "",
) -> list[str]:
    """Load `source` (a file, a transformers folder, or a state dict) into `encoder` strictly.

    fmt: "auto" (from the key names), "lavis", "transformers" or "timm".
    prefix: the encoder's keys sit under it (e.g. "vision_model." in a whole BLIP-2 transformers checkpoint,
    "visual_encoder." in a fine-tuned LAVIS one); other keys are ignored. Without one, a known wrapper is detected.
    Returns the source keys left out on purpose (LAVIS's extra last block, `post_layernorm`, heads); anything else
    that does not fit raises `CheckpointError` naming every problem, before any weight is changed.
    """
    if fmt != "auto" and fmt not in VISION_FORMATS:
        raise ValueError(f"unknown image encoder weights format {fmt!r}; known: auto, {', '.join(VISION_FORMATS)}")
    if isinstance(source, Mapping):
        name = "image encoder state dict"
        prefix = _choose_prefix(source, prefix)
        under, total = {k: v for k, v in source.items() if k.startswith(prefix)}, len(source)
    else:
        name = str(source)
        under, prefix, total = _read_weights(Path(source), prefix)
    state = {k[len(prefix) :]: v for k, v in under.items()}
    if not state:
        raise CheckpointError(f"{name}: no image encoder keys under prefix {prefix!r}")
    if len(state) < total:
        logger.info("%s: using the %d keys under %r, ignoring %d others", name, len(state), prefix, total - len(state))

    if fmt == "auto":
        try:
            fmt = detect_vision_format(state)
        except CheckpointError as err:
            raise CheckpointError(f"{name}: {err}") from err
    if encoder.family == "generic" and fmt != "timm":
        raise CheckpointError(f"{name}: {encoder.cfg.arch} loads timm state dicts only, got the {fmt} layout")
    if encoder.family == "eva" and fmt == "lavis":
        fmt = "timm"  # LAVIS's EVA names are timm's
    try:
        converted = convert_vision_state_dict(
            state, encoder.family, fmt, "timm", drop_blocks=range(encoder.depth, encoder.file_depth)
        )
    except CheckpointError as err:
        raise CheckpointError(f"{name}: {prefix}{err}") from err
    except ValueError as err:  # a format with no layout for this family (e.g. transformers for CLIP)
        raise CheckpointError(f"{name}: {err}") from err
    # Every problem at once: unknown names, then missing, unexpected and misshapen keys.
    problems = []
    if converted.unknown:
        unknown = ", ".join(prefix + k for k in sorted(converted.unknown))
        problems.append(f"{len(converted.unknown)} key(s) unknown to the {fmt} image encoder layout: {unknown}")
    ours = converted.state
    _resample_pos_embed(encoder, ours, name)
    try:
        check_state_dict(encoder.model, ours, source=f"{name} ({fmt} layout)")
    except CheckpointError as err:
        problems.append(str(err))
    if problems:
        raise CheckpointError(f"{name}:\n  " + "\n  ".join(problems))
    encoder.model.load_state_dict(ours, strict=True)
    # Eva's zero k bias is a non-persistent buffer: after `to_empty()` from a meta build it holds garbage, and no
    # checkpoint restores it.
    for module in encoder.model.modules():
        if isinstance(getattr(module, "k_bias", None), Tensor):
            module.k_bias.zero_()
    dropped = [prefix + k for k in converted.dropped]
    if dropped:
        logger.info("%s: left out on purpose: %s", name, ", ".join(dropped))
    return dropped


def vision_state_dict(encoder: VisionEncoder, fmt: str = "timm", prefix: str = "") -> dict[str, Tensor]:
    """The encoder's weights in `fmt` names ("timm", "lavis", "transformers"), each key under `prefix`.

    transformers' `post_layernorm` (BLIP-2's `ln_vision`) is not the encoder's: the caller adds it.
    """
    converted = convert_vision_state_dict(encoder.model.state_dict(), encoder.family, "timm", fmt)
    return {prefix + k: v for k, v in converted.state.items()}


__all__ = [
    "ARCHS",
    "ArchSpec",
    "VisionEncoder",
    "build_vision_encoder",
    "detect_vision_format",
    "load_vision_weights",
    "vision_state_dict",
    "vision_width",
]
