"""Retrieval metrics (DESIGN.md section 9): recall at 1/5/10 both ways, as LAVIS reports them.

A pure function of the score matrices (no I/O, no process group, no model): `retrieval_ranks` gives each
query's 0-based rank; `retrieval_metrics` turns them into the percentages that LAVIS's
`RetrievalTask._report_metrics` reports (TR@1/5/10, IR@1/5/10, their means).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

RECALL_KS = (1, 5, 10)


class RetrievalRanks(NamedTuple):
    """0-based ranks (0 = retrieved first) of the ground truth, one per query."""

    txt: list[int]  # per image: best rank among its captions in its row (text retrieval, TR)
    img: list[int]  # per text: rank of its image in its column (image retrieval, IR)


def _score_matrix(scores: Any, name: str) -> Tensor:
    """A 2-D CPU tensor of `scores` (torch, numpy or nested lists), checked for NaN."""
    t = torch.as_tensor(scores).detach().cpu()
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    if t.is_floating_point() and torch.isnan(t).any():
        raise ValueError(f"{name} contains NaN at (row, col) {tuple(torch.nonzero(torch.isnan(t))[0].tolist())}")
    return t


def _best_target_ranks(scores: Tensor, targets: Sequence[Sequence[int]], name: str, chunk_rows: int) -> list[int]:
    """For each row of `scores` [R, C], the 0-based rank of its best target column.

    A row's columns are ordered by descending score, and among equal scores by ascending column index (a
    stable descending sort). The best target is therefore the one with the highest score, the lowest index
    among equal ones, and its rank is (#columns scoring higher) + (#equal-scoring columns with a lower index).
    """
    n_rows, n_cols = scores.shape
    if len(targets) != n_rows:
        raise ValueError(f"{name}: {len(targets)} target lists for {n_rows} score rows")
    width = 0
    for row, tg in enumerate(targets):
        if len(tg) == 0:
            raise ValueError(f"{name}: row {row} has no ground-truth target")
        bad = [t for t in tg if not 0 <= t < n_cols]
        if bad:
            raise ValueError(f"{name}: row {row} has target {bad[0]} outside [0, {n_cols})")
        width = max(width, len(tg))
    padded = torch.tensor([list(tg) + [-1] * (width - len(tg)) for tg in targets], dtype=torch.long)  # [R, W]

    # Best target per row: scan the target slots, keeping (highest score, lowest index).
    best_idx = padded[:, 0]
    best_val = scores.gather(1, best_idx[:, None])[:, 0]
    for slot in range(1, width):
        cand = padded[:, slot]
        valid = cand >= 0
        cand_val = scores.gather(1, cand.clamp(min=0)[:, None])[:, 0]
        better = valid & ((cand_val > best_val) | ((cand_val == best_val) & (cand < best_idx)))
        best_idx = torch.where(better, cand, best_idx)
        best_val = torch.where(better, cand_val, best_val)

    columns = torch.arange(n_cols)
    ranks = []
    for start in range(0, n_rows, chunk_rows):
        rows = scores[start : start + chunk_rows]  # [r, C]
        val = best_val[start : start + chunk_rows, None]
        idx = best_idx[start : start + chunk_rows, None]
        higher = (rows > val).sum(dim=1)
        tied_before = ((rows == val) & (columns[None, :] < idx)).sum(dim=1)
        ranks.append(higher + tied_before)
    return torch.cat(ranks).tolist()


def retrieval_ranks(
    scores_i2t: Any,
    txt2img: Sequence[int] | Any,
    img2txt: Sequence[Sequence[int]],
    scores_t2i: Any | None = None,
    *,
    chunk_rows: int = 1024,
) -> RetrievalRanks:
    """Per-query 0-based ranks for image-text retrieval.

    Args:
        scores_i2t: [n_images, n_texts] scores (higher = more similar), torch, numpy or nested lists.
        txt2img: for each text, the index of its image.
        img2txt: for each image, the indices of its captions (several per image).
        scores_t2i: [n_texts, n_images] scores used for image retrieval. LAVIS computes this matrix separately
            (each text re-ranks its own top-k images with ITM), so it need not equal ``scores_i2t.T``;
            defaults to ``scores_i2t.T``.
        chunk_rows: rows compared at once (bounds memory at about chunk_rows * n_columns bytes).

    Text retrieval (TR) rank of an image: the best (smallest) rank among its ground-truth captions in its
    row. Image retrieval (IR) rank of a text: the rank of its image in its row of ``scores_t2i``.

    Ties: a row is ordered by descending score and, among equal scores, by ascending index (a stable
    descending sort), so ties never favour the ground truth over a lower-indexed candidate. LAVIS uses
    ``np.argsort(score)[::-1]`` (numpy's default, unstable quicksort), which leaves tie order unspecified.
    In LAVIS's protocol the only mass ties are the -100 fill of candidates outside the ITM top-k; with
    k_test >= 10 they never change R@1/5/10.
    """
    s_i2t = _score_matrix(scores_i2t, "scores_i2t")
    s_t2i = s_i2t.T if scores_t2i is None else _score_matrix(scores_t2i, "scores_t2i")
    n_images, n_texts = s_i2t.shape
    if tuple(s_t2i.shape) != (n_texts, n_images):
        raise ValueError(f"scores_t2i has shape {tuple(s_t2i.shape)}, expected {(n_texts, n_images)}")
    txt2img = [int(i) for i in (txt2img.tolist() if hasattr(txt2img, "tolist") else txt2img)]
    if len(txt2img) != n_texts:
        raise ValueError(f"txt2img has {len(txt2img)} entries for {n_texts} texts")
    if len(img2txt) != n_images:
        raise ValueError(f"img2txt has {len(img2txt)} entries for {n_images} images")
    img2txt = [[int(t) for t in caps] for caps in img2txt]
    return RetrievalRanks(
        txt=_best_target_ranks(s_i2t, img2txt, "img2txt", chunk_rows),
        img=_best_target_ranks(s_t2i, [[i] for i in txt2img], "txt2img", chunk_rows),
    )


def recall_at_k(ranks: Sequence[int], k: int) -> float:
    """Percentage of queries whose 0-based rank is below k, computed as LAVIS does:
    ``100.0 * len(np.where(ranks < k)[0]) / len(ranks)``."""
    if len(ranks) == 0:
        raise ValueError("recall_at_k: no ranks")
    return 100.0 * sum(1 for r in ranks if r < k) / len(ranks)


def retrieval_metrics_from_ranks(ranks: RetrievalRanks) -> dict[str, float]:
    """The metric dict of `retrieval_metrics` from precomputed ranks."""
    out: dict[str, float] = {}
    for side, side_ranks in (("txt", ranks.txt), ("img", ranks.img)):
        for k in RECALL_KS:
            out[f"{side}_r{k}"] = recall_at_k(side_ranks, k)
        out[f"{side}_r_mean"] = sum(out[f"{side}_r{k}"] for k in RECALL_KS) / len(RECALL_KS)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def retrieval_metrics(
    scores_i2t: Any,
    txt2img: Sequence[int] | Any,
    img2txt: Sequence[Sequence[int]],
    scores_t2i: Any | None = None,
) -> dict[str, float]:
    """Recall percentages for image-text retrieval, as LAVIS reports them.

    Keys: ``txt_r1, txt_r5, txt_r10, txt_r_mean`` (text retrieval: image queries), ``img_r1, img_r5, img_r10,
    img_r_mean`` (image retrieval: text queries) and ``r_mean`` (mean of the two means). LAVIS's extra
    ``agg_metrics`` equals ``txt_r_mean``. Arguments and tie rule: see `retrieval_ranks`.
    """
    return retrieval_metrics_from_ranks(retrieval_ranks(scores_i2t, txt2img, img2txt, scores_t2i))
