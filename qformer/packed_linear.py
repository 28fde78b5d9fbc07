"""`nn.Linear` whose weight is kept pre-packed for MKL's GEMM at inference on the CPU.

An fp32 GEMM on the CPU first copies the weight matrix into the blocked layout MKL's kernel reads, on every call.
Inference multiplies by the same weights at the same number of rows batch after batch (every layer of the Q-Former's
query pass), so `Linear` keeps the packed copy (`torch.ops.mkl._mkl_reorder_linear_weight`) and multiplies by it
(`torch.ops.mkl._mkl_linear`, the kernels torch's own CPU compiler emits for frozen fp32 weights). The result equals
`F.linear`'s to float rounding (bitwise for some shapes; with a 3072-long reduction the sum is split differently).
Measured at the paper size, batch 8, 2 threads (Intel Xeon with AVX-512, 2026-12-01, 14 interleaved repeats): the
Q-Former's queries-only eval pass 257 -> 230 ms, against transformers' `Blip2QFormerModel` 296 ms; oneDNN's packed
weights (`torch.ops.mkldnn._linear_pointwise`, any row count from one pack) took 238 ms.

When: no gradient recorded (`no_grad` or `inference_mode`), CPU, fp32 input and weight, no CPU autocast, a
contiguous input of at least 16 rows (MKL's own small-row kernel is faster below that), a weight of at least
512 x 512 elements (the paper's Q-Former is 768 wide; smaller weights gain less, and the shapes demo's 128-wide
Q-Former and the tiny test configs stay on `F.linear`, their results unchanged), torch built with MKL.
A pack serves one row count only, so a row count is packed on its second call in a row (a one-off shape is not worth
the copy), and at most two row counts are kept per layer. Packs are dropped when the weight's storage or version
counter changes (an optimizer step, `load_state_dict`, `.to()`) and whenever the train/eval mode is set, so a
training process does not carry them between evaluations. An in-place change through `weight.data` bumps no
counter: call `.eval()` again after one. Memory: one more copy of each packed weight per kept row count (~350 MB for
the paper-size query pass). `Linear.enabled = False` turns packing off everywhere.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = ["Linear", "mkl_packing_available"]

MIN_ROWS = 16
MIN_WEIGHT_NUMEL = 512 * 512
MAX_ROW_COUNTS = 2


@functools.cache
def mkl_packing_available() -> bool:
    """Whether this build of torch has MKL and its packed-GEMM ops (checked once per process)."""
    available = torch.backends.mkl.is_available()
    if available:
        try:
            w = torch.zeros(MIN_ROWS, MIN_ROWS)
            torch.ops.mkl._mkl_linear(w, torch.ops.mkl._mkl_reorder_linear_weight(w, MIN_ROWS), w, None, MIN_ROWS)
        except (AttributeError, RuntimeError, NotImplementedError):  # ops this build lacks
            available = False
    logger.debug("MKL packed weights for CPU inference: %s", available)
    return available


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state-dict keys) with MKL-packed weights at CPU inference."""

    enabled: bool = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drop_packs()

    def train(self, mode: bool = True) -> Linear:
        self.drop_packs()
        return super().train(mode)

    def drop_packs(self) -> None:
        self._packs: dict[int, Tensor] = {}  # row count -> packed weight
        self._packed_from: tuple[int, int] | None = None  # (weight storage, version counter) they were made of
        self._last_rows: int | None = None  # the row count of the previous call

    def forward(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out]
        rows = x.numel() // self.in_features if x.numel() else 0
        pack = self._pack_for(x, rows)
        if pack is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkl._mkl_linear(x, pack, self.weight, self.bias, rows)

    def _pack_for(self, x: Tensor, rows: int) -> Tensor | None:
        w = self.weight
        if not (
            self.enabled
            and not torch.is_grad_enabled()
            and rows >= MIN_ROWS
            and x.device.type == "cpu"
            and x.dtype == w.dtype == torch.float32
            and w.numel() >= MIN_WEIGHT_NUMEL
            and not torch.is_autocast_enabled("cpu")
            and x.is_contiguous()
            and w.is_contiguous()
        ):
            return None
        if not mkl_packing_available():
            return None
        source = (w.data_ptr(), w._version)
        if source != self._packed_from:  # the weight changed since the packs were made
            self.drop_packs()
            self._packed_from = source
        pack = self._packs.get(rows)
        if pack is None:
            seen_before, self._last_rows = rows == self._last_rows, rows
            if not seen_before:
                return None
            if len(self._packs) >= MAX_ROW_COUNTS:
                del self._packs[next(iter(self._packs))]  # the oldest
            pack = self._packs[rows] = torch.ops.mkl._mkl_reorder_linear_weight(w.detach(), rows)
        return pack
