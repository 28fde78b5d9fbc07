"""One stage-1 training step: captions tokenised, the model's features joined with the ITC, ITM and ITG losses
(equal weights).

Runs unchanged at world size 1 without a process group and under torchrun: the ITC negatives and the
hard-negative pool are the global batch (DESIGN.md section 4). `Stage1Objective` has the interface of
`tasks.stage2.Stage2Objective`, so the training loop never asks which stage it runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qformer.blip2 import Blip2Stage1
from qformer.dist import all_gather_no_grad, gather_rows, get_world_size
from qformer.flops import stage1_shares_image_kv
from qformer.losses import clamp_temperature_, hard_negative_indices, itc_loss, itg_labels, itg_loss, itm_loss


def _pad_to(x: Tensor, length: int, value: int) -> Tensor:
    return F.pad(x, (0, length - x.shape[1]), value=value) if x.shape[1] < length else x


def stage1_losses(
    model: Blip2Stage1,
    input_ids: Tensor,  # [B, T], starting with [CLS]
    attention_mask: Tensor,  # [B, T]
    *,
    images: Tensor | None = None,  # [B, 3, H, W]
    image_tokens: Tensor | None = None,  # [B, N, E] frozen-encoder outputs, instead of images
    image_ids: Tensor | None = None,  # [B]: pairs of the same image are all positives (retrieval fine-tuning)
    bos_token_id: int,
    generator: torch.Generator | None = None,
    temp_clamp: tuple[float, float] | None = None,
) -> dict[str, Tensor]:
    """{"loss", "loss_itc", "loss_itm", "loss_itg"} for one batch of image-text pairs.

    temp_clamp: None (BLIP-2: LAVIS's `Blip2Qformer` never clamps the ITC temperature), or (min, max) to clamp it
    in place before the step as BLIP-1 and ALBEF do ((0.001, 0.5) there).
    """
    if (images is None) == (image_tokens is None):
        raise ValueError("pass exactly one of images or image_tokens")
    cfg = model.cfg
    pad_id = cfg.qformer.pad_token_id
    if get_world_size() > 1:
        # Text is gathered across ranks for ITM negatives: every rank pads to the same length.
        input_ids = _pad_to(input_ids, cfg.max_text_length, pad_id)
        attention_mask = _pad_to(attention_mask, cfg.max_text_length, 0)

    if temp_clamp is not None:
        clamp_temperature_(model.temp, *temp_clamp)
    image_embeds = model.encode_image(images) if images is not None else model.embed_image_tokens(image_tokens)
    # The image's cross-attention keys/values, formed once for its four query passes (ITC, ITM's three pairs) where
    # that is cheaper than each pass attending on its own (qformer.flops.stage1_shares_image_kv).
    world = get_world_size()
    kv = None
    if stage1_shares_image_kv(cfg.qformer, image_embeds.shape[1], world):
        kv = model.qformer.image_keys_values(image_embeds)  # per layer 2 x [B, H, N, d]
    image = model.image_features(None if kv else image_embeds, use_cache=True, image_kv=kv)  # feats, ITG cache
    text = model.text_features(input_ids, attention_mask)  # feat [B, P]

    # ITC over the global batch.
    itc = itc_loss(image.feats, text.feat, model.temp, image_ids=image_ids, gather=cfg.itc_gather)

    # ITM: one hard negative image per text and one hard negative text per image, from the global batch.
    neg_image, neg_text = hard_negative_indices(itc.sim_i2t, itc.sim_t2i, image_ids=image_ids, generator=generator)
    text_ids_neg = all_gather_no_grad(input_ids)[neg_text]  # [B, T]
    text_mask_neg = all_gather_no_grad(attention_mask)[neg_text]
    itm_ids = torch.cat([input_ids, input_ids, text_ids_neg])  # [3B, T]
    itm_mask = torch.cat([attention_mask, attention_mask, text_mask_neg])
    if kv is None:
        image_embeds_neg = gather_rows(image_embeds, neg_image)  # [B, N, E], only the drawn rows cross ranks
        itm_images = torch.cat([image_embeds, image_embeds_neg, image_embeds])  # [3B, N, E]
        loss_itm = itm_loss(model.itm_logits(itm_images, itm_ids, itm_mask))
    else:
        if world == 1:
            kv_neg = [None if layer is None else (layer[0][neg_image], layer[1][neg_image]) for layer in kv]
        else:
            kv_neg = model.qformer.image_keys_values(gather_rows(image_embeds, neg_image))
        itm_kv = [None if a is None else (torch.cat([a[0], b[0], a[0]]), torch.cat([a[1], b[1], a[1]]))
                  for a, b in zip(kv, kv_neg, strict=True)]  # fmt: skip
        loss_itm = itm_loss(model.itm_logits(None, itm_ids, itm_mask, image_kv=itm_kv))

    # ITG: [DEC] replaces [CLS]; decode against the query cache (not detached).
    decoder_ids, labels = itg_labels(input_ids, pad_token_id=pad_id, bos_token_id=bos_token_id)
    loss_itg = itg_loss(model.itg_logits(image.cache, decoder_ids, attention_mask), labels)

    loss = itc.loss + loss_itm + loss_itg
    return {"loss": loss, "loss_itc": itc.loss.detach(), "loss_itm": loss_itm.detach(), "loss_itg": loss_itg.detach()}


class Stage1Objective:
    """The training loop's stage-1 step: a batch of images and captions (and image ids) to named losses."""

    def __init__(
        self,
        model: Blip2Stage1,
        tokenizer,
        *,
        max_text_length: int,
        use_image_ids: bool,
        temp_clamp: tuple[float, float] | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length
        self.use_image_ids = use_image_ids
        self.temp_clamp = temp_clamp  # None: the ITC temperature is never clamped (BLIP-2)

    def __call__(self, batch: dict) -> dict[str, Tensor]:
        images = batch["image"]
        # LAVIS pads every caption to max_text_length; padding to the batch's longest gives the same losses (pad
        # keys are masked out of attention, pad labels ignored) at a fraction of the text passes' cost.
        enc = self.tokenizer(
            batch["text_input"],
            padding="longest",
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
        ).to(images.device)
        return stage1_losses(
            self.model,
            enc.input_ids,
            enc.attention_mask,
            images=images,
            image_ids=batch["image_id"].to(images.device) if self.use_image_ids else None,
            bos_token_id=self.tokenizer.bos_token_id,
            temp_clamp=self.temp_clamp,
        )

    def state_dict(self) -> dict:
        return {}  # its random draws (negatives, dropout) come from torch's generators, saved with every rank's

    def load_state_dict(self, state: dict) -> None:
        pass
