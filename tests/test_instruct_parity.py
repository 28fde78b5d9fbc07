"""Instruction-aware stage 2 against transformers' `InstructBlipForConditionalGeneration` (tiny Flan-T5 and tiny
LLaMA, one re-randomised state dict in both through the converter users run, fp32, CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close
from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

from qformer.caption import GenerationConfig
from qformer.checkpoint import load_pretrained, save_pretrained
from qformer.config import Blip2Config, LLMConfig
from qformer.convert import CheckpointError
from qformer.stage2 import Blip2Stage2, init_from_stage1, stage2_state_dict
from tasks.stage2 import lm_loss
from tasks.tiny_assets import tiny_bert_folder, tiny_llama_folder
from tests.llm_helpers import EOS, IMAGE, PAD, TINY_VISION, tiny_t5_folder, word_tokenizer
from tests.test_stage2 import _image_ids, _images

ATOL = 1e-5
PROMPTS = ["Question: what colour is the cat? Short answer:", "a photo of", "Question: how many dog are there?"]
# What the Q-Former reads: per-sample instructions of different lengths (BERT words of the tiny vocabulary).
INSTRUCTIONS = ["a photo of the red square on black background", "the bar", "a green square on the blue bar"]
TEXTS = ["a photo of the cat", "two red dog sitting on the grass", "a bird"]
T5_OUTPUTS = ["cat", "on the grass", "a small bird in the sky"]


def _instruct_cfg(folder, kind: str) -> Blip2Config:
    cfg = Blip2Config.preset("tiny")
    # LLaMA ends on its eos `</s>` (LAVIS's Vicuna appends `eos_token` to targets); OPT's "\n" default is not it.
    end = "</s>" if kind == "llama" else "\n"
    llm = LLMConfig(path=str(folder), dtype="fp32", qformer_instruction=True, end_of_text=end)
    return dataclasses.replace(
        cfg, qformer=cfg.qformer.replace(hidden_dropout=0.0, attention_dropout=0.0), ln_vision_eps=1e-6, llm=llm
    )


def _hf_config(ours: Blip2Stage2) -> InstructBlipConfig:
    q = ours.cfg.qformer
    return InstructBlipConfig(
        vision_config=TINY_VISION,
        qformer_config=dict(
            vocab_size=q.vocab_size,
            hidden_size=q.hidden_size,
            num_hidden_layers=q.num_layers,
            num_attention_heads=q.num_heads,
            intermediate_size=q.intermediate_size,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            layer_norm_eps=q.layer_norm_eps,
            max_position_embeddings=q.max_position_embeddings,
            cross_attention_frequency=q.cross_attention_freq,
            encoder_hidden_size=q.encoder_width,
            pad_token_id=q.pad_token_id,
        ),
        text_config=ours.llm.config.to_dict(),
        num_query_tokens=q.num_query_tokens,
        image_token_index=IMAGE,
    )


@pytest.fixture(scope="module", params=["t5", "llama"])
def pair(request, tmp_path_factory):
    """(ours, transformers' InstructBLIP, kind) with one re-randomised state dict in both."""
    kind = request.param
    path = tmp_path_factory.mktemp(kind)
    folder = tiny_t5_folder(path) if kind == "t5" else tiny_llama_folder(path)
    from transformers import AutoTokenizer

    qtok = AutoTokenizer.from_pretrained(tiny_bert_folder(tmp_path_factory.mktemp("bert")))
    torch.manual_seed(0)
    ours = Blip2Stage2(_instruct_cfg(folder, kind), qformer_tokenizer=qtok)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if not name.startswith("llm."):
                p.normal_(0.0, 0.3)
    ours.eval()
    theirs = InstructBlipForConditionalGeneration(_hf_config(ours)).eval()
    theirs.load_state_dict(stage2_state_dict(ours, "transformers"), strict=True)  # no missing, no unexpected
    return ours, theirs, kind


def test_instructions_are_padded_and_differ_in_length(pair):
    ours, _, _ = pair
    ids, mask = ours.instruction_inputs(INSTRUCTIONS)
    lengths = mask.sum(1).tolist()
    assert len(set(lengths)) == 3 and ids.shape[1] == max(lengths)
    assert (ids[mask == 0] == ours.qformer_tokenizer.pad_token_id).all()


def test_logits_and_loss_match(pair):
    ours, theirs, kind = pair
    images, q = _images(), ours.cfg.qformer.num_query_tokens
    qids, qmask = ours.instruction_inputs(INSTRUCTIONS)
    tok = word_tokenizer("opt" if kind == "llama" else "t5")
    enc = tok(TEXTS if kind == "t5" else [t + "</s>" for t in TEXTS], padding="longest", return_tensors="pt")
    ids, mask = _image_ids(
        [tok(t).input_ids for t in (TEXTS if kind == "t5" else [t + "</s>" for t in TEXTS])], q, "right"
    )
    common = dict(pixel_values=images, qformer_input_ids=qids, qformer_attention_mask=qmask, input_ids=ids)
    if kind == "llama":
        got = ours(enc.input_ids, enc.attention_mask, images=images, instruction_ids=qids, instruction_mask=qmask)
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :q] = -100
        loss = lm_loss(got, labels, shift=True)
        expected = theirs(**common, attention_mask=mask, labels=labels)
    else:
        out = tok(T5_OUTPUTS, padding="longest", return_tensors="pt")
        labels = out.input_ids.masked_fill(out.attention_mask == 0, -100)
        got = ours(
            enc.input_ids,
            enc.attention_mask,
            images=images,
            instruction_ids=qids,
            instruction_mask=qmask,
            decoder_input_ids=ours.llm.prepare_decoder_input_ids_from_labels(labels),
            decoder_attention_mask=out.attention_mask,
        )
        loss = lm_loss(got, labels, shift=False)
        expected = theirs(**common, attention_mask=mask, labels=labels, decoder_attention_mask=out.attention_mask)
    assert_close(got, expected.logits, atol=ATOL, rtol=0)
    assert_close(loss, expected.loss, atol=ATOL, rtol=0)
    # The instruction reaches the LLM: another one gives other logits for the same images and text.
    other = ours.instruction_inputs(INSTRUCTIONS[1:] + INSTRUCTIONS[:1])
    kw = {} if kind == "llama" else dict(decoder_input_ids=ours.llm.prepare_decoder_input_ids_from_labels(labels))
    moved = ours(
        enc.input_ids, enc.attention_mask, images=images, instruction_ids=other[0], instruction_mask=other[1], **kw
    )
    assert (moved - got).abs().max() > 1e-3


