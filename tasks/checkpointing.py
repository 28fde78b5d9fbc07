"""Training checkpoints and resume: `checkpoints/ckpt-STEP/` in a run's output folder.

A checkpoint holds the trainable weights (`trainable.safetensors`), optimizer, GradScaler and step (`state.pt`),
and for every rank its data position, its objective's state (the prefix-LM split generator of stage 2) and its RNG
states (`rankR.pt`), plus the resolved config and the git commit. Every rank writes under a temporary name that
rank 0 renames once all are complete, so a crash mid-write leaves no folder that looks usable; one that is damaged
anyway (a truncated file) is detected and the previous checkpoint used. Resuming restores all of it, so the run
continues exactly as the uninterrupted one would have.

`state.pt` and `rankR.pt` hold only tensors and plain Python values (numpy's RNG state is stored as lists), so
they are read with `torch.load(weights_only=True)`: a file that holds anything else (a planted pickle that would
run code) is refused with a `CheckpointError` naming it, never unpickled and never skipped for an older checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from qformer.convert import CheckpointError, check_state_dict
from qformer.dist import get_rank, get_world_size, is_distributed
from tasks.config import TrainConfig, to_yaml

logger = logging.getLogger(__name__)


def _rng_state() -> dict:
    # numpy's state holds an ndarray, which weights-only loading refuses: keep it as plain lists and numbers.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [str(kind), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _load(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint's `state.pt` or `rankR.pt`, weights-only: tensors and plain values, no code.

    Raises CheckpointError for a file that holds anything else (refused, not damage to fall back from); other
    errors (a truncated file) propagate as they are."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # what torch raises for a global the weights-only unpickler refuses
        lines = [x.strip() for x in str(err).splitlines() if x.strip()]
        detail = next((x for x in lines if "WeightsUnpickler error" in x), lines[0] if lines else type(err).__name__)
        detail = detail.split(" Please use")[0].rstrip(".")  # torch's advice is to allow the global: not ours
        raise CheckpointError(
            f"{path}: holds more than tensors and plain values, so resume refuses to unpickle it ({detail}); "
            "training checkpoints hold nothing else (older ones, from before weights-only resume, hold numpy arrays)"
        ) from None


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


def save_checkpoint(
    out: Path,
    step: int,
    model: nn.Module,
    optimizer,
    scaler,
    cfg: TrainConfig,
    rank_state: dict,
    counters: dict[str, int] | None = None,
) -> Path:
    """`checkpoints/ckpt-STEP`: written under a temporary name by every rank, renamed by rank 0 once complete.

    rank_state: this rank's own state (`data`: the loader's position, `objective`: the objective's state); the
    RNG states are added here. counters: the run's totals that a resume continues (e.g. `non_finite_steps`).
    All of it must be tensors and plain Python values (see `_load`).
    """
    rank, world = get_rank(), get_world_size()
    final = out / "checkpoints" / f"ckpt-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    torch.save({"rng": _rng_state(), **rank_state}, tmp / f"rank{rank}.pt")
    if rank == 0:
        trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, tmp / "trainable.safetensors")
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler else None,
                "step": step,
                "counters": dict(counters or {}),
            },
            tmp / "state.pt",
        )
        (tmp / "config.yaml").write_text(to_yaml(cfg))
        meta = {"step": step, "world_size": world, "git_commit": git_commit(), "time": time.time()}
        (tmp / "meta.json").write_text(json.dumps(meta))
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        kept = sorted(p for p in final.parent.glob("ckpt-*") if not p.name.endswith(".tmp"))
        for old in kept[: -cfg.keep_last] if cfg.keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _valid(ckpt: Path, world: int) -> bool:
    """A checkpoint is used only if every file is there and readable (a truncated file means a crash mid-write).
    A file that holds more than tensors and plain values raises CheckpointError: refused, not skipped."""
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
        if meta["world_size"] != world:
            logger.warning("%s was written by %d processes, this run has %d", ckpt, meta["world_size"], world)
            return False
        load_file(ckpt / "trainable.safetensors")
        _load(ckpt / "state.pt")
        for r in range(world):
            _load(ckpt / f"rank{r}.pt")
        return True
    except CheckpointError:
        raise
    except Exception as e:  # any damage: fall back to the previous checkpoint
        logger.warning("checkpoint %s is not usable (%s: %s); trying an older one", ckpt, type(e).__name__, e)
        return False


def find_resume(out: Path, resume: str, world: int) -> Path | None:
    """The checkpoint to resume from: None for `resume=none` or when `auto` finds no valid one in `out`."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not _valid(path, world):
            raise ValueError(f"resume checkpoint {path} is missing or damaged")
        return path
    for ckpt in sorted((out / "checkpoints").glob("ckpt-*"), reverse=True):
        if not ckpt.name.endswith(".tmp") and _valid(ckpt, world):
            return ckpt
    return None


def _frozen_keys(model: nn.Module, trainable: set[str]) -> list[str]:
    """The model's state keys a checkpoint leaves out: a '.'-prefix for each wholly frozen top-level part (ViT, LLM),
    every other non-trainable key by name."""
    frozen_parts = [n + "." for n, m in model.named_children() if not any(p.requires_grad for p in m.parameters())]
    rest = [k for k in model.state_dict() if k not in trainable and not k.startswith(tuple(frozen_parts))]
    return frozen_parts + rest


def resume_from(
    ckpt: Path, *, model: nn.Module, optimizer, scaler, loader, objective, device: torch.device
) -> tuple[int, dict[str, int]]:
    """Restore the trainable weights, optimizer, scaler, this rank's data position, objective state and RNG states
    from `ckpt`; returns the step it was written at and the run's counters then (`save_checkpoint`'s `counters`;
    empty for a checkpoint written without them). The weights must fit the model's trainable parameters exactly."""
    trainable = load_file(ckpt / "trainable.safetensors", device=str(device))
    wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    check_state_dict(model, trainable, source=str(ckpt), allowed_missing=_frozen_keys(model, wanted))
    model.load_state_dict(trainable, strict=False)  # in place: the optimizer keeps its parameters
    state = _load(ckpt / "state.pt", map_location=device)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    mine = _load(ckpt / f"rank{get_rank()}.pt")
    loader.load_state_dict(mine["data"])
    objective.load_state_dict(mine.get("objective", {}))
    _set_rng_state(mine["rng"])  # last: nothing above may draw from the restored generators
    logger.info("resumed from %s at step %d", ckpt, state["step"])
    return state["step"], dict(state.get("counters", {}))
