"""Stage 2 against transformers' `Blip2ForConditionalGeneration` (tiny OPT and tiny T5, shared weights, fp32)."""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch
from torch.testing import assert_close
from transformers import Blip2Config as HFBlip2Config
from transformers import Blip2ForConditionalGeneration

from qformer.caption import GenerationConfig
from qformer.config import Blip2Config, LLMConfig
from qformer.stage2 import Blip2Stage2, init_from_stage1, stage2_state_dict
from tasks.stage2 import stage2_outputs
from tests.helpers import hf_qformer_config, randomized
from tests.llm_helpers import EOS, IMAGE, PAD, TINY_VISION, tiny_opt_folder, tiny_t5_folder, word_tokenizer

CAPTIONS = ["a photo of the cat", "two red dog sitting on the grass", "a bird"]
PROMPTS = ["Question: what colour is the cat? Short answer:", "a photo of", "Question: how many dog are there?"]


def _folder(kind, tmp_path_factory):
    path = tmp_path_factory.mktemp(kind)
    return tiny_opt_folder(path) if kind == "opt" else tiny_t5_folder(path)


@pytest.fixture(scope="module", params=["opt", "t5"])
def pair(request, tmp_path_factory):
    """(ours, transformers' model, kind) with one re-randomised state dict in both."""
    kind = request.param
    folder = _folder(kind, tmp_path_factory)
    cfg = Blip2Config.preset("tiny")
    cfg = dataclasses.replace(
        cfg,
        qformer=cfg.qformer.replace(hidden_dropout=0.0, attention_dropout=0.0),
        ln_vision_eps=1e-6,
        llm=LLMConfig(path=str(folder), dtype="fp32"),
    )
    torch.manual_seed(0)
    ours = Blip2Stage2(cfg)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if not name.startswith("llm."):
                p.normal_(0.0, 0.3)
    ours.eval()
    qcfg = ours.cfg.qformer
    hf_cfg = HFBlip2Config(
        vision_config=TINY_VISION,
        qformer_config=hf_qformer_config(qcfg, text=False).to_dict(),
        text_config=ours.llm.config.to_dict(),
        num_query_tokens=qcfg.num_query_tokens,
        image_token_index=IMAGE,
    )
    theirs = Blip2ForConditionalGeneration(hf_cfg).eval()
    theirs.load_state_dict(stage2_state_dict(ours, "transformers"), strict=True)
    return ours, theirs, kind


def _images(n=3):
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(5))