@pytest.mark.parametrize("beams", [1, 3])
def test_generated_ids_match_batched_with_padding(pair, beams):
    ours, theirs, kind = pair
    images, q = _images(), ours.cfg.qformer.num_query_tokens
    cfg = GenerationConfig(max_new_tokens=6, min_new_tokens=2, num_beams=beams, length_penalty=-1.0)
    got = ours.generate(PROMPTS, images=images, cfg=cfg, return_ids=True, instructions=INSTRUCTIONS)
    tok = word_tokenizer("opt" if kind == "llama" else "t5")
    side = "right" if kind == "t5" else "left"
    ids, mask = _image_ids([tok(p).input_ids for p in PROMPTS], q, side)
    qids, qmask = ours.instruction_inputs(INSTRUCTIONS)
    expected = theirs.generate(
        pixel_values=images,
        qformer_input_ids=qids,
        qformer_attention_mask=qmask,
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=6,
        min_new_tokens=2,
        num_beams=beams,
        length_penalty=-1.0,
        eos_token_id=EOS,
        pad_token_id=PAD,
        do_sample=False,
    )
    if kind == "llama":
        expected = expected[:, ids.shape[1] :]  # decoder-only: transformers returns the prompt too
    assert got.tolist() == expected.tolist()
    assert len({tuple(row) for row in got.tolist()}) > 1  # the images and instructions really steer the output


