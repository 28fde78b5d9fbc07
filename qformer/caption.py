"""Caption generation with the Q-Former's own LM head (stage 1), decoding against the queries' KV cache.

The image is read once: the query pass caches every layer's keys/values, and each new token runs one
text position through the layers (no cross-attention, which only the queries do). Beam search reorders the
cache rows with `KVCache.index_select`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qformer.qformer import KVCache, QFormer


@dataclass
class GenerationConfig:
    max_new_tokens: int = 30
    min_new_tokens: int = 8  # the end token is forbidden before this many new tokens
    num_beams: int = 5
    length_penalty: float = 1.0  # finished beams are ranked by sum(log p) / length ** length_penalty
    repetition_penalty: float = 1.0  # > 1 discourages tokens already generated (CTRL-style, as transformers)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.num_beams < 1 or self.min_new_tokens < 0:
            raise ValueError("max_new_tokens and num_beams must be >= 1, min_new_tokens >= 0")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def _next_log_probs(
    qformer: QFormer, tokens: Tensor, cache: KVCache, history: Tensor, step: int, cfg: GenerationConfig, eos: int
) -> tuple[Tensor, KVCache]:
    out = qformer.decode(tokens, cache)
    logits = qformer.lm_logits(out.hidden[:, -1]).float()  # [R, V]
    if cfg.repetition_penalty != 1.0 and history.numel():
        seen = logits.gather(1, history)
        seen = torch.where(seen < 0, seen * cfg.repetition_penalty, seen / cfg.repetition_penalty)
        logits = logits.scatter(1, history, seen)
    log_probs = logits.log_softmax(dim=-1)
    if step < cfg.min_new_tokens:
        log_probs[:, eos] = float("-inf")
    return log_probs, out.cache


@torch.no_grad()
def generate(
    qformer: QFormer,
    cache: KVCache,
    *,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    cfg: GenerationConfig | None = None,
) -> Tensor:
    """Token ids `[B, <= max_new_tokens]` (without the leading `[DEC]`), padded after the end token.

    cache: the query cache of B images (`QFormer.forward(image_embeds=..., use_cache=True).cache`).
    """
    cfg = cfg or GenerationConfig()
    if cfg.num_beams == 1:
        return _greedy(qformer, cache, bos_token_id, eos_token_id, pad_token_id, cfg)
    return _beam_search(qformer, cache, bos_token_id, eos_token_id, pad_token_id, cfg)


def _greedy(qformer: QFormer, cache: KVCache, bos: int, eos: int, pad: int, cfg: GenerationConfig) -> Tensor:
    batch = cache.layers[0][0].shape[0]
    device = cache.layers[0][0].device
    tokens = torch.full((batch, 1), bos, dtype=torch.long, device=device)
    generated = torch.empty(batch, 0, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(cfg.max_new_tokens):
        log_probs, cache = _next_log_probs(qformer, tokens, cache, generated, step, cfg, eos)
        nxt = log_probs.argmax(dim=-1).masked_fill(done, pad)  # [B]
        generated = torch.cat([generated, nxt[:, None]], dim=1)
        done |= nxt == eos
        tokens = nxt[:, None]
        if bool(done.all()):
            break
    return generated


def _beam_search(qformer: QFormer, cache: KVCache, bos: int, eos: int, pad: int, cfg: GenerationConfig) -> Tensor:
    k = cfg.num_beams
    batch = cache.layers[0][0].shape[0]
    device = cache.layers[0][0].device
    cache = cache.index_select(torch.arange(batch, device=device).repeat_interleave(k))  # [B*K, ...]
    tokens = torch.full((batch * k, 1), bos, dtype=torch.long, device=device)
    sequences = torch.empty(batch * k, 0, dtype=torch.long, device=device)
    # Only the first beam is live at the start, so the first step does not pick the same token K times.
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0
    finished: list[list[tuple[float, Tensor]]] = [[] for _ in range(batch)]

    def normalised(score: float, length: int) -> float:
        return score / (length**cfg.length_penalty)

    for step in range(cfg.max_new_tokens):
        log_probs, cache = _next_log_probs(qformer, tokens, cache, sequences, step, cfg, eos)
        vocab = log_probs.shape[-1]
        total = (scores.view(-1, 1) + log_probs).view(batch, k * vocab)  # [B, K*V]
        top_scores, top_index = total.topk(2 * k, dim=1)  # 2K so that K survive even if K of them end here
        beam_of, token_of = top_index // vocab, top_index % vocab
        new_scores = torch.full((batch, k), float("-inf"), device=device)
        new_rows = torch.zeros(batch, k, dtype=torch.long, device=device)
        new_tokens = torch.full((batch, k), pad, dtype=torch.long, device=device)
        for b in range(batch):
            kept = 0
            for score, beam, token in zip(
                top_scores[b].tolist(), beam_of[b].tolist(), token_of[b].tolist(), strict=True
            ):
                if score == float("-inf"):
                    break
                row = b * k + beam
                if token == eos:
                    if len(finished[b]) < k or normalised(score, step + 1) > min(s for s, _ in finished[b]):
                        seq = torch.cat([sequences[row], sequences.new_tensor([eos])])
                        finished[b].append((normalised(score, step + 1), seq))
                        finished[b] = sorted(finished[b], key=lambda x: -x[0])[:k]
                    continue
                new_scores[b, kept], new_rows[b, kept], new_tokens[b, kept] = score, row, token
                kept += 1
                if kept == k:
                    break
        rows = new_rows.view(-1)
        sequences = torch.cat([sequences[rows], new_tokens.view(-1, 1)], dim=1)
        cache = cache.index_select(rows)
        scores = new_scores
        tokens = new_tokens.view(-1, 1)
        # Stop once every item holds K finished hypotheses and its best live beam, normalised at the current
        # length, cannot beat the worst of them (the heuristic of transformers' beam search by default).
        best_live = scores.max(dim=1).values
        if all(
            len(finished[b]) == k and normalised(best_live[b].item(), step + 1) <= finished[b][-1][0]
            for b in range(batch)
        ):
            break
    outputs = []
    for b in range(batch):
        if not finished[b]:  # nothing ended within max_new_tokens: take the best live beam
            row = b * k + int(scores[b].argmax())
            finished[b].append((normalised(scores[b].max().item(), sequences.shape[1]), sequences[row]))
        outputs.append(max(finished[b], key=lambda x: x[0])[1])
    width = max(len(s) for s in outputs)
    result = torch.full((batch, width), pad, dtype=torch.long, device=device)
    for b, seq in enumerate(outputs):
        result[b, : len(seq)] = seq
    return result
