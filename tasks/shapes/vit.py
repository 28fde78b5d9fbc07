"""The shapes world's ViT (stage 0): a tiny EVA-style timm ViT trained on the world's images with dense attribute
supervision, saved as a timm state dict and loaded frozen through `qformer.vision` like EVA ViT-g. See
`tasks.shapes.stage0` for how it fits with the rest of stage 0."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from qformer.config import VisionConfig
from tasks.data.transforms import CLIP_MEAN, CLIP_STD
from tasks.shapes.world import COLOURS, GRID, IMAGE_SIZE, SHAPES, SIZES, load_scenes, load_world, object_mask

logger = logging.getLogger(__name__)

__all__ = ["evaluate_vit", "init_std", "normalize_images", "train_vit", "vit_config"]

INIT_SCALE = 0.5


def init_std(width: int) -> float:
    """Initial weight std of the tiny models: 0.5 / sqrt(width) (0.0625 at 64) instead of BERT's 0.02 (see
    `tasks.shapes.lm._new_opt`)."""
    return INIT_SCALE / math.sqrt(width)


# The patch grid is aligned with the scene's grid: a 32 px cell is 2x2 patches, and its object (centred, give or take
# 2 px) shows each patch one quarter of itself. With the 8 px patches of a 64 px image, which cut the 21 px cells at
# every offset, the ViT of this size had learned no more than a third of the shapes after 1000 steps.
VIT_PATCH = 16
VIT_HEADS = 4
MAX_OBJECTS = 3
# Each patch token also predicts which pixels of the 24x24 window around its patch are covered (pooled to 12x12).
OCC_WINDOW = 24
OCC_CELLS = 12


def vit_config(width: int = 96, depth: int = 4, weights: str | Path | None = None, frozen: bool = True) -> VisionConfig:
    """The shapes ViT: EVA-style ("tiny" with overrides), 96 px, patch 16 (6x6 patches + class token: 37 tokens),
    4 heads, MLP 2x width, fp32."""
    return VisionConfig(
        arch="tiny",
        image_size=IMAGE_SIZE,
        precision="fp32",
        frozen=frozen,
        weights=str(weights) if weights else None,
        weights_format="timm",
        width_override=width,
        depth_override=depth,
        heads_override=VIT_HEADS,
        mlp_override=2 * width,
        patch_size_override=VIT_PATCH,
    )


# ------------------------------------------------------------------------------------------------------ the ViT

_COLOURS = list(COLOURS)
_SIZES = list(SIZES)
_PAIRS = [(c, s) for c in _COLOURS for s in SHAPES]  # presence targets of the class token


def _load_images(scenes: list[dict], image_root: str) -> Tensor:
    """uint8 `[B, 3, 96, 96]` decoded from the world's JPEGs."""
    arrays = []
    for sc in scenes:
        with Image.open(Path(image_root) / sc["image"]) as img:
            arrays.append(np.asarray(img.convert("RGB")))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def normalize_images(images: Tensor) -> Tensor:
    """uint8 `[B, 3, H, W]` -> what `tasks.data.eval_transform(IMAGE_SIZE)` gives for the world's images (the resize
    to their own size is the identity): CLIP mean/std normalisation."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _vit_targets(scenes: list[dict]) -> dict[str, Tensor]:
    """Per patch: shape, colour, size, cell of the object covering most of it (last class: background) and the
    covered pixels around it. Per object: its pixels in each patch and its labels. Per image: object count - 1 and
    presence of each (colour, shape)."""
    grid = IMAGE_SIZE // VIT_PATCH
    n = len(scenes)
    out = {
        "shape": torch.full((n, grid * grid), len(SHAPES), dtype=torch.long),
        "colour": torch.full((n, grid * grid), len(_COLOURS), dtype=torch.long),
        "size": torch.full((n, grid * grid), len(_SIZES), dtype=torch.long),
        "cell": torch.full((n, grid * grid), GRID * GRID, dtype=torch.long),
        "count": torch.zeros(n, dtype=torch.long),
        "present": torch.zeros(n, len(_PAIRS)),
        "occupancy": torch.zeros(n, grid * grid, OCC_CELLS**2, dtype=torch.uint8),
        # Per object slot (up to 3; -100 where the scene has fewer): its pixels in each patch, and its labels.
        "cover": torch.zeros(n, MAX_OBJECTS, grid * grid, dtype=torch.int16),
        "obj_shape": torch.full((n, MAX_OBJECTS), -100, dtype=torch.long),
        "obj_colour": torch.full((n, MAX_OBJECTS), -100, dtype=torch.long),
        "obj_size": torch.full((n, MAX_OBJECTS), -100, dtype=torch.long),
        "obj_cell": torch.full((n, MAX_OBJECTS), -100, dtype=torch.long),
    }
    margin = (OCC_WINDOW - VIT_PATCH) // 2
    for i, sc in enumerate(scenes):
        objects = sc["objects"]
        mask = torch.from_numpy(np.array(object_mask(objects))).long()  # [S, S]
        # Foreground in a window around each patch, at half resolution (0..4 pixels of each 2x2 block).
        fg = F.pad((mask > 0).float()[None, None], (margin,) * 4)
        windows = F.unfold(fg, OCC_WINDOW, stride=VIT_PATCH).view(OCC_WINDOW, OCC_WINDOW, -1).permute(2, 0, 1)
        pool = OCC_WINDOW // OCC_CELLS
        out["occupancy"][i] = (F.avg_pool2d(windows[:, None], pool) * 4).round().flatten(1).to(torch.uint8)
        patches = mask.view(grid, VIT_PATCH, grid, VIT_PATCH).permute(0, 2, 1, 3).reshape(grid * grid, -1)
        counts = F.one_hot(patches, len(objects) + 1).sum(1)  # [P, 1 + n_objects]
        best = counts[:, 1:].argmax(1)
        covered = counts[:, 1:].amax(1) >= VIT_PATCH**2 // 16  # a sixteenth of the patch at least
        for j, o in enumerate(objects):
            sel = covered & (best == j)
            out["shape"][i, sel] = SHAPES.index(o.shape)
            out["colour"][i, sel] = _COLOURS.index(o.colour)
            out["size"][i, sel] = _SIZES.index(o.size)
            out["cell"][i, sel] = o.row * GRID + o.col
            out["present"][i, _PAIRS.index((o.colour, o.shape))] = 1.0
            out["cover"][i, j] = counts[:, j + 1].to(torch.int16)
            out["obj_shape"][i, j] = SHAPES.index(o.shape)
            out["obj_colour"][i, j] = _COLOURS.index(o.colour)
            out["obj_size"][i, j] = _SIZES.index(o.size)
            out["obj_cell"][i, j] = o.row * GRID + o.col
        out["count"][i] = len(objects) - 1
    return out


def _init_vit(model: nn.Module, width: int) -> None:
    """Re-draw the blocks' linear weights with std INIT_SCALE / sqrt(width) instead of timm's 0.02 (see init_std)."""
    with torch.no_grad():
        for block in model.blocks:
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, INIT_SCALE / math.sqrt(module.in_features))


class _VitHeads(nn.Module):
    """Linear read-outs of the (final-normed) tokens used only to train the ViT; not saved."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.patch = nn.ModuleDict(
            {
                "shape": nn.Linear(width, len(SHAPES) + 1),
                "colour": nn.Linear(width, len(_COLOURS) + 1),
                "size": nn.Linear(width, len(_SIZES) + 1),
                "cell": nn.Linear(width, GRID * GRID + 1),
            }
        )
        self.occupancy = nn.Linear(width, OCC_CELLS**2)
        self.object = nn.ModuleDict(
            {
                "obj_shape": nn.Linear(width, len(SHAPES)),
                "obj_colour": nn.Linear(width, len(_COLOURS)),
                "obj_size": nn.Linear(width, len(_SIZES)),
                "obj_cell": nn.Linear(width, GRID * GRID),
            }
        )
        self.count = nn.Linear(width, 3)
        self.present = nn.Linear(width, len(_PAIRS))

    def forward(self, tokens: Tensor, cover: Tensor) -> dict[str, Tensor]:
        """tokens `[B, 1 + P, D]`, cover `[B, 3, P]` (each object's pixels per patch) -> logits by target name."""
        tokens = self.norm(tokens)
        cls, patches = tokens[:, 0], tokens[:, 1:]
        out = {name: head(patches) for name, head in self.patch.items()}  # [B, P, C]
        # Each object's tokens, pooled with its pixel coverage as weights: [B, 3, D].
        weights = cover.float() / cover.float().sum(-1, keepdim=True).clamp(min=1.0)
        pooled = torch.einsum("bop,bpd->bod", weights, patches)
        out.update({name: head(pooled) for name, head in self.object.items()})  # [B, 3, C]
        out["occupancy"] = self.occupancy(patches)
        out["count"] = self.count(cls)
        out["present"] = self.present(cls)
        return out


