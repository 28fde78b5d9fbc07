"""Rank/world helpers and the gathers the stage-1 losses need.

Every function here works without a process group: with no group (or a group of one rank) the rank is 0,
the world size is 1 and every gather is the identity (`all_gather_no_grad` still detaches, so that callers
see the same autograd behaviour at every world size).

The autograd-aware collectives come from `torch.distributed.nn.functional`, whose backward passes are
maintained by PyTorch (all_gather's backward is a reduce-scatter on NCCL and an all-to-all plus sum elsewhere,
so it also runs on gloo). That module warns that it is deprecated in favour of
`torch.distributed._functional_collectives`; the warning is silenced at our call sites only.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "all_gather_no_grad",
    "all_gather_with_grad",
    "gather_rows",
    "get_rank",
    "get_world_size",
    "is_distributed",
]


def is_distributed() -> bool:
    """True when a default process group exists (whatever its size)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _autograd_collectives():
    """`torch.distributed.nn.functional`, imported lazily (it needs a torch built with distributed support)."""
    import torch.distributed.nn.functional as dist_fn

    return dist_fn


def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank along dim 0, outside autograd: `[B, ...]` -> `[B * W, ...]`.

    Like the reference's `concat_all_gather`, the whole result is detached, this rank's own rows included.
    Every rank must pass the same shape.
    """
    if get_world_size() == 1:
        return x.detach()
    with torch.no_grad():
        x = x.detach().contiguous()
        parts = [torch.empty_like(x) for _ in range(get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank along dim 0 with autograd: `[B, ...]` -> `[B * W, ...]`.

    In backward, each rank receives the sum over all ranks of the gradients flowing into its rows, so with
    DDP's gradient averaging the parameters get the gradient of the mean of the per-rank losses.
    Returns `x` itself at world size 1.
    """
    if get_world_size() == 1:
        return x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        parts = _autograd_collectives().all_gather(x)
    # The gradients reaching all_gather's backward must be contiguous: its non-NCCL backward allocates its
    # receive buffers with `empty_like(grad)`, and gloo's scatter fills a strided buffer as if it were dense,
    # silently permuting the gradient (pytorch/pytorch#192920). `torch.cat`'s backward hands each part a
    # narrow of the incoming gradient, which is strided whenever the consumer's gradient is (e.g. the einsum
    # in `itc_loss`), so make each part's gradient contiguous on its way in.
    for part in parts:
        if part.requires_grad:
            part.register_hook(_contiguous)
    return torch.cat(parts, dim=0)


def _contiguous(grad: Tensor) -> Tensor:
    return grad.contiguous()


def gather_rows(x_local: Tensor, index: Tensor) -> Tensor:
    """Rows of the global batch, fetched from the ranks that own them, with autograd: `x_global[index]`.

    Args:
        x_local: `[B, ...]` this rank's rows; every rank has the same `B`, and rank `r` owns the global rows
            `r * B ... r * B + B - 1`.
        index: `[M]` long, positions in the global batch (`0 <= index < B * W`); `M` may differ per rank.

    Returns:
        `[M, ...]`; gradients flow back to the owning ranks.

    Only the requested rows travel (two small exchanges of counts and indices, then one all-to-all of rows),
    instead of gathering every rank's full tensor; for ITM negatives that is `B` image token maps per rank
    rather than `B * W`. The split sizes are read on the host, which synchronises with the device once.
    """
    if index.dim() != 1:
        raise ValueError(f"gather_rows: index must be 1-D, got shape {tuple(index.shape)}")
    world = get_world_size()
    if world == 1:
        return x_local[index]

    batch = x_local.shape[0]
    index = index.to(device=x_local.device, dtype=torch.long)
    owner = torch.div(index, batch, rounding_mode="floor")
    # Group the requests by owning rank (stable, so the order inside a group is kept) to make each
    # destination's block contiguous, as all_to_all_single wants.
    order = torch.argsort(owner, stable=True)
    owner_sorted = owner[order]
    local_index_sorted = index[order] - owner_sorted * batch
    send_counts = torch.bincount(owner_sorted, minlength=world)
    if send_counts.numel() != world:  # bincount grows past minlength for an index >= B * W
        raise ValueError(f"gather_rows: index out of range for a global batch of {batch} x {world} rows")

    # 1. Tell every owner which of its rows we want.
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    send_sizes = send_counts.tolist()  # rows I request from each rank
    recv_sizes = recv_counts.tolist()  # rows each rank requests from me
    requested = local_index_sorted.new_empty(sum(recv_sizes))
    dist.all_to_all_single(
        requested, local_index_sorted.contiguous(), output_split_sizes=recv_sizes, input_split_sizes=send_sizes
    )

    # 2. Send those rows back through the autograd-aware all-to-all; its backward routes the row gradients
    # to the owners by the reverse exchange, and x_local[requested]'s backward scatters them into place.
    rows_out = x_local[requested].contiguous()
    rows_in = x_local.new_empty((len(index), *x_local.shape[1:]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        rows_in = _autograd_collectives().all_to_all_single(
            rows_in, rows_out, output_split_sizes=send_sizes, input_split_sizes=recv_sizes
        )
    # Undo the sort: rows_in[k] answers request order[k].
    return rows_in[torch.argsort(order)]


def all_gather_variable(x: Tensor) -> Tensor:
    """Concatenate every rank's `x` along dim 0 when the ranks hold different numbers of rows (no autograd).

    Rows are padded to the largest count for the collective and trimmed after, in rank order.
    """
    if not is_distributed() or get_world_size() == 1:
        return x.detach()
    world = get_world_size()
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])
