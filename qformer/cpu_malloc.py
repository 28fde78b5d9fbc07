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

`keep_freed_memory()` goes further, for a training process on the CPU (the trainer calls it): no block is mapped
(`M_MMAP_MAX` 0) and the heap is never trimmed, so memory freed in one step is reused by the next instead of being
returned to the kernel and faulted in again. Blocks above the 32 MiB ceiling cannot be kept any other way, and a
stage-1 step makes several every step: at BERT's vocabulary the word-embedding gradients, their accumulation, the
LM head's weight gradient and AdamW's temporaries are 94 MB each. Measured at the paper size (`scripts/bench_stage1.py
--no-vit --batch 8`, 2 threads): ~130,000 minor faults and 9.0 s a step before, 0 faults and 8.4 s after, the same
peak RSS (6.4 GiB). The process then never gives memory back while it runs, which a training loop whose every step
reaches the same peak does not need.
"""

from __future__ import annotations

import ctypes
import logging
import sys

logger = logging.getLogger(__name__)

__all__ = ["keep_freed_memory", "keep_large_blocks"]

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)  # DEFAULT_MMAP_THRESHOLD_MAX: mallopt's ceiling

_applied: bool | None = None  # keep_large_blocks: None = not tried yet
_keep_all: bool | None = None  # keep_freed_memory: None = not tried yet


def _mallopt():
    """glibc's mallopt, or None off glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def keep_large_blocks() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True if they are set (now or before), or if
    `keep_freed_memory` already keeps every block (its settings are left as they are)."""
    global _applied
    if _keep_all:
        return True
    if _applied is None:
        _applied = False
        if (mallopt := _mallopt()) is not None:
            _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
                mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_MAX)
            )
            logger.debug(
                "glibc mmap threshold %d, trim threshold %d: %s", MMAP_THRESHOLD_MAX, 2 * MMAP_THRESHOLD_MAX, _applied
            )
    return _applied


def keep_freed_memory() -> bool:
    """For a CPU training process: no more mmapped blocks and no trimming of the heap, once per process; True if
    set (now or before)."""
    global _keep_all
    if _keep_all is None:
        _keep_all = False
        if (mallopt := _mallopt()) is not None:
            _keep_all = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))  # -1: never trim
            if _keep_all:
                logger.info("CPU training: glibc keeps freed memory for reuse (no mmap, no trimming)")
    return _keep_all