def test_prompts_are_the_default_instructions_and_vqa_feeds_the_question(pair):
    ours, _, _ = pair
    images = _images(2)
    cfg = GenerationConfig(max_new_tokens=4, min_new_tokens=1, num_beams=2)
    assert ours.generate(PROMPTS[:2], images=images, cfg=cfg) == ours.generate(
        PROMPTS[:2], images=images, cfg=cfg, instructions=PROMPTS[:2]
    )
    questions = ["what colour is the cat?", "how many dog are there?"]
    prompts = [f"Question: {q} Short answer:" for q in questions]
    answers = ours.predict_answers(questions, images=images, cfg=cfg)
    assert answers == ours.generate(prompts, images=images, cfg=cfg, instructions=prompts)


def test_instructions_are_cut_from_the_left(pair):
    ours, _, _ = pair
    limit = ours.cfg.llm.max_instruction_length
    tok = ours.qformer_tokenizer
    long = " ".join(["bar"] * (limit + 10)) + " red square"
    ids, _ = ours.instruction_inputs([long])
    assert ids.shape[1] == limit
    # [CLS] ... the end of the instruction [SEP]: the question at the end survives.
    assert tok.decode(ids[0], skip_special_tokens=True).endswith("red square")


def test_instruction_is_required_and_refused_where_it_does_not_belong(pair, tmp_path):
    ours, _, kind = pair
    with pytest.raises(ValueError, match="reads an instruction"):
        ours.soft_prompt(images=_images(1))
    plain_cfg = dataclasses.replace(ours.cfg, llm=dataclasses.replace(ours.cfg.llm, qformer_instruction=False))
    plain = Blip2Stage2(plain_cfg, llm=ours.llm, tokenizer=ours.tokenizer)
    assert not plain.cfg.qformer.with_text and not hasattr(plain.qformer.embeddings, "word")  # BLIP-2's query path
    with pytest.raises(ValueError, match="without llm.qformer_instruction"):
        plain.generate(PROMPTS[:1], images=_images(1), instructions=["a photo"])


def test_checkpoint_round_trip_keeps_the_qformer_tokenizer(pair, tmp_path):
    ours, _, _ = pair
    save_pretrained(ours, tmp_path / "ckpt")
    back = load_pretrained(tmp_path / "ckpt")
    assert back.instruct and back.qformer_tokenizer is not None and back.qformer.lm_head is None
    for key, value in ours.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key
    cfg = GenerationConfig(max_new_tokens=4, min_new_tokens=1, num_beams=2)
    assert back.generate(PROMPTS, images=_images(), cfg=cfg) == ours.generate(PROMPTS, images=_images(), cfg=cfg)


def test_init_from_stage1_keeps_the_text_side(pair):
    ours, _, _ = pair
    from qformer.blip2 import Blip2Stage1

    stage1 = Blip2Stage1(dataclasses.replace(ours.cfg, qformer=ours.cfg.qformer.replace(with_text=True)))
    fresh = Blip2Stage2(ours.cfg, llm=ours.llm, tokenizer=ours.tokenizer, qformer_tokenizer=ours.qformer_tokenizer)
    dropped = init_from_stage1(fresh, {f"{k}": v for k, v in stage1.state_dict().items()})
    assert any(k.startswith("qformer.lm_head.") for k in dropped)
    assert not any(".ffn_text." in k or k.startswith("qformer.embeddings.word") for k in dropped)
    assert torch.equal(fresh.qformer.embeddings.word.weight, stage1.qformer.embeddings.word.weight)


def test_transformers_names_are_instructblips(pair):
    ours, _, _ = pair
    hf = stage2_state_dict(ours, "transformers", include_llm=False, include_visual=False)
    assert "qformer.embeddings.word_embeddings.weight" in hf and "qformer.embeddings.layernorm.weight" in hf
    assert "qformer.encoder.layer.0.intermediate.dense.weight" in hf and "qformer.layernorm.weight" not in hf
    with pytest.raises(CheckpointError):  # a plain BLIP-2 file lacks the text side
        from qformer.stage2 import load_stage2_state

        load_stage2_state(ours, {k: v for k, v in hf.items() if "intermediate." not in k}, "transformers")


def test_a_tokenizer_without_pad_pads_with_its_unk():
    from qformer.instruct import default_pad_token

    tok = word_tokenizer("opt")
    tok.pad_token = None
    default_pad_token(tok)
    assert tok.pad_token == "<unk>"
