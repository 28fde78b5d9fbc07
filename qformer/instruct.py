"""Instruction-aware stage 2 (InstructBLIP; BLIP-2's VQA fine-tuning): the Q-Former reads the instruction too.

    [queries; instruction tokens] --Q-Former (bidirectional self-attention; only the queries cross-attend to the
    image; query FFN for the queries, text FFN for the instruction)--> hidden [B, Q + T, D] --[:, :Q]--> llm_proj

The instruction is tokenised with the Q-Former's own (BERT) tokenizer, cut from the left to at most
`LLMConfig.max_instruction_length` tokens (LAVIS `blip2_t5_instruct.py` / `blip2_vicuna_instruct.py`:
`init_tokenizer(truncation_side="left")`, `max_txt_len=128`, `padding="longest"`). The LLM is given the
instruction/prompt text as well, exactly as for plain BLIP-2 (`Blip2Stage2.generation_inputs`).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def tokenize_instructions(
    tokenizer, instructions: list[str], max_length: int, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """(ids `[B, T]`, mask `[B, T]`): each instruction in the Q-Former's tokens, padded on the right to the longest
    and cut from the left (the end of an instruction, where the question sits, is what LAVIS keeps)."""
    if tokenizer is None:
        raise ValueError(
            "this model reads instructions but has no Q-Former tokenizer: pass qformer_tokenizer= (the BERT "
            "tokenizer saved with the checkpoint) or give instruction_ids"
        )
    if isinstance(instructions, str):
        instructions = [instructions]
    # The call does not take truncation_side; set it for this call only, so a tokenizer shared with stage-1 code
    # (captioning, retrieval: LAVIS truncates those on the right) keeps its own setting.
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        enc = tokenizer(
            list(instructions),
            padding="longest",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
            padding_side="right",
        )
    finally:
        tokenizer.truncation_side = side
    ids, mask = enc.input_ids, enc.attention_mask
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))


def instruction_queries(
    qformer, image_embeds: Tensor, instruction_ids: Tensor, instruction_mask: Tensor | None = None
) -> Tensor:
    """The query outputs `[B, Q, D]` of one joint pass over `[queries; instruction]` (the instruction's own outputs
    are dropped, as `last_hidden_state[:, :Q]` in LAVIS and transformers' `InstructBlip*.get_image_features`)."""
    if instruction_ids.shape[0] != image_embeds.shape[0]:
        raise ValueError(f"{instruction_ids.shape[0]} instructions for {image_embeds.shape[0]} images")
    if instruction_mask is None:
        instruction_mask = torch.ones_like(instruction_ids)
    hidden = qformer(instruction_ids, instruction_mask, image_embeds=image_embeds).hidden  # [B, Q + T, D]
    return hidden[:, : qformer.cfg.num_query_tokens]


def default_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token (LLaMA's) one it already has, so batches can be padded. The pads are
    masked out, so their id never reaches a result; LAVIS adds a new `[PAD]` row to Vicuna instead (and turns it
    into `</s>` in the generated ids), transformers' converted InstructBLIP-Vicuna folders carry that `[PAD]`."""
    if tokenizer.pad_token is not None:
        return
    fallback = tokenizer.unk_token or tokenizer.eos_token
    if fallback is None:
        raise ValueError("the language model's tokenizer has no pad, unk or eos token to pad batches with")
    logger.info("language model tokenizer has no pad token: padding with %r (masked out)", fallback)
    tokenizer.pad_token = fallback
