"""ITG with the query pass's cache, and token-by-token decoding, equal one full multimodal-causal pass."""

import pytest
import torch
from torch.testing import assert_close

from tests.helpers import padded_text, tiny_qformer


@pytest.mark.parametrize("impl", ["direct", "absorbed"])
def test_token_by_token_decoding_equals_one_itg_pass(impl):
    model = tiny_qformer(cross_attention_impl=impl)
    q = model.cfg.num_query_tokens
    ids, _ = padded_text(3, 7, [7, 7, 7], model.cfg.vocab_size)
    image = torch.randn(3, 5, model.cfg.encoder_width)
    full = model(ids, image_embeds=image, causal=True).hidden[:, q:]  # [B, T, D]

    cache = model(image_embeds=image, use_cache=True).cache
    assert cache.query_length == q and cache.length == q
    whole = model.decode(ids, cache).hidden
    assert_close(whole, full, atol=1e-5, rtol=0)

    steps = []
    for t in range(ids.shape[1]):
        out = model.decode(ids[:, t : t + 1], cache)
        cache = out.cache
        steps.append(out.hidden)
    assert cache.length == q + ids.shape[1]
    assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    # Logits through the tied LM head agree too.
    assert_close(model.lm_logits(torch.cat(steps, dim=1)), model.lm_logits(full), atol=1e-4, rtol=0)


def test_decoding_with_padding_and_reordered_cache():
    model = tiny_qformer()
    q = model.cfg.num_query_tokens
    ids, mask = padded_text(2, 5, [5, 3], model.cfg.vocab_size)
    image = torch.randn(2, 5, model.cfg.encoder_width)
    full = model(ids, mask, image_embeds=image, causal=True).hidden[:, q:]
    cache = model(image_embeds=image, use_cache=True).cache
    first = model.decode(ids[:, :2], cache, attention_mask=mask[:, :2])
    second = model.decode(ids[:, 2:], first.cache, attention_mask=mask)
    got = torch.cat([first.hidden, second.hidden], dim=1)
    assert_close(got[0], full[0], atol=1e-5, rtol=0)
    assert_close(got[1, :3], full[1, :3], atol=1e-5, rtol=0)
    # Beam-style reordering: swapping the batch rows of the cache swaps the results.
    swapped = first.cache.index_select(torch.tensor([1, 0]))
    out = model.decode(ids[[1, 0], 2:], swapped, attention_mask=mask[[1, 0]])
    assert_close(out.hidden, second.hidden[[1, 0]], atol=1e-5, rtol=0)


def test_itg_gradients_reach_the_queries_through_the_cache():
    model = tiny_qformer()
    ids, _ = padded_text(2, 4, [4, 4], model.cfg.vocab_size)
    image = torch.randn(2, 5, model.cfg.encoder_width)
    cache = model(image_embeds=image, use_cache=True).cache  # not detached, as in the reference
    model.lm_logits(model.decode(ids, cache).hidden).sum().backward()
    assert model.query_tokens.grad is not None and model.query_tokens.grad.abs().sum() > 0
    cross = model.layers[0].cross_attn
    assert cross.k.weight.grad is not None and cross.k.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("impl", ["direct", "absorbed"])
def test_precomputed_image_keys_values_equal_image_embeds(impl):
    """Retrieval re-ranking forms an image's cross-attention keys/values once for all its candidate texts."""
    model = tiny_qformer(cross_attention_impl=impl)
    ids, mask = padded_text(3, 6, [6, 4, 2], model.cfg.vocab_size)
    image = torch.randn(1, 5, model.cfg.encoder_width)
    kv = model.image_keys_values(image)
    assert kv[1] is None and kv[0][0].shape == (1, model.cfg.num_heads, 5, model.cfg.head_dim)
    shared = [None if t is None else (t[0].expand(3, -1, -1, -1), t[1].expand(3, -1, -1, -1)) for t in kv]
    got = model(ids, mask, image_kv=shared).hidden
    expected = model(ids, mask, image_embeds=image.expand(3, -1, -1)).hidden
    assert_close(got, expected, atol=1e-5, rtol=0)
