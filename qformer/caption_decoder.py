"""The Q-Former's LM (stage 1) as a transformers decoder, so that transformers' `generate` runs the search.

Nothing here searches: greedy, beam search, sampling, the length and repetition rules and `num_return_sequences`
are transformers' (`GenerationMixin.generate`). This model only answers "logits of the next token" against a cache:

    step 1   input_ids [R, 1] ([DEC])  + query_cache (B images, read once)    -> logits [R, 1, V], SharedQueryCache
    step t   input_ids [R, 1] (newest) + SharedQueryCache so far          -> logits [R, 1, V], grown cache

R = B * k, k = max(num_beams, num_return_sequences): transformers repeats every input k times, image b's rows being
b*k ... b*k+k-1. How the cache travels:
- The queries' cache (`KVCache` of B rows) is the model kwarg `query_cache`. It is not a tensor, so transformers
  leaves it alone; step 1 runs `[DEC]` once per image (all k rows of an image hold the same `[DEC]`) and repeats the
  text part of the result for the image's k rows. No step re-reads the image or re-runs the query pass.
- Steps decode against a `SharedQueryCache`: the queries' keys/values once per image, the text's per row, so
  neither a step nor a beam reorder copies the queries' part (`QFormer.decode_shared`).
- The grown cache is returned as `cache` in each step's output; transformers hands it back to the next step
  (`_update_model_kwargs_for_generation`) and, in beam search, to `_reorder_cache` (`SharedQueryCache.index_select`).
  `_supports_default_dynamic_cache` is False so that transformers makes no `DynamicCache` of its own.
- Positions: the text positions start at 0 (`[DEC]`) after the queries, which have none; `QFormer.decode` takes
  them from the cache's text length, so the model needs no `position_ids` or `attention_mask` (no prompt, no pads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from qformer.qformer import KVCache, QFormer, SharedQueryCache


@dataclass
class CaptionStepOutput(ModelOutput):
    logits: Tensor | None = None  # [R, 1, V], the next token only
    cache: SharedQueryCache | None = None  # queries (B rows) + every text token fed so far (R rows)


class QFormerCaptioner(PreTrainedModel, GenerationMixin):
    """`QFormer.decode` + the tied LM head behind transformers' generation interface (holds no weights of its own)."""

    main_input_name = "input_ids"

    def __init__(self, qformer: QFormer):
        cfg = qformer.cfg
        super().__init__(PretrainedConfig(vocab_size=cfg.vocab_size, pad_token_id=cfg.pad_token_id))
        self.qformer = qformer

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is our SharedQueryCache, made by the first step

    def prepare_inputs_for_generation(
        self, input_ids: Tensor, cache: SharedQueryCache | None = None, query_cache: KVCache | None = None, **kwargs
    ) -> dict:
        # The cache holds every fed token but the newest one (step 1: no cache yet, input_ids is [DEC] alone).
        return {
            "input_ids": input_ids if cache is None else input_ids[:, -1:],
            "cache": cache,
            "query_cache": query_cache,
        }

    def forward(
        self,
        input_ids: Tensor,  # [R, 1]: [DEC] in step 1, then the newest token
        cache: SharedQueryCache | None = None,  # None in step 1
        query_cache: KVCache | None = None,  # the queries' cache, B rows: read in step 1 only
        return_dict: bool = True,
    ) -> CaptionStepOutput:
        if cache is None:
            return self._first_step(input_ids, query_cache)
        hidden, cache = self.qformer.decode_shared(input_ids, cache)  # [R, 1, D], the cache one position longer
        return CaptionStepOutput(logits=self._next_token_logits(hidden), cache=cache)

    def _first_step(self, input_ids: Tensor, query_cache: KVCache) -> CaptionStepOutput:
        """`[DEC]` against the queries, once per image, repeated for the image's k rows (beams or samples)."""
        batch = query_cache.layers[0][0].shape[0]
        k = input_ids.shape[0] // batch
        hidden, cache = self.qformer.decode_shared(input_ids[::k], SharedQueryCache.of(query_cache))  # [B, 1, D]
        rows = torch.arange(batch, device=input_ids.device).repeat_interleave(k)  # [R]: image b at b*k ... b*k+k-1
        logits = self._next_token_logits(hidden).index_select(0, rows)
        return CaptionStepOutput(logits=logits, cache=cache.index_select(rows, rows_per_image=k))

    def _next_token_logits(self, hidden: Tensor) -> Tensor:  # [R, 1, D] -> [R, 1, V]
        return self.qformer.lm_logits(hidden[:, -1])[:, None]  # a 2-D matmul is a little faster than [R, 1, D]

    def _reorder_cache(self, cache: SharedQueryCache, beam_idx: Tensor) -> SharedQueryCache:
        """Beam search: row r of the next step continues row `beam_idx[r]` of this one."""
        return cache.index_select(beam_idx)
