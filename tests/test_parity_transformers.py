"""Our Q-Former vs transformers' own BLIP-2 classes, one re-randomised state dict loaded into both (fp32, CPU).

transformers' random init leaves `query_tokens` at zero, so every weight comes from our re-randomised model
through the converter users run (`qformer.convert`).
"""

import pytest
import torch
from torch.testing import assert_close
from transformers import Blip2ForImageTextRetrieval, Blip2QFormerModel

from qformer import QFormer
from qformer.convert import load_qformer, qformer_state_dict, split_transformers_qformer
from tests.helpers import hf_blip2_config, hf_qformer_config, padded_text, tiny_qformer

ATOL = 1e-5


IMPLS = ["direct", "absorbed"]  # the tiny config would pick "direct" by itself: test both ways of cross-attending


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("freq", [1, 2])
@pytest.mark.parametrize("with_text", [False, True])
def test_queries_only_matches_blip2_qformer_model(freq, with_text, impl):
    ours = tiny_qformer(cross_attention_freq=freq, with_text=with_text, num_layers=3, cross_attention_impl=impl)
    inner, rest = split_transformers_qformer(qformer_state_dict(ours, "transformers"))
    theirs = Blip2QFormerModel(hf_qformer_config(ours.cfg, text=with_text)).eval()
    theirs.load_state_dict(inner, strict=True)  # every key and shape, both ways

    image = torch.randn(3, 7, ours.cfg.encoder_width)
    expected = theirs(query_embeds=rest["query_tokens"].expand(3, -1, -1), encoder_hidden_states=image)
    assert_close(ours(image_embeds=image).hidden, expected.last_hidden_state, atol=ATOL, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("freq", [1, 2])
def test_padded_image_tokens_match(freq, impl):
    ours = tiny_qformer(cross_attention_freq=freq, with_text=False, cross_attention_impl=impl)
    inner, rest = split_transformers_qformer(qformer_state_dict(ours, "transformers"))
    theirs = Blip2QFormerModel(hf_qformer_config(ours.cfg, text=False)).eval()
    theirs.load_state_dict(inner, strict=True)
    image = torch.randn(2, 6, ours.cfg.encoder_width)
    image_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    expected = theirs(
        query_embeds=rest["query_tokens"].expand(2, -1, -1),
        encoder_hidden_states=image,
        encoder_attention_mask=image_mask,
    ).last_hidden_state
    got = ours(image_embeds=image, image_mask=image_mask).hidden
    assert_close(got, expected, atol=ATOL, rtol=0)
    # The mask must matter, or this test could not tell a broken mask from a working one.
    assert (ours(image_embeds=image).hidden[1] - got[1]).abs().max() > 1e-3


def _retrieval_pair(freq: int, impl: str = "auto"):
    ours = tiny_qformer(cross_attention_freq=freq, cross_attention_impl=impl)
    theirs = Blip2ForImageTextRetrieval(hf_blip2_config(ours.cfg)).eval()
    missing, unexpected = theirs.load_state_dict(qformer_state_dict(ours, "transformers"), strict=False)
    assert unexpected == []
    # Only the parts outside the Q-Former (ViT, projections, ITM head) stay transformers' own.
    assert all(k.startswith(("vision_model.", "vision_projection.", "text_projection.", "itm_head.")) for k in missing)
    return ours, theirs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("freq", [1, 2])
def test_itm_joint_pass_matches_retrieval_qformer_path(freq, impl):
    ours, theirs = _retrieval_pair(freq, impl)
    q = ours.cfg.num_query_tokens
    ids, mask = padded_text(3, 6, [6, 4, 2], ours.cfg.vocab_size)
    image = torch.randn(3, 5, ours.cfg.encoder_width)

    embeds = theirs.embeddings(input_ids=ids, query_embeds=theirs.query_tokens.expand(3, -1, -1))
    expected = theirs.qformer(
        query_embeds=embeds,
        query_length=q,
        attention_mask=torch.cat([torch.ones(3, q, dtype=torch.long), mask], dim=1),
        encoder_hidden_states=image,
        encoder_attention_mask=torch.ones(3, 5, dtype=torch.long),
    ).last_hidden_state
    assert_close(ours(ids, mask, image_embeds=image).hidden, expected, atol=ATOL, rtol=0)


def test_text_only_pass_matches_retrieval_text_path():
    ours, theirs = _retrieval_pair(2)
    ids, mask = padded_text(3, 6, [6, 3, 1], ours.cfg.vocab_size)
    expected = theirs.qformer(
        query_embeds=theirs.embeddings(input_ids=ids), query_length=0, attention_mask=mask
    ).last_hidden_state
    assert_close(ours(ids, mask).hidden, expected, atol=ATOL, rtol=0)


def test_lavis_names_round_trip_exactly_and_load_strictly():
    ours = tiny_qformer()
    lavis = qformer_state_dict(ours, "lavis")
    # What a LAVIS file carries beside the weights: the tied decoder and a position-id buffer.
    assert torch.equal(
        lavis["Qformer.cls.predictions.decoder.weight"], lavis["Qformer.bert.embeddings.word_embeddings.weight"]
    )
    assert "Qformer.bert.encoder.layer.0.crossattention.self.query.weight" in lavis
    assert "Qformer.bert.encoder.layer.1.intermediate_query.dense.weight" in lavis
    lavis["Qformer.bert.embeddings.position_ids"] = torch.arange(ours.cfg.max_position_embeddings)[None]

    restored = QFormer(ours.cfg).eval()
    load_qformer(restored, lavis, "lavis", source="test-lavis")
    before, after = ours.state_dict(), restored.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key

    ids, mask = padded_text(2, 5, [5, 3], ours.cfg.vocab_size)
    image = torch.randn(2, 4, ours.cfg.encoder_width)
    assert_close(
        restored(ids, mask, image_embeds=image).hidden, ours(ids, mask, image_embeds=image).hidden, atol=0, rtol=0
    )


def test_transformers_names_round_trip():
    ours = tiny_qformer()
    hf = qformer_state_dict(ours, "transformers")
    restored = tiny_qformer()
    # transformers has no Q-Former LM head: loading its names must name those keys as missing.
    with pytest.raises(ValueError, match="lm_head.bias"):
        load_qformer(restored, hf, "transformers")
    stage2 = tiny_qformer(with_text=False)
    hf2 = qformer_state_dict(stage2, "transformers")
    fresh = QFormer(stage2.cfg)
    load_qformer(fresh, hf2, "transformers")
    for key, value in stage2.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
