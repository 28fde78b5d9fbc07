"""Distributed plumbing for the runner: joining the process group, splitting work across ranks, rank-0 jobs.

One sharding policy for every job: rank r takes items r, r + W, r + 2W, ... (W = world size). Striding keeps
the ranks' shares within one item of each other, and `gather_strided` puts the gathered rows back in global
order, so a result never depends on how many processes computed it.

Model-side gathers with autograd live in `qformer.dist`; this file holds what only a run needs. Everything here
works without a process group (rank 0 of 1).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from qformer.dist import all_gather_variable, get_rank, get_world_size, is_distributed

__all__ = [
    "gather_strided",
    "on_rank0",
    "run_sharded",
    "setup_distributed",
    "shard",
    "shard_indices",
    "teardown_distributed",
]

T = TypeVar("T")


def setup_distributed() -> torch.device:
    """Join the process group torchrun describes (if any); returns this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def teardown_distributed() -> None:
    """Leave the process group, after every rank has reached this point.

    Destroying a gloo group while a peer is still tearing its connections down aborts the process now and then
    ("terminate called without an active exception", about 1 run in 7 of tests/test_dist.py): the barrier first
    lets every rank finish its last collective. After a failure on another rank the barrier may fail too; the
    group is destroyed anyway.
    """
    if not dist.is_initialized():
        return
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def shard_indices(n: int, rank: int | None = None, world: int | None = None) -> range:
    """The indices of `range(n)` this rank handles: rank, rank + W, ... (the one sharding policy)."""
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world is None else world
    return range(rank, n, world)


def shard(items: Sequence[T], rank: int | None = None, world: int | None = None) -> list[T]:
    """This rank's items (see `shard_indices`)."""
    return [items[i] for i in shard_indices(len(items), rank, world)]


def gather_strided(x: Tensor, n: int) -> Tensor:
    """Every rank's rows of a strided split, back in global order: rank r's `x` holds rows `shard_indices(n, r)`;
    returns `[n, ...]` on every rank (no autograd)."""
    gathered = all_gather_variable(x)  # rank-major: rank 0's rows, then rank 1's, ...
    world = get_world_size()
    if world == 1:
        return gathered
    if gathered.shape[0] != n:
        raise RuntimeError(f"gathered {gathered.shape[0]} rows from {world} ranks, expected {n}")
    order = torch.cat([torch.arange(r, n, world) for r in range(world)]).to(gathered.device)
    out = torch.empty_like(gathered)
    out[order] = gathered
    return out


def run_sharded(work: Callable[[], dict[Hashable, T]], what: str) -> dict[Hashable, T]:
    """Run this rank's `work` and merge every rank's resulting dict into one (every rank gets the merge).

    A key produced by two ranks is an error, not an overwrite. If `work` fails on any rank, every rank raises
    (the failing one its own exception, the others a RuntimeError quoting it), so no rank is left waiting.
    """
    if not is_distributed():
        return work()
    local: dict[Hashable, T] = {}
    error: Exception | None = None
    try:
        local = work()
    except Exception as e:  # reported to every rank below, then re-raised here
        error = e
    parts: list[Any] = [None] * get_world_size()
    dist.all_gather_object(parts, (local, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    failures = [f"rank {r}: {message}" for r, (_, message) in enumerate(parts) if message]
    if failures:
        raise RuntimeError(f"{what} failed on another rank: " + "; ".join(failures))
    merged: dict[Hashable, T] = {}
    for rank, (part, _) in enumerate(parts):
        for key, value in part.items():
            if key in merged:
                raise RuntimeError(f"{what}: {key!r} was produced by two ranks (the second is rank {rank})")
            merged[key] = value
    return merged


def on_rank0(fn: Callable[[], T], what: str, share: bool = False) -> T | None:
    """Run `fn` on rank 0 only and return its value there (and, with `share`, on every rank; else None).

    If `fn` fails, rank 0 raises its exception and every other rank a RuntimeError quoting it.
    """
    if not is_distributed():
        return fn()
    value: T | None = None
    error: Exception | None = None
    if get_rank() == 0:
        try:
            value = fn()
        except Exception as e:  # reported to every rank below, then re-raised here
            error = e
    message = [None if error is None else f"{type(error).__name__}: {error}", value if share else None]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise RuntimeError(f"{what} failed on rank 0: {message[0]}")
    return value if get_rank() == 0 else message[1]
