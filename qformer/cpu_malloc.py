"""Keep glibc from handing the CPU Q-Former's large intermediates back to the kernel after every use.

The absorbed cross-attention (`qformer.qformer.Attention._attend_absorbed`) makes per-layer intermediates of
`[B, Q * H, E]` floats: 17 MB each at the paper size and batch 8. glibc serves such a block with a fresh `mmap`
and unmaps it on free; its dynamic threshold rises only to the size of the freed block, so the next request of the
same size is mapped again. Every layer of every pass then touches ~35 MB of new pages: measured at the paper size,
2 threads, batch 8, a queries-only forward took ~50,000 minor page faults and 490-650 ms, and 38 faults and ~435 ms
once the thresholds below were set (transformers' `Blip2QFormerModel`, whose intermediates are smaller, took none
either way: `scripts/bench_qformer.py`).

`keep_large_blocks()` sets the mmap threshold to glibc's ceiling (32 MiB on 64-bit) and the trim threshold to twice
that, the values glibc's own dynamic adjustment reaches after freeing a 32 MiB block, so such blocks are reused from
the heap. It is process-wide, runs once, and does nothing off glibc (macOS, musl, Windows).
"""

from __future__ import annotations

import ctypes
import logging
import sys

logger = logging.getLogger(__name__)

__all__ = ["keep_large_blocks"]

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)  # DEFAULT_MMAP_THRESHOLD_MAX: mallopt's ceiling

_applied: bool | None = None


def keep_large_blocks() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True if they are set (now or before)."""
    global _applied
    if _applied is None:
        _applied = False
        if sys.platform.startswith("linux"):
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):  # not glibc
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
                mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_MAX)
            )
            logger.debug(
                "glibc mmap threshold %d, trim threshold %d: %s", MMAP_THRESHOLD_MAX, 2 * MMAP_THRESHOLD_MAX, _applied
            )
    return _applied
