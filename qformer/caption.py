"""Decoding settings for both stages, and caption generation with the Q-Former's own LM head (stage 1).

One `GenerationConfig` drives both stages' decoding through transformers' `generate`: stage 2 passes
`generate_kwargs` to the LLM's `generate`; stage 1 passes them to `QFormerCaptioner` (qformer/caption_decoder.py),
a thin transformers model around `QFormer.decode` and the tied LM head. Greedy and beam search, sampling, the
length rules, the repetition penalty and `num_return_sequences` are therefore transformers' in both stages.

The image is read once: the query pass's KV cache is computed before `generate`; the first step (`[DEC]`) runs
once per image and its cache is repeated for beams and samples; each later step runs one new text position through
the layers (no cross-attention, which only the queries do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qformer.qformer import KVCache, QFormer


@dataclass
class GenerationConfig:
    """How to decode; the meaning of every field is transformers' (`transformers.GenerationConfig`)."""

    max_new_tokens: int = 30
    min_new_tokens: int = 8  # the end token is forbidden before this many new tokens
    num_beams: int = 5  # 1: greedy search (or plain sampling with do_sample)
    length_penalty: float = 1.0  # beam search ranks finished beams by sum(log p) / length ** length_penalty
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the sequence (CTRL-style)
    # Beam search's stopping rule: False stops an image once no live beam can beat its finished ones (heuristic at
    # the current length), True as soon as num_beams have finished, "never" only when none can beat them at all.
    early_stopping: bool | str = False
    do_sample: bool = False  # sample the next token (with beams: beam-search multinomial sampling)
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens holding this much probability (1 = off)
    top_k: int = 50  # sample among the k most likely tokens (0 = off); 50 is transformers' default
    temperature: float = 1.0  # logits are divided by this before sampling
    # Sequences per input: with beams the n best, with sampling n samples; generate returns B*n rows, each input's n
    # consecutive (transformers' order: rows b*n ... b*n+n-1 belong to input b).
    num_return_sequences: int = 1

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.num_beams < 1 or self.min_new_tokens < 0:
            raise ValueError("max_new_tokens and num_beams must be >= 1, min_new_tokens >= 0")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")
        if not 0 < self.top_p <= 1 or self.top_k < 0 or self.temperature <= 0:
            raise ValueError(
                f"need 0 < top_p <= 1, top_k >= 0 and temperature > 0, got top_p={self.top_p}, top_k={self.top_k}, "
                f"temperature={self.temperature}"
            )
        if self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"num_return_sequences ({self.num_return_sequences}) needs as many beams (num_beams="
                f"{self.num_beams}) or sampling (do_sample)"
            )

    def generate_kwargs(self, *, eos_token_id: int, pad_token_id: int) -> dict:
        """Keyword arguments for transformers' `generate` (both stages use them).

        Beam-only and sampling-only settings are passed only where they act, so that transformers does not warn
        about them and a model's own defaults for them stay untouched otherwise.
        """
        kwargs = dict(
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            num_beams=self.num_beams,
            repetition_penalty=self.repetition_penalty,
            do_sample=self.do_sample,
            num_return_sequences=self.num_return_sequences,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        if self.num_beams > 1:
            kwargs.update(length_penalty=self.length_penalty, early_stopping=self.early_stopping)
        if self.do_sample:
            kwargs.update(top_p=self.top_p, top_k=self.top_k, temperature=self.temperature)
        return kwargs


def pad_after_end(ids: Tensor, eos_token_id: int, pad_token_id: int) -> Tensor:
    """`ids` `[R, T]` with every position after a row's first end token set to the pad id.

    transformers' beam search fills finished rows with the end token when the pad id is 0 (BERT's).
    """
    ended = (ids == eos_token_id).int().cumsum(dim=1)  # [R, T], > 0 from the first end token on
    return ids.masked_fill((ended - (ids == eos_token_id).int()) > 0, pad_token_id)


@torch.inference_mode()  # no autograd bookkeeping at all: a step's many small ops cost less than under no_grad
def generate(
    qformer: QFormer,
    cache: KVCache,
    *,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    cfg: GenerationConfig | None = None,
) -> Tensor:
    """Token ids `[B * num_return_sequences, <= max_new_tokens]` (without the leading `[DEC]`), padded after the end
    token; with num_return_sequences n, rows b*n ... b*n+n-1 are input b's (best beam first).

    cache: the query cache of B images (`QFormer.forward(image_embeds=..., use_cache=True).cache`).
    """
    from qformer.caption_decoder import QFormerCaptioner  # imports transformers

    if cache.text_length:
        raise ValueError(f"expected the queries' cache alone, got {cache.text_length} text positions in it")
    cfg = cfg or GenerationConfig()
    keys = cache.layers[0][0]  # [B, H, Q, d]
    start = torch.full((keys.shape[0], 1), bos_token_id, dtype=torch.long, device=keys.device)  # [DEC]
    kwargs = cfg.generate_kwargs(eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    # The same rule, cheaper: transformers turns min_new_tokens into min_length (prompt + min_new_tokens) and then
    # applies both, each a pass over [R, V] logits every step; the prompt here is `[DEC]` alone.
    kwargs["min_length"] = 1 + kwargs.pop("min_new_tokens")
    ids = QFormerCaptioner(qformer).generate(start, query_cache=cache, **kwargs)  # [B * n, 1 + new tokens]
    return pad_after_end(ids[:, 1:], eos_token_id, pad_token_id)
