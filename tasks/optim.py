"""The optimizer of a training run: AdamW parameter groups (weight decay, ViT layer-wise lr decay) and the lr schedule
(linear warmup, then a per-step cosine)."""

from __future__ import annotations

import math

import torch
from torch import nn

from tasks.config import TrainConfig


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms and 1-D parameters; layer-wise lr decay on an unfrozen ViT."""
    optim = cfg.optim
    visual = getattr(model, "visual", None)
    depth = getattr(visual, "depth", 0) if visual is not None else 0
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or name.endswith(".bias") or "norm" in name or "ln_vision" in name
        scale = 1.0
        if name.startswith("visual."):
            scale = optim.vit_lr_scale
            if optim.layer_decay != 1.0 and depth:
                layer = _vit_layer(name, depth)
                scale *= optim.layer_decay ** (depth + 1 - layer)
        groups.setdefault((no_decay, scale), []).append(p)
    return [
        {"params": ps, "weight_decay": 0.0 if nd else optim.weight_decay, "lr_scale": s}
        for (nd, s), ps in sorted(groups.items(), key=lambda kv: kv[0])
    ]


def _vit_layer(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for anything after the blocks."""
    parts = name.split(".")
    if "blocks" in parts:
        return int(parts[parts.index("blocks") + 1]) + 1
    if any(k in name for k in ("patch_embed", "pos_embed", "cls_token", "norm_pre")):
        return 0
    return depth + 1


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, in the groups of `param_groups`."""
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup from warmup_lr to lr, then a per-step cosine down to min_lr at total_steps."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.warmup_lr + (o.lr - o.warmup_lr) * step / max(1, o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / max(1, o.total_steps - o.warmup_steps))
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """Set each group's lr for optimizer step `step` (1-based), times its `lr_scale`; returns the base lr."""
    lr = lr_at(step - 1, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    return lr