def _vit_loss(logits: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
    loss = sum(
        F.cross_entropy(logits[k].flatten(0, 1), targets[k].flatten()) for k in ("shape", "colour", "size", "cell")
    )
    loss = loss + sum(
        F.cross_entropy(logits[k].flatten(0, 1), targets[k].flatten(), ignore_index=-100)
        for k in ("obj_shape", "obj_colour", "obj_size", "obj_cell")
    )
    loss = loss + F.binary_cross_entropy_with_logits(logits["occupancy"], targets["occupancy"].float() / 4)
    loss = loss + F.cross_entropy(logits["count"], targets["count"])
    return loss + F.binary_cross_entropy_with_logits(logits["present"], targets["present"])


_OBJECT_KEYS = ("obj_shape", "obj_colour", "obj_size", "obj_cell")


@torch.no_grad()
def _vit_metrics(encoder: nn.Module, heads: _VitHeads, images: Tensor, targets: dict[str, Tensor]) -> dict:
    """Accuracies of the training read-outs: per object (its tokens pooled by coverage: shape, colour, size, cell, and
    all four right), per foreground patch, the object count and the full set of (colour, shape) pairs present."""
    was_training = encoder.training
    encoder.eval()
    chunks = []
    for s in range(0, len(images), 128):
        chunks.append(heads(encoder(normalize_images(images[s : s + 128])), targets["cover"][s : s + 128]))
    encoder.train(was_training)
    logits = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
    pred = {k: v.argmax(-1) for k, v in logits.items()}
    metrics = {}
    valid = targets["obj_shape"] >= 0
    right = torch.ones_like(valid)
    for k in _OBJECT_KEYS:
        ok = pred[k] == targets[k]
        metrics[k.replace("obj_", "object_")] = ok[valid].float().mean().item()
        right &= ok
    metrics["object_all"] = right[valid].float().mean().item()
    metrics["chance_object_all"] = 1 / (len(SHAPES) * len(_COLOURS) * len(_SIZES) * GRID * GRID)
    fg = targets["shape"] < len(SHAPES)
    for k in ("shape", "colour", "size", "cell"):
        metrics[f"patch_{k}"] = (pred[k] == targets[k])[fg].float().mean().item()
    metrics["patch_background"] = (pred["shape"] == targets["shape"])[~fg].float().mean().item()
    metrics["count"] = (pred["count"] == targets["count"]).float().mean().item()
    metrics["present"] = ((logits["present"] > 0).float() == targets["present"]).all(1).float().mean().item()
    return metrics


def train_vit(
    world,
    out_path: str | Path,
    steps: int = 600,
    seed: int = 0,
    *,
    width: int = 96,
    depth: int = 4,
    batch_size: int = 64,
    lr: float = 2e-3,
    eval_split: str = "val",
) -> Path:
    """Train the shapes ViT on the world's training images and save its timm state dict at `out_path`.

    Its held-out accuracies (on `eval_split`) go to `out_path` with suffix .json (see `evaluate_vit`).
    """
    from qformer.vision import build_vision_encoder

    t0 = time.time()
    world = load_world(world)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    train_scenes = load_scenes(world, "train")
    images = _load_images(train_scenes, world["image_root"])
    targets = _vit_targets(train_scenes)

    torch.manual_seed(seed)
    encoder = build_vision_encoder(vit_config(width, depth, frozen=False))
    _init_vit(encoder.model, width)
    heads = _VitHeads(width)
    params = list(encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    gen = torch.Generator().manual_seed(seed)
    encoder.train()
    order = torch.randperm(len(images), generator=gen)
    pos = 0
    for step in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(images), generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        batch = {k: v[idx] for k, v in targets.items()}
        loss = _vit_loss(heads(encoder(normalize_images(images[idx])), batch["cover"]), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            logger.info("vit step %d/%d loss %.4f", step, steps, loss.item())
    train_time = time.time() - t0
    torch.save(encoder.model.state_dict(), out_path)  # timm names: VisionConfig(weights=..., weights_format="timm")
    torch.save({"width": width, "state": heads.state_dict()}, _heads_path(out_path))
    metrics = _vit_metrics(encoder, heads, *_split_data(world, eval_split))
    train_metrics = _vit_metrics(encoder, heads, images[:200], {k: v[:200] for k, v in targets.items()})
    metrics.update({f"train_{k}": v for k, v in train_metrics.items() if k.startswith("object_")})
    metrics.update(split=eval_split, steps=steps, width=width, depth=depth, train_seconds=train_time, loss=loss.item())
    out_path.with_suffix(".json").write_text(json.dumps(metrics, indent=1))
    logger.info(
        "vit: object accuracy %.3f (shape %.3f) on %s", metrics["object_all"], metrics["object_shape"], eval_split
    )
    return out_path


def _heads_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".heads.pt")


def _split_data(world, split: str) -> tuple[Tensor, dict[str, Tensor]]:
    scenes = load_scenes(world, split)
    return _load_images(scenes, load_world(world)["image_root"]), _vit_targets(scenes)


def evaluate_vit(world, weights: str | Path, split: str = "test", width: int | None = None, depth: int | None = None):
    """Accuracies (see `_vit_metrics`) of a saved ViT on a split, loaded frozen the way stages 1 and 2 load it
    (`build_vision_encoder` with `weights_format="timm"`), read out by the heads saved next to it in training."""
    from qformer.vision import build_vision_encoder

    saved = torch.load(_heads_path(weights), map_location="cpu", weights_only=True)
    width = width or saved["width"]
    if depth is None:
        from qformer.tensor_files import TensorFile

        keys = TensorFile(weights).keys()
        depth = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("blocks."))
    encoder = build_vision_encoder(vit_config(width, depth, weights=weights))
    heads = _VitHeads(width)
    heads.load_state_dict(saved["state"])
    return _vit_metrics(encoder, heads.eval(), *_split_data(world, split))
