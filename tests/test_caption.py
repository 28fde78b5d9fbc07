"""Captioning with the Q-Former LM head: the cached decoders equal searches computed without any cache."""

import itertools

import torch

from qformer.caption import GenerationConfig, generate
from tests.helpers import tiny_qformer

PAD, EOS, BOS = 0, 4, 5


def _model_and_cache(vocab=6, batch=2):
    model = tiny_qformer(vocab_size=vocab)
    image = torch.randn(batch, 5, model.cfg.encoder_width)
    return model, image, model(image_embeds=image, use_cache=True).cache


@torch.no_grad()
def _log_probs_without_cache(model, image, prefix):
    """log p(next | [DEC] + prefix) from one full multimodal-causal pass, no KV cache."""
    ids = torch.tensor([[BOS, *prefix]])
    hidden = model(ids, image_embeds=image, causal=True).hidden[:, -1]
    return model.lm_logits(hidden)[0].float().log_softmax(-1)


def test_greedy_equals_argmax_without_cache():
    model, image, cache = _model_and_cache(vocab=100)
    cfg = GenerationConfig(max_new_tokens=6, min_new_tokens=2, num_beams=1)
    got = generate(model, cache, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, cfg=cfg)
    for b in range(image.shape[0]):
        prefix = []
        for step in range(cfg.max_new_tokens):
            lp = _log_probs_without_cache(model, image[b : b + 1], prefix)
            if step < cfg.min_new_tokens:
                lp[EOS] = float("-inf")
            prefix.append(int(lp.argmax()))
            if prefix[-1] == EOS:
                break
        assert got[b, : len(prefix)].tolist() == prefix
        assert (got[b, len(prefix) :] == PAD).all()


def test_wide_beam_search_equals_exhaustive_search():
    vocab, steps = 6, 3
    model, image, cache = _model_and_cache(vocab=vocab)
    cfg = GenerationConfig(max_new_tokens=steps, min_new_tokens=1, num_beams=vocab**2, length_penalty=1.0)
    got = generate(model, cache, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, cfg=cfg)
    for b in range(image.shape[0]):
        best, best_seq = float("-inf"), None
        # Every sequence that ends with EOS within `steps`, or runs to `steps` without it; EOS barred at step 0.
        for length in range(1, steps + 1):
            for seq in itertools.product(range(vocab), repeat=length):
                if EOS in seq[:-1] or (length < steps and seq[-1] != EOS) or seq[0] == EOS:
                    continue
                score = sum(
                    float(_log_probs_without_cache(model, image[b : b + 1], list(seq[:t]))[seq[t]])
                    for t in range(length)
                )
                if score / length > best:
                    best, best_seq = score / length, list(seq)
        assert got[b, : len(best_seq)].tolist() == best_seq, (got[b].tolist(), best_seq)


def test_min_length_and_repetition_penalty():
    model, image, cache = _model_and_cache(vocab=100)
    out = generate(
        model,
        cache,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        cfg=GenerationConfig(max_new_tokens=8, min_new_tokens=8, num_beams=3),
    )
    assert out.shape[1] == 8 and not (out == EOS).any()
    plain = generate(
        model,
        cache,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        cfg=GenerationConfig(max_new_tokens=12, min_new_tokens=12, num_beams=1),
    )
    penalised = generate(
        model,
        cache,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        cfg=GenerationConfig(max_new_tokens=12, min_new_tokens=12, num_beams=1, repetition_penalty=1e6),
    )
    # An enormous penalty forbids repeats; without it a random tiny model repeats itself.
    assert all(len(set(row.tolist())) == len(row) for row in penalised)
    assert any(len(set(row.tolist())) < len(row) for row in plain)
