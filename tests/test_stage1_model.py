"""The stage-1 model against transformers' `Blip2ForImageTextRetrieval`, checkpoint round trips, paper size."""

import dataclasses

import pytest
import torch
from torch.testing import assert_close
from transformers import Blip2ForImageTextRetrieval

from qformer.blip2 import Blip2Stage1, load_stage1_state, stage1_state_dict
from qformer.config import Blip2Config
from tests.helpers import hf_blip2_config, padded_text, randomized


def tiny_stage1(**qformer_changes) -> Blip2Stage1:
    cfg = Blip2Config.preset("tiny")
    qcfg = cfg.qformer.replace(hidden_dropout=0.0, attention_dropout=0.0, **qformer_changes)
    # transformers' post_layernorm takes the vision eps (1e-6); LAVIS's ln_vision uses 1e-5.
    cfg = dataclasses.replace(cfg, qformer=qcfg, ln_vision_eps=1e-6)
    torch.manual_seed(0)
    return randomized(Blip2Stage1(cfg), std=0.3)


def _inputs(model, batch=3):
    g = torch.Generator().manual_seed(7)
    images = torch.randn(batch, 3, 28, 28, generator=g)
    ids, mask = padded_text(batch, 6, [6, 4, 2][:batch], model.cfg.qformer.vocab_size)
    return images, ids, mask


@pytest.mark.parametrize("impl", ["direct", "absorbed"])
def test_itc_and_itm_match_transformers_retrieval_model(impl):
    ours = tiny_stage1(cross_attention_impl=impl)
    theirs = Blip2ForImageTextRetrieval(hf_blip2_config(ours.cfg.qformer)).eval()
    theirs.config.image_text_hidden_size = ours.cfg.embed_dim
    theirs.load_state_dict(stage1_state_dict(ours, "transformers"), strict=True)
    images, ids, mask = _inputs(ours)

    with torch.no_grad():
        itc = theirs(pixel_values=images, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
        itm = theirs(pixel_values=images, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        image_embeds = ours.encode_image(images)
        sim = ours.itc_similarity(ours.image_features(image_embeds).feats, ours.text_features(ids, mask).feat)
        logits = ours.itm_logits(image_embeds, ids, mask)
    assert_close(sim, itc.logits_per_image, atol=1e-5, rtol=0)
    assert_close(logits, itm.logits_per_image, atol=1e-5, rtol=0)
    # The pairs are not all alike, so a wrong mask or head could not pass by accident.
    assert sim.std() > 1e-3 and logits.std() > 1e-3


def test_lavis_stage1_and_finetuned_layouts_round_trip():
    source = tiny_stage1()
    images, ids, mask = _inputs(source)
    expected = source.itm_logits(source.encode_image(images), ids, mask)

    pretrained = stage1_state_dict(source, "lavis", include_visual=False)  # like blip2_pretrained.pth
    assert not any(k.startswith("visual_encoder.") for k in pretrained)
    assert {"query_tokens", "temp", "ln_vision.weight", "vision_proj.weight", "itm_head.bias"} <= pretrained.keys()
    target = tiny_stage1()
    target.visual.load_state_dict(source.visual.state_dict())  # the frozen ViT comes from its own file
    load_stage1_state(target, pretrained, "lavis", source="blip2_pretrained.pth")
    assert_close(target.itm_logits(target.encode_image(images), ids, mask), expected, atol=0, rtol=0)

    finetuned = stage1_state_dict(source, "lavis")  # like a COCO fine-tuned file, visual_encoder.* included
    assert any(k.startswith("visual_encoder.blocks.") for k in finetuned)
    target = tiny_stage1()
    target.qformer.reset_parameters()
    load_stage1_state(target, finetuned, "lavis", source="finetuned.pth", require_visual=True)
    assert_close(target.itm_logits(target.encode_image(images), ids, mask), expected, atol=0, rtol=0)

    del finetuned["itm_head.weight"]
    with pytest.raises(ValueError, match="itm_head.weight"):
        load_stage1_state(tiny_stage1(), finetuned, "lavis", source="broken.pth")


def test_transformers_round_trip_names_what_it_lacks():
    source = tiny_stage1()
    hf = stage1_state_dict(source, "transformers")
    assert "vision_model.post_layernorm.weight" in hf and "temp" not in hf
    target = tiny_stage1()
    load_stage1_state(target, hf, "transformers", require_visual=True)
    images, ids, mask = _inputs(source)
    assert_close(
        target.itm_logits(target.encode_image(images), ids, mask),
        source.itm_logits(source.encode_image(images), ids, mask),
        atol=0,
        rtol=0,
    )


def test_extract_features_and_match_agree_with_the_pieces():
    model = tiny_stage1()
    images, ids, mask = _inputs(model)
    image = model.extract_features(images, mode="image")
    text = model.extract_features(input_ids=ids, attention_mask=mask, mode="text")
    multi = model.extract_features(images, ids, mask, mode="multimodal")
    embeds = model.encode_image(images)
    assert_close(image.image_embeds_proj, model.image_features(embeds).feats)
    assert_close(text.text_embeds_proj, model.text_features(ids, mask).feat)
    assert_close(multi.multimodal_embeds, model.multimodal_output(embeds, ids, mask))
    sim = model.itc_similarity(image.image_embeds_proj, text.text_embeds_proj)
    assert_close(model.match(images, ids, mask, head="itc"), sim.diagonal())
    probs = model.match(images, ids, mask, head="itm")
    assert_close(probs, model.itm_logits(embeds, ids, mask).softmax(-1)[:, 1])
    with pytest.raises(ValueError, match="needs an image"):
        model.extract_features(input_ids=ids, mode="image")


def test_paper_stage1_parameter_count():
    with torch.device("meta"):
        model = Blip2Stage1(Blip2Config.preset("paper"))
    trainable = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("visual."))
    frozen = sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual."))
    print(f"stage-1 Q-Former side {trainable / 1e6:.2f}M, frozen ViT-g {frozen / 1e6:.1f}M")
    assert 186e6 <= trainable <= 189e6, trainable  # the paper's 188M
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("visual."))
    assert 980e6 < frozen < 990e6  # EVA ViT-g/14, 39 blocks
