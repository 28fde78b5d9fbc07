"""Captioning with the Q-Former LM head: the cached decoders equal searches computed without any cache; the image
is read once per call; the one GenerationConfig of both stages. (Equality with transformers' search over an uncached
reference decoder, for every search: tests/test_generation.py.)"""

import itertools

import pytest
import torch

from qformer.blip2 import Blip2Stage1
from qformer.caption import GenerationConfig, generate, pad_after_end
from qformer.config import Blip2Config
from tests.helpers import randomized, tiny_qformer

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


@pytest.mark.parametrize(
    "cfg",
    [
        GenerationConfig(max_new_tokens=6, min_new_tokens=1, num_beams=1),
        GenerationConfig(max_new_tokens=6, min_new_tokens=1, num_beams=5, num_return_sequences=2),
        GenerationConfig(max_new_tokens=6, min_new_tokens=1, num_beams=1, do_sample=True, num_return_sequences=3),
    ],
    ids=["greedy", "beams", "samples"],
)
def test_the_image_is_read_once_per_generate_call(cfg):
    """One image-encoder pass and one query pass (the only cross-attention) per call, however many beams or samples:
    the decoding steps reuse the query cache."""
    model = randomized(Blip2Stage1(Blip2Config.preset("tiny")), std=0.3)
    calls = {"visual": 0, "cross": 0, "self": 0}

    def count(name):
        def hook(*_):
            calls[name] += 1

        return hook

    model.visual.register_forward_hook(count("visual"))
    model.qformer.layers[0].cross_attn.register_forward_hook(count("cross"))
    model.qformer.layers[0].self_attn.register_forward_hook(count("self"))
    attn = model.qformer.layers[0].self_attn
    step = attn.decode_step

    def counted_step(*args, **kwargs):
        calls["step"] = calls.get("step", 0) + 1
        return step(*args, **kwargs)

    attn.decode_step = counted_step
    images = torch.randn(2, 3, 28, 28)
    ids = model.generate(images, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, cfg=cfg)
    assert ids.shape[0] == 2 * cfg.num_return_sequences
    assert calls["visual"] == 1 and calls["cross"] == 1
    assert calls["self"] == 1  # the query pass
    assert calls["step"] == ids.shape[1]  # then one decoding step per new token (the first reads [DEC])


def test_caption_returns_every_sequence_in_transformers_order():
    model = randomized(Blip2Stage1(Blip2Config.preset("tiny")), std=0.3)
    images = torch.randn(2, 3, 28, 28)
    cfg = GenerationConfig(max_new_tokens=5, min_new_tokens=1, num_beams=3, num_return_sequences=3)
    ids = model.generate(images, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, cfg=cfg)
    for b in range(2):  # image b's sequences are rows 3b .. 3b+2, the best first, as each image alone gets them
        alone = model.generate(images[b : b + 1], bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, cfg=cfg)
        assert torch.equal(ids[3 * b : 3 * b + 3, : alone.shape[1]], alone)


def test_pad_after_end():
    ids = torch.tensor([[7, EOS, EOS, 9], [7, 8, 9, 9], [EOS, 3, EOS, 2]])
    want = torch.tensor([[7, EOS, PAD, PAD], [7, 8, 9, 9], [EOS, PAD, PAD, PAD]])
    assert torch.equal(pad_after_end(ids, EOS, PAD), want)


def test_generation_config_kwargs_and_checks():
    greedy = GenerationConfig(num_beams=1).generate_kwargs(eos_token_id=EOS, pad_token_id=PAD)
    assert not {"length_penalty", "early_stopping", "top_p", "top_k", "temperature"} & set(greedy)
    assert greedy["do_sample"] is False and greedy["eos_token_id"] == EOS and greedy["pad_token_id"] == PAD
    beam = GenerationConfig(num_beams=5, length_penalty=-1.0).generate_kwargs(eos_token_id=EOS, pad_token_id=PAD)
    assert beam["length_penalty"] == -1.0 and beam["early_stopping"] is False and "top_p" not in beam
    sample = GenerationConfig(num_beams=1, do_sample=True, top_p=0.9, temperature=0.7)
    kwargs = sample.generate_kwargs(eos_token_id=EOS, pad_token_id=PAD)
    assert (kwargs["top_p"], kwargs["top_k"], kwargs["temperature"]) == (0.9, 50, 0.7)
    for bad in (dict(top_p=0.0), dict(top_k=-1), dict(temperature=0.0), dict(early_stopping="sometimes")):
        with pytest.raises(ValueError):
            GenerationConfig(**bad)
    with pytest.raises(ValueError, match="num_return_sequences"):
        GenerationConfig(num_beams=2, num_return_sequences=3)
