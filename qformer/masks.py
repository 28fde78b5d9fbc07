"""Self-attention masks for the Q-Former's three modes (DESIGN.md section 3).

The sequence is `[queries; text]`: Q query slots, then T text tokens. A mask row is a position that
attends, a column a position attended to. Drawn for Q = 2 queries and T = 3 text tokens whose last one
is padding (`x` = may attend, `.` = may not):

ITC, two separate passes (unimodal). Queries alone, then text alone:

        q0 q1                t0 t1 t2
    q0   x  x            t0   x  x  .
    q1   x  x            t1   x  x  .
                         t2   x  x  .     <- a pad row still attends; its output is never used

ITM, one bidirectional pass (everyone sees everyone, minus padding):

        q0 q1 t0 t1 t2
    q0   x  x  x  x  .
    q1   x  x  x  x  .
    t0   x  x  x  x  .
    t1   x  x  x  x  .
    t2   x  x  x  x  .

ITG, multimodal causal: text sees all queries and earlier text; queries never see text:

        q0 q1 t0 t1 t2
    q0   x  x  .  .  .
    q1   x  x  .  .  .
    t0   x  x  x  .  .
    t1   x  x  x  x  .
    t2   x  x  x  x  .     <- t2 is padding: nobody attends to it, it attends causally

Decoding with a cache computes only the newest rows (the bottom rows of the ITG drawing) against every
cached column; `self_attention_mask` takes the number of rows for that reason.

Masks are additive floats (0 = attend, dtype's minimum = blocked) rather than booleans so that a row
with every column blocked yields a uniform average instead of NaN, as BERT's -inf-free masks do.
"""

from __future__ import annotations

import torch
from torch import Tensor


def self_attention_mask(
    query_length: int,
    text_mask: Tensor | None,
    *,
    num_rows: int | None = None,
    causal: bool = False,
    batch_size: int = 1,
    text_length: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor | None:
    """Additive mask `[B, 1, rows, Q + T]` for self-attention over `[queries; text]`, or None if nothing is masked.

    query_length: Q, the query slots at the front (0 for a text-only pass).
    text_mask: `[B, T]`, 1 for real tokens and 0 for padding, covering every text column (cached and new);
        None means no padding (then `batch_size` and `text_length` give B and T).
    num_rows: how many of the last positions compute outputs (default all Q + T); fewer when decoding with a
        cache of the earlier positions.
    causal: the ITG mode (multimodal causal); otherwise bidirectional.
    """
    if text_mask is not None:
        batch_size, text_length = text_mask.shape
        device = text_mask.device
    total = query_length + text_length
    rows = total if num_rows is None else num_rows
    if not 0 < rows <= total:
        raise ValueError(f"num_rows must be in [1, {total}], got {rows}")
    has_padding = text_mask is not None and not bool(text_mask.all())
    if not causal and not has_padding:
        return None  # lets SDPA take its unmasked (fastest) kernel

    allowed = torch.ones(batch_size, 1, rows, total, dtype=torch.bool, device=device)
    if has_padding:
        query_cols = torch.ones(batch_size, query_length, dtype=torch.bool, device=device)
        key_valid = torch.cat([query_cols, text_mask.bool()], dim=1)  # [B, Q+T]
        allowed = allowed & key_valid[:, None, None, :]
    if causal:
        row_pos = torch.arange(total - rows, total, device=device)[:, None]  # [rows, 1]
        col_pos = torch.arange(total, device=device)[None, :]  # [1, Q+T]
        # A query row sees the queries; a text row sees the queries and text up to itself.
        sees = (col_pos < query_length) | ((row_pos >= query_length) & (col_pos <= row_pos))
        allowed = allowed & sees
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def cross_attention_mask(image_mask: Tensor | None, dtype: torch.dtype = torch.float32) -> Tensor | None:
    """Additive mask `[B, 1, 1, N]` over image tokens (1 = real, 0 = padding), or None when none is padded."""
    if image_mask is None or bool(image_mask.all()):
        return None
    mask = torch.zeros(image_mask.shape[0], 1, 1, image_mask.shape[1], dtype=dtype, device=image_mask.device)
    return mask.masked_fill_(~image_mask.bool()[:, None, None, :], torch.finfo(dtype).min)
