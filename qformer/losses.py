"""Stage-1 losses: image-text contrastive (ITC), hard-negative sampling, matching (ITM) and generation (ITG).

Pure functions of features and logits; the model that produces them lives in `qformer/blip2.py` and the
training step that joins both in `tasks/stage1.py`. Shapes: `B` this rank's batch, `W` world size,
`Q` queries, `P` projection width (256), `T` text tokens, `V` vocabulary.

Inputs follow the reference (LAVIS `blip2_qformer.py`): image features are `normalize(vision_proj(query_out))`
`[B, Q, P]`, text features `normalize(text_proj(CLS))` `[B, P]`. Each loss returns a scalar; the caller names
them `loss_itc`, `loss_itm`, `loss_itg` and sums them with equal weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from qformer.dist import all_gather_no_grad, all_gather_with_grad, get_rank

logger = logging.getLogger(__name__)

__all__ = [
    "ITCOutput",
    "clamp_temperature_",
    "hard_negative_indices",
    "itc_loss",
    "itg_labels",
    "itg_loss",
    "itm_labels",
    "itm_loss",
]

GatherMode = Literal["faithful", "connected"]

# BLIP-1 / ALBEF bounds for the learnable temperature: LAVIS's `blip_pretrain.py`, `blip_retrieval.py` and
# `albef_*.py` clamp it to these before every step. BLIP-2's `Blip2Qformer` (`blip2_qformer.py`) never clamps it.
TEMP_MIN = 0.001
TEMP_MAX = 0.5


@dataclass
class ITCOutput:
    """Result of `itc_loss`.

    `sim_i2t` and `sim_t2i` are `[B, B * W]` (rows: this rank's images / texts, columns: the global texts /
    images), already divided by the temperature; they keep their autograd graph. Use them (they are detached
    there) to draw ITM hard negatives with `hard_negative_indices`.
    """

    loss: Tensor
    sim_i2t: Tensor
    sim_t2i: Tensor


def clamp_temperature_(temp: Tensor, min: float = TEMP_MIN, max: float = TEMP_MAX) -> Tensor:
    """Clamp the learnable temperature in place, outside autograd, as LAVIS's BLIP-1 and ALBEF do before each step
    (BLIP-2 never clamps; `tasks/stage1.py` calls this only when the run config's `itc_temp_clamp` asks for it)."""
    with torch.no_grad():
        temp.clamp_(min, max)
    return temp


def _positive_mask(image_ids: Tensor, num_cols: int) -> tuple[Tensor, Tensor]:
    """`[B, B * W]` bool mask of global columns showing the same image as each local row, and the gathered ids."""
    image_ids = image_ids.reshape(-1)
    ids_all = all_gather_no_grad(image_ids)
    if ids_all.numel() != num_cols:
        raise ValueError(f"image_ids: {ids_all.numel()} ids over all ranks for {num_cols} similarity columns")
    return image_ids[:, None] == ids_all[None, :], ids_all


def itc_loss(
    image_feats: Tensor,
    text_feats: Tensor,
    temp: Tensor | float,
    *,
    image_ids: Tensor | None = None,
    gather: GatherMode = "faithful",
    label_smoothing: float = 0.1,
) -> ITCOutput:
    """Image-text contrastive loss over the global batch.

    Args:
        image_feats: `[B, Q, P]` normalised query features of this rank's images.
        text_feats: `[B, P]` normalised [CLS] features of this rank's texts.
        temp: learnable scalar temperature, used as it is (BLIP-2 never clamps it; BLIP-1-style runs clamp it with
            `clamp_temperature_` before the step).
        image_ids: `[B]` optional image ids (retrieval fine-tuning): every global text of the same image is a
            positive of an image and vice versa, with soft targets.
        gather: how the other ranks' features are gathered.
        label_smoothing: 0.1 in the reference, both with and without image ids.

    Similarities: `sim_i2t[b, j] = max_q image_feats[b, q] . text_all[j] / temp` and
    `sim_t2i[b, j] = max_q text_feats[b] . image_all[j, q] / temp`; the positive of local row `b` is the global
    column `rank * B + b`. Loss: cross-entropy with label smoothing each way, averaged.

    Gather modes (the loss value is the same in both; only the gradient differs):

    - ``"faithful"`` (default): reproduces the reference, whose `concat_all_gather` runs under `no_grad` for the
      whole gathered tensor, this rank's rows included. So image->text trains only the image side (texts are
      constants) and text->image only the text side, at every world size: here the "other side" is detached
      even at world size 1 without a process group. It is the default because it is what BLIP-2 was trained
      with (its gradient norms are roughly 40-48% of full autograd), so checkpoints and recipes transfer, and
      it needs no gradient communication in backward.
    - ``"connected"``: full autograd through an autograd-aware all-gather; both directions train both sides.
      The faithful gradient equals the connected gradient of the i2t term w.r.t. the image features plus that
      of the t2i term w.r.t. the text features.
    """
    if gather not in ("faithful", "connected"):
        raise ValueError(f"itc_loss: gather must be 'faithful' or 'connected', got {gather!r}")
    if image_feats.dim() != 3 or text_feats.dim() != 2:
        raise ValueError(
            f"itc_loss: expected image_feats [B, Q, P] and text_feats [B, P], got {tuple(image_feats.shape)} "
            f"and {tuple(text_feats.shape)}"
        )
    batch = image_feats.shape[0]
    if text_feats.shape[0] != batch:
        raise ValueError(f"itc_loss: {batch} images but {text_feats.shape[0]} texts")

    gather_fn = all_gather_no_grad if gather == "faithful" else all_gather_with_grad
    image_all = gather_fn(image_feats)  # [B*W, Q, P]
    text_all = gather_fn(text_feats)  # [B*W, P]

    # Max over queries: the best-matching query decides the image-text similarity.
    sim_i2t = torch.einsum("bqp,np->bnq", image_feats, text_all).amax(-1) / temp  # [B, B*W]
    sim_t2i = torch.einsum("bp,nqp->bnq", text_feats, image_all).amax(-1) / temp  # [B, B*W]

    num_cols = sim_i2t.shape[1]
    logits_i2t, logits_t2i = sim_i2t.float(), sim_t2i.float()
    if image_ids is None:
        targets = get_rank() * batch + torch.arange(batch, device=sim_i2t.device)
        loss_i2t = F.cross_entropy(logits_i2t, targets, label_smoothing=label_smoothing)
        loss_t2i = F.cross_entropy(logits_t2i, targets, label_smoothing=label_smoothing)
    else:
        positive, _ = _positive_mask(image_ids.to(sim_i2t.device), num_cols)
        soft = positive.float()
        soft = soft / soft.sum(1, keepdim=True)  # the own pair is always positive, so the sum is >= 1
        soft = (1.0 - label_smoothing) * soft + label_smoothing / num_cols
        loss_i2t = -(F.log_softmax(logits_i2t, dim=1) * soft).sum(1).mean()
        loss_t2i = -(F.log_softmax(logits_t2i, dim=1) * soft).sum(1).mean()
    return ITCOutput(loss=(loss_i2t + loss_t2i) / 2, sim_i2t=sim_i2t, sim_t2i=sim_t2i)


def _sample_negatives(sim: Tensor, positive: Tensor, own: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row from softmax(sim) with the positives excluded; `[B]` global column indices."""
    batch, num_cols = sim.shape
    rows = torch.arange(batch, device=sim.device)
    # fp32 and finite: fp16 similarities overflow once divided by a small temperature. +inf becomes the
    # largest float (its softmax weight stays dominant), NaN is treated as "not a candidate".
    finfo = torch.finfo(torch.float32)
    logits = torch.nan_to_num(sim.detach().float(), nan=float("-inf"), posinf=finfo.max, neginf=float("-inf"))
    logits = logits.masked_fill(positive, float("-inf"))

    # A row with no candidate left (every column shows the same image, or every score was NaN/-inf) falls
    # back to uniform over the columns other than its own pair, or over all columns if there is only one.
    fallback = torch.zeros_like(logits)
    if num_cols > 1:
        fallback[rows, own] = float("-inf")
    has_candidate = torch.isfinite(logits).any(dim=1, keepdim=True)
    logits = torch.where(has_candidate, logits, fallback)

    weights = torch.softmax(logits, dim=1)  # every row has a finite entry, so no NaN
    # One multinomial call for the whole matrix (the reference loops over rows in Python).
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def hard_negative_indices(
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    *,
    image_ids: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw one hard negative per sample for ITM from the ITC similarities of the global batch.

    Args:
        sim_i2t, sim_t2i: `[B, B * W]` from `ITCOutput` (detached here).
        image_ids: `[B]` optional image ids; with them every column of the same image is a positive and is
            excluded, without them only the own pair `rank * B + b`.
        generator: optional generator on the similarities' device, for reproducible draws.

    Returns:
        `(neg_image_for_text, neg_text_for_image)`, each `[B]` long global column indices: the image drawn
        for each local text (from `sim_t2i`) and the text drawn for each local image (from `sim_i2t`).
        Fetch the rows with `qformer.dist.gather_rows` (image token maps) or by indexing gathered ids.
    """
    batch, num_cols = sim_i2t.shape
    if sim_t2i.shape != sim_i2t.shape:
        raise ValueError(f"hard_negative_indices: shapes differ: {tuple(sim_i2t.shape)} vs {tuple(sim_t2i.shape)}")
    device = sim_i2t.device
    own = get_rank() * batch + torch.arange(batch, device=device)
    if image_ids is None:
        positive = torch.zeros(batch, num_cols, dtype=torch.bool, device=device)
        positive[torch.arange(batch, device=device), own] = True
    else:
        # Image ids belong to pairs, so the same mask serves both directions.
        positive, _ = _positive_mask(image_ids.to(device), num_cols)
    neg_image_for_text = _sample_negatives(sim_t2i, positive, own, generator)
    neg_text_for_image = _sample_negatives(sim_i2t, positive, own, generator)
    return neg_image_for_text, neg_text_for_image


def itm_labels(batch: int, device: torch.device | str | None = None) -> Tensor:
    """`[3B]` labels for the ITM batch order (pos text, pos image), (pos text, neg image), (neg text, pos image)."""
    return torch.cat(
        [torch.ones(batch, dtype=torch.long, device=device), torch.zeros(2 * batch, dtype=torch.long, device=device)]
    )


def itm_loss(logits: Tensor) -> Tensor:
    """Plain cross-entropy on `[3B, 2]` ITM logits in the order of `itm_labels` (1, 0, 0)."""
    if logits.dim() != 2 or logits.shape[1] != 2 or logits.shape[0] % 3 != 0:
        raise ValueError(f"itm_loss: expected logits [3B, 2], got {tuple(logits.shape)}")
    return F.cross_entropy(logits.float(), itm_labels(logits.shape[0] // 3, logits.device))


def itg_labels(input_ids: Tensor, pad_token_id: int, bos_token_id: int) -> tuple[Tensor, Tensor]:
    """Decoder inputs and labels for ITG from tokenised text `[B, T]` that starts with [CLS].

    Returns `(decoder_input_ids, labels)`: the ids with [CLS] replaced by the bos token [DEC], and those ids
    with padding set to -100. Position 0 of the labels is never scored (the loss shifts by one).
    """
    decoder_input_ids = input_ids.clone()
    decoder_input_ids[:, 0] = bos_token_id
    labels = decoder_input_ids.masked_fill(decoder_input_ids == pad_token_id, -100)
    return decoder_input_ids, labels


def itg_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.1) -> Tensor:
    """Shifted causal cross-entropy: `logits[:, :-1]` `[B, T, V]` predict `labels[:, 1:]` `[B, T]`.

    Label smoothing 0.1 (reference), mean over the tokens whose label is not -100; 0 if there are none
    (instead of NaN), computed without a host synchronisation.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"itg_loss: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    targets = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shifted, targets, ignore_index=-100, reduction="sum", label_smoothing=label_smoothing)
    return total / (targets != -100).sum().clamp(min=1)
