"""Attention modes: the drawn masks are the masks, and the model honours them (each test can fail)."""

import torch
from torch.testing import assert_close

from qformer.masks import self_attention_mask
from tests.helpers import padded_text, tiny_qformer


def _allowed(mask):
    return (mask == 0).int()[:, 0]  # [B, rows, cols], 1 = may attend


def test_masks_match_the_drawings():
    text_mask = torch.tensor([[1, 1, 0]])
    itc_text = _allowed(self_attention_mask(0, text_mask))
    assert itc_text.expand(1, 3, 3).tolist() == [[[1, 1, 0]] * 3]
    itm = _allowed(self_attention_mask(2, text_mask))
    assert itm.expand(1, 5, 5).tolist() == [[[1, 1, 1, 1, 0]] * 5]
    itg = _allowed(self_attention_mask(2, text_mask, causal=True))
    assert itg.tolist() == [
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0],
        ]
    ]
    # Decoding: only the newest rows, against every cached column.
    last = _allowed(self_attention_mask(2, text_mask, causal=True, num_rows=1))
    assert last.tolist() == [[[1, 1, 1, 1, 0]]]
    # Nothing masked: no mask at all, so SDPA may take its fastest kernel.
    assert self_attention_mask(2, torch.ones(1, 3)) is None
    assert self_attention_mask(4, None, batch_size=2, text_length=3) is None


def test_itg_later_text_never_changes_earlier_outputs_or_queries():
    model = tiny_qformer()
    ids, mask = padded_text(2, 6, [6, 6], model.cfg.vocab_size)
    image = torch.randn(2, 5, model.cfg.encoder_width)
    changed = ids.clone()
    changed[:, 4:] = (ids[:, 4:] % 50) + 7  # new later tokens
    q = model.cfg.num_query_tokens
    a = model(ids, mask, image_embeds=image, causal=True).hidden
    b = model(changed, mask, image_embeds=image, causal=True).hidden
    assert_close(a[:, : q + 4], b[:, : q + 4], atol=1e-6, rtol=0)
    assert (a[:, q + 4 :] - b[:, q + 4 :]).abs().max() > 1e-3
    # Queries in ITG mode are the queries-only pass: they never see text.
    assert_close(a[:, :q], model(image_embeds=image).hidden, atol=1e-6, rtol=0)
    # Whereas in ITM mode the same change reaches every position (so the check above can fail).
    c = model(ids, mask, image_embeds=image).hidden
    d = model(changed, mask, image_embeds=image).hidden
    assert (c[:, :q] - d[:, :q]).abs().max() > 1e-3


def test_itc_queries_and_text_never_interact():
    model = tiny_qformer()
    ids, mask = padded_text(2, 5, [5, 3], model.cfg.vocab_size)
    image = torch.randn(2, 5, model.cfg.encoder_width)
    other_image = torch.randn(2, 5, model.cfg.encoder_width)
    text = model(ids, mask).hidden  # the text side takes no image at all
    queries = model(image_embeds=image).hidden
    # The query pass is a function of the image alone...
    assert (queries - model(image_embeds=other_image).hidden).abs().max() > 1e-3
    # ...while the joint ITM pass mixes text into the queries and the image into the text.
    joint = model(ids, mask, image_embeds=image).hidden
    q = model.cfg.num_query_tokens
    assert (joint[:, :q] - queries).abs().max() > 1e-3
    assert (joint[:, q:] - text).abs().max() > 1e-3


def test_padding_never_changes_real_outputs():
    model = tiny_qformer()
    ids, mask = padded_text(2, 6, [6, 3], model.cfg.vocab_size)
    image = torch.randn(2, 5, model.cfg.encoder_width)
    garbage = ids.clone()
    garbage[1, 3:] = torch.tensor([11, 12, 13])  # different tokens in the padded slots
    q = model.cfg.num_query_tokens
    for kwargs, offset in (({}, 0), ({"image_embeds": image}, q), ({"image_embeds": image, "causal": True}, q)):
        a = model(ids, mask, **kwargs).hidden
        b = model(garbage, mask, **kwargs).hidden
        assert_close(a[1, : offset + 3], b[1, : offset + 3], atol=1e-6, rtol=0)
        assert_close(a[0], b[0], atol=0, rtol=0)
        if not kwargs.get("causal"):
            # Without the mask the padded tokens would leak: the test can fail. (Causally, right padding comes
            # after every real token, so there the causal mask alone already hides it.)
            c = model(garbage, None, **kwargs).hidden
            assert (a[1, : offset + 3] - c[1, : offset + 3]).abs().max() > 1e-3
    # A shorter sequence without padding equals the padded one on its real tokens.
    short = model(ids[1:, :3], None, image_embeds=image[1:]).hidden
    assert_close(short[0], model(ids, mask, image_embeds=image).hidden[1, : q + 3], atol=1e-5, rtol=0)
