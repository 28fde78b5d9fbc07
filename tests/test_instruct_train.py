"""Instruction training through the loop: the instruction reaches the Q-Former, the loss is on the answer only,
VQA answers are drawn by annotator count, datasets mix by the square root of their sizes, tiny configs resume."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from qformer.config import Blip2Config, LLMConfig
from qformer.stage2 import Blip2Stage2
from tasks.config import ConfigError, load_config
from tasks.data import MixedDataset
from tasks.data.instructions import InstructedCaptions, check_templates, strip_image_placeholder
from tasks.data.mix import sqrt_size_ratios
from tasks.data.transforms import train_transform
from tasks.data.vqa_train import VQATrainDataset, choose_answer
from tasks.stage2 import IGNORE, Stage2Objective, stage2_outputs, tokenize_stage2
from tasks.tiny_assets import VOCAB, make_all, tiny_llama_folder, tiny_opt_folder, tiny_t5_folder
from tasks.train import train
from tasks.train_data import SeededSamples, TrainLoader
from tests.train_helpers import assert_same_run, tiny_bert_folder

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("instruct_train")
    return {
        "bert": tiny_bert_folder(root / "bert"),
        "opt": tiny_opt_folder(root / "opt"),
        "t5": tiny_t5_folder(root / "t5"),
        "llama": tiny_llama_folder(root / "llama"),
    }


def _model(folders, kind: str, instruct: bool = True) -> Blip2Stage2:
    cfg = Blip2Config.preset("tiny")
    end = "</s>" if kind == "llama" else "\n"
    llm = LLMConfig(path=str(folders[kind]), dtype="fp32", qformer_instruction=instruct, end_of_text=end)
    cfg = dataclasses.replace(cfg, qformer=cfg.qformer.replace(hidden_dropout=0.0, attention_dropout=0.0), llm=llm)
    torch.manual_seed(0)
    qtok = AutoTokenizer.from_pretrained(folders["bert"]) if instruct else None
    model = Blip2Stage2(cfg, qformer_tokenizer=qtok)
    with torch.no_grad():  # large random weights, so that instructions visibly change the loss
        for name, p in model.named_parameters():
            if name.startswith(("qformer.", "llm_proj.")):
                p.normal_(0.0, 0.5)
    return model


def _images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["opt", "t5", "llama"])
def test_the_instruction_reaches_the_qformer_and_its_text_embeddings_learn(folders, kind):
    model = _model(folders, kind)
    images, answers = _images(), ["red", "blue"]

    def loss(instruction: str) -> torch.Tensor:
        batch = {"image": images, "text_input": [instruction] * 2, "text_output": answers}
        return Stage2Objective(model, seed=0)(batch)["loss"]

    a, b = loss("a photo of the red square"), loss("the green bar on black background")
    assert torch.isfinite(a) and not torch.allclose(a, b)
    model.zero_grad()
    a.backward()
    word = model.qformer.embeddings.word.weight.grad
    assert word is not None and word.abs().sum() > 0  # the instruction's tokens get gradients
    assert model.llm_proj.weight.grad.abs().sum() > 0


def test_the_qformer_reads_the_llm_instruction_itself(folders):
    """The objective gives the Q-Former the same text the LLM reads (LAVIS `samples["text_input"]` to both)."""
    model = _model(folders, "opt")
    images, text, answers = _images(), ["what colour is the square ?", "a photo of"], ["red", "blue"]
    got = Stage2Objective(model, seed=0)({"image": images, "text_input": text, "text_output": answers})["loss"]
    want = stage2_outputs(model, text, images=images, text_output=answers, instructions=text, input_truncation="left")[
        "loss"
    ]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_decoder_only_labels_cover_the_answer_and_end_only(folders, kind):
    model = _model(folders, kind)
    text, answers = ["what colour is the square ?", "a photo of the"], ["red", "two blue"]
    batch = tokenize_stage2(model, text, text_output=answers, input_truncation="left")
    q = model.cfg.qformer.num_query_tokens
    end = VOCAB["\n"] if kind == "opt" else VOCAB["</s>"]
    for b, (instr, answer) in enumerate(zip(text, answers, strict=True)):
        instr_ids = model.tokenizer(instr).input_ids  # BOS first
        answer_ids = [VOCAB[w] for w in answer.split()] + [end]
        n = len(instr_ids) + len(answer_ids)
        # [instruction; answer + end] with no padding between; pads after
        assert batch.input_ids[b, :n].tolist() == instr_ids + answer_ids
        assert batch.attention_mask[b].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
        labels = batch.labels[b, q:]
        assert labels[len(instr_ids) : n].tolist() == answer_ids
        assert (labels[: len(instr_ids)] == IGNORE).all() and (labels[n:] == IGNORE).all()
        assert (batch.labels[b, :q] == IGNORE).all()


def test_t5_encoder_reads_the_instruction_and_the_decoder_the_answer(folders):
    model = _model(folders, "t5")
    batch = tokenize_stage2(model, ["what colour is the square ?"], text_output=["red"], input_truncation="left")
    assert batch.input_ids[0].tolist() == model.tokenizer("what colour is the square ?").input_ids
    assert batch.labels[0].tolist() == [VOCAB["red"], VOCAB["</s>"]]


def test_the_instruction_is_cut_from_the_left(folders):
    model = _model(folders, "opt")
    model.cfg.llm.max_text_length = 4
    batch = tokenize_stage2(model, ["a photo of the red square"], text_output=["red"], input_truncation="left")
    keep = [VOCAB["</s>"]] + [VOCAB[w] for w in "the red square".split()]
    assert batch.input_ids[0, :4].tolist() == keep  # BOS, then the end of the instruction


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_answers_are_cut_at_their_own_length(folders, kind):
    """LAVIS's InstructBLIP cuts the instruction at `max_txt_len` (128) and the answer at `max_output_txt_len`
    (256): `max_output_length` here, `max_text_length` when unset."""
    model = _model(folders, kind)
    answer = " ".join(["red", "blue"] * 5)  # 10 words
    q = model.cfg.qformer.num_query_tokens

    def answer_tokens() -> int:
        batch = tokenize_stage2(model, ["what colour ?"], text_output=[answer], input_truncation="left")
        labels = batch.labels[0] if kind == "t5" else batch.labels[0, q:]
        return int((labels != IGNORE).sum())

    model.cfg.llm.max_text_length = 6
    assert answer_tokens() == (6 if kind == "t5" else 5)  # OPT: the tokenizer's BOS counted, then dropped
    model.cfg.llm.max_output_length = 9
    assert answer_tokens() == (9 if kind == "t5" else 8)
    model.cfg.llm.max_output_length = 30
    assert answer_tokens() == 11  # the 10 words and the end token, whole


def test_plain_captions_in_an_instruction_aware_model_give_the_prompt_to_the_qformer(folders):
    model = _model(folders, "opt")
    images, captions = _images(), ["a red square", "a blue bar"]
    got = Stage2Objective(model, seed=0)({"image": images, "text_input": captions})["loss"]
    want = stage2_outputs(model, captions, images=images, instructions=[""] * 2)["loss"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_answers_are_drawn_by_annotator_count():
    answers = ["red"] * 7 + ["blue"] * 2 + ["green"]
    rng = random.Random(0)
    counts = Counter(choose_answer(answers, rng) for _ in range(20_000))
    assert set(counts) == {"red", "blue", "green"}
    for answer, share in (("red", 0.7), ("blue", 0.2), ("green", 0.1)):
        assert abs(counts[answer] / 20_000 - share) < 0.015, counts


def _vqa_files(tmp_path: Path) -> tuple[Path, Path]:
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32), (200, 0, 0)).save(tmp_path / "img" / "7.jpg")
    questions = [{"question_id": 70, "image_id": 7, "question": "What Colour is the square?"}]
    answers = ["red"] * 7 + ["blue"] * 2 + ["green"]
    anns = [{"question_id": 70, "answers": [{"answer": a} for a in answers]}]
    (tmp_path / "q.json").write_text(json.dumps({"questions": questions}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": anns}))
    return tmp_path / "q.json", tmp_path / "a.json"


def test_vqa_samples_format_the_cleaned_question_and_draw_reproducibly(tmp_path):
    q, a = _vqa_files(tmp_path)
    templates = ["<Image>Question: {} Answer:", "Q: {} A:"]
    ds = VQATrainDataset([str(q)], [str(a)], str(tmp_path), "img/{image_id}.jpg", train_transform(28), templates)
    seeded = SeededSamples(ds, seed=3)
    items = [seeded[0] for _ in range(3)]
    question = "what colour is the square?"
    assert items[0]["text_input"] in (f"Question: {question} Answer:", f"Q: {question} A:")
    assert items[0]["text_output"] in ("red", "blue", "green") and items[0]["image"].shape == (3, 28, 28)
    assert all(i["text_input"] == items[0]["text_input"] and i["text_output"] == items[0]["text_output"] for i in items)
    draws = Counter()
    for epoch in range(300):  # the draw changes with the epoch, by the annotator counts
        seeded.set_epoch(epoch)
        draws[seeded[0]["text_output"]] += 1
    assert draws["red"] > draws["blue"] > 0 and draws["red"] > 150


def test_templates_and_the_image_placeholder():
    assert strip_image_placeholder("<Image>A short image caption:") == "A short image caption:"
    assert strip_image_placeholder("Q: {} A:") == "Q: {} A:"
    with pytest.raises(ValueError, match="may only open"):
        strip_image_placeholder("Look at <Image> and answer")
    with pytest.raises(ValueError, match="exactly one"):
        check_templates(["Question: Answer:"], 1, "VQA instructions")
    with pytest.raises(ValueError, match="no {}"):
        check_templates(["A photo of {}"], 0, "caption instructions")
    captions = [{"image": torch.zeros(1), "text_input": "a red square"}]
    item = InstructedCaptions(captions, ["<Image>A photo of"])[0]
    assert (item["text_input"], item["text_output"]) == ("A photo of", "a red square")


def test_sqrt_mixing_on_hand_made_sizes():
    np.testing.assert_allclose(sqrt_size_ratios([100, 400, 900]), np.array([1, 2, 3]) / 6)
    np.testing.assert_allclose(sqrt_size_ratios([100, 400], [2.0, 1.0]), [0.5, 0.5])  # a factor on the sqrt weight
    with pytest.raises(ValueError):
        sqrt_size_ratios([0, 4])
    mixed = MixedDataset([(list(range(100)), 1 / 6), (list(range(400)), 2 / 6), (list(range(900)), 3 / 6)], seed=0)
    assert mixed.quotas.tolist() == [233, 467, 700]  # of an epoch of 1400


def test_the_loader_mixes_by_sqrt_size(tmp_path, monkeypatch):
    assets = make_all(tmp_path / "assets")
    monkeypatch.setenv("QFORMER_TINY", str(assets))
    cfg = load_config(CONFIGS / "tiny" / "instructblip_flant5xl.yaml", [f"output_dir={tmp_path / 'out'}"])
    loader = TrainLoader(cfg, rank=0, world=1, seed=0)
    mixed = loader.dataset.dataset
    sizes = [len(d) for d in mixed.datasets]
    assert sizes == [24, 48]  # 24 captions, 2 questions per image
    np.testing.assert_allclose(mixed.weights, np.sqrt(sizes) / np.sqrt(sizes).sum())
    batch = next(iter(loader))
    assert len(batch["text_input"]) == len(batch["text_output"]) == 4


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.datasets=[{kind: qa, ann_paths: [a.json]}]", "kind must be caption or vqa"),
        ("data.datasets=[{kind: vqa, ann_paths: [a.json], instructions: ['{}']}]", "questions and ann_paths"),
        ("data.datasets=[{kind: vqa, questions: [q.json], ann_paths: [a.json]}]", "needs instructions"),
        (
            "data.datasets=[{ann_paths: [a.json]}, {kind: vqa, questions: [q], ann_paths: [a], instructions: ['{}']}]",
            "mix instruction datasets",
        ),
        ("data.mix=sqrtt", "data.mix must be ratio or sqrt"),
        ("data.datasets=[{ann_paths: [a.json], templates: [x]}]", "templates"),
    ],
)
def test_bad_data_configs_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, ["output_dir=x", override])
    assert "\n" not in str(err.value)


def test_a_tiny_instruction_config_resumes_exactly(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("QFORMER_TINY", str(make_all(tmp_path / "assets")))
    monkeypatch.setenv("QFORMER_TINY_RUNS", str(tmp_path / "runs"))
    train(load_config(CONFIGS / "tiny" / "stage1_vitg.yaml", ["optim.total_steps=2"]))
    train(load_config(CONFIGS / "tiny" / "stage2_vicuna7b.yaml", ["optim.total_steps=2"]))  # what the twin starts from
    steps = ["optim.total_steps=4", "save_every=2", "model.qformer.hidden_dropout=0.1"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(load_config(CONFIGS / "tiny" / "instructblip_vicuna7b.yaml", [*steps, f"output_dir={full}"]))
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints" / "ckpt-00000004")
    log = (resumed / "log.jsonl").read_text().splitlines()
    (resumed / "log.jsonl").write_text("\n".join(log[:3]) + "\n")  # as if killed after step 3
    with caplog.at_level(logging.INFO, logger="tasks.checkpointing"):
        train(load_config(CONFIGS / "tiny" / "instructblip_vicuna7b.yaml", [*steps, f"output_dir={resumed}"]))
    assert any("ckpt-00000002 at step 2" in r.getMessage() for r in caplog.records)
    assert_same_run(full, resumed, 4, ("loss", "lr"))