def _image_ids(rows: list[list[int]], queries: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' input: `queries` image placeholders before each row's tokens, padded on `side`."""
    rows = [[IMAGE] * queries + r for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[b, span] = torch.tensor(r)
        mask[b, span] = 1
    return ids, mask


def test_logits_and_loss_match(pair):
    ours, theirs, kind = pair
    images = _images()
    q = ours.cfg.qformer.num_query_tokens
    tok = word_tokenizer(kind)
    if kind == "opt":
        got = stage2_outputs(ours, CAPTIONS, images=images)
        rows = [tok(c + "\n").input_ids for c in CAPTIONS]
        ids, mask = _image_ids(rows, q, "right")
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :q] = -100
        expected = theirs(pixel_values=images, input_ids=ids, attention_mask=mask, labels=labels)
    else:
        outputs = ["cat", "on the grass", "a small bird in the sky"]
        got = stage2_outputs(ours, CAPTIONS, images=images, text_output=outputs)
        ids, mask = _image_ids([tok(c).input_ids for c in CAPTIONS], q, "right")
        out = tok(outputs, padding="longest", return_tensors="pt")
        expected = theirs(
            pixel_values=images,
            input_ids=ids,
            attention_mask=mask,
            labels=out.input_ids.masked_fill(out.attention_mask == 0, -100),
            decoder_attention_mask=out.attention_mask,
        )
    assert_close(got["logits"], expected.logits, atol=1e-5, rtol=0)
    assert_close(got["loss"], expected.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("beams", [1, 3])
def test_generation_matches_batched_with_padding(pair, beams):
    ours, theirs, kind = pair
    images = _images()
    q = ours.cfg.qformer.num_query_tokens
    cfg = GenerationConfig(max_new_tokens=6, min_new_tokens=2, num_beams=beams, length_penalty=-1.0)
    got = ours.generate(PROMPTS, images=images, cfg=cfg, return_ids=True)
    tok = word_tokenizer(kind)
    side = "right" if kind == "t5" else "left"
    ids, mask = _image_ids([tok(p).input_ids for p in PROMPTS], q, side)
    eos = EOS if kind == "t5" else tok("\n", add_special_tokens=False).input_ids[0]
    expected = theirs.generate(
        pixel_values=images,
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=6,
        min_new_tokens=2,
        num_beams=beams,
        length_penalty=-1.0,
        eos_token_id=eos,
        pad_token_id=PAD,
        do_sample=False,
    )
    if kind == "opt":
        expected = expected[:, ids.shape[1] :]  # decoder-only: transformers returns the prompt too
    assert got.tolist() == expected.tolist()
    # One at a time gives the same text as the padded batch.
    batched = ours.generate(PROMPTS, images=images, cfg=cfg)
    single = [ours.generate([p], images=images[i : i + 1], cfg=cfg)[0] for i, p in enumerate(PROMPTS)]
    assert batched == single
    assert len(set(batched)) > 1  # the images and prompts really steer the output


def test_vqa_uses_the_prompt_template(pair):
    ours, _, _ = pair
    images = _images(2)
    questions = ["what colour is the cat?", "how many dog are there?"]
    answers = ours.predict_answers(questions, images=images)
    direct = ours.generate(
        [f"Question: {q} Short answer:" for q in questions],
        images=images,
        cfg=GenerationConfig(max_new_tokens=10, min_new_tokens=1, num_beams=5, length_penalty=-1.0),
    )
    assert answers == direct


def test_only_the_query_path_ln_vision_and_projection_train(pair):
    ours, _, kind = pair
    ours.train()
    assert not ours.llm.training and not ours.visual.training
    ours.zero_grad(set_to_none=True)
    stage2_outputs(ours, CAPTIONS, images=_images(), rng=random.Random(0))["loss"].backward()
    for name, p in ours.named_parameters():
        if name.startswith(("llm.", "visual.")):
            assert p.grad is None and not p.requires_grad, name
        elif name.endswith("cross_attn.k.bias"):
            continue  # softmax ignores it: no gradient in the absorbed form, ~0 in the direct one
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert not any(".ffn_text." in n or "embeddings.word" in n for n, _ in ours.named_parameters())
    ours.eval()
    ours.zero_grad(set_to_none=True)


def test_stage2_from_stage1_names_the_text_parts_it_drops(pair):
    from qformer.blip2 import Blip2Stage1

    ours = copy.deepcopy(pair[0])  # the fixture is shared: leave it as it was
    stage1 = randomized(Blip2Stage1(Blip2Config.preset("tiny")))
    dropped = init_from_stage1(ours, stage1.state_dict(), source="stage1.safetensors")
    assert "qformer.embeddings.word.weight" in dropped and "temp" in dropped and "itm_head.weight" in dropped
    assert any(".ffn_text." in k for k in dropped) and not any(".ffn_query." in k for k in dropped)
    assert torch.equal(ours.qformer.query_tokens, stage1.qformer.query_tokens)
    assert torch.equal(ours.qformer.layers[1].ffn_query.fc1.weight, stage1.qformer.layers[1].ffn_query.fc1.weight)
    assert torch.equal(ours.ln_vision.weight, stage1.ln_vision.weight)


def test_t5_refuses_fp16(tmp_path):
    from qformer.stage2 import load_llm

    folder = tiny_t5_folder(tmp_path)
    with pytest.raises(ValueError, match="fp16"):
        load_llm(str(folder), "fp16")
