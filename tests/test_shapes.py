"""The shapes world (tasks/shapes/world.py) and its stage 0 (tasks/shapes/stage0.py): deterministic files in the real
datasets' formats, answers that are right for their images, and frozen components that learned something and load
through the real code paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.shapes.world import (
    CELL_NAMES,
    COLOURS,
    IMAGE_SIZE,
    SIZES,
    load_scenes,
    read_corpus,
    write_world,
)

SMALL = dict(n_train=24, n_val=10, n_test=10, seed=3, n_corpus=30)
PLURAL = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("world"), **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_world_is_deterministic(world, tmp_path):
    again = write_world(tmp_path / "again", **SMALL)
    first, second = _files(Path(world["root"])), _files(Path(again["root"]))
    assert first.keys() == second.keys()
    manifest = first.pop("world.json"), second.pop("world.json")
    assert json.loads(manifest[0])["params"] == json.loads(manifest[1])["params"]
    assert first == second
    other = write_world(tmp_path / "other", **dict(SMALL, seed=4))
    assert Path(other["scenes"]).read_bytes() != Path(world["scenes"]).read_bytes()


def _answer(objects: list[dict], question: str) -> str:
    """The answer worked out here from the scene description, asserting that it is unique."""
    words = question.rstrip("?").split()
    if question.startswith("what colour is the "):
        found = [o for o in objects if o["shape"] == words[-1] and (words[-2] not in SIZES or o["size"] == words[-2])]
        assert len(found) == 1, (question, objects)
        return found[0]["colour"]
    if question.startswith("what shape is "):
        found = [o for o in objects if CELL_NAMES[(o["row"], o["col"])] == question[len("what shape is ") : -1]]
        assert len(found) == 1, (question, objects)
        return found[0]["shape"]
    if question == "how many objects are there?":
        return str(len(objects))
    if question.startswith("how many "):
        return str(sum(o["shape"] == PLURAL[words[2]] for o in objects))
    assert question.startswith("is there a "), question
    return "yes" if any(o["colour"] == words[-2] and o["shape"] == words[-1] for o in objects) else "no"


def test_scenes_images_captions_and_answers_agree(world):
    scenes = {sc["image_id"]: sc for sc in json.loads(Path(world["scenes"]).read_text())}
    assert len(scenes) == 44
    for sc in scenes.values():
        objects = sc["objects"]
        assert 1 <= len(objects) <= 3
        assert len({(o["row"], o["col"]) for o in objects}) == len(objects)  # one object per cell: no overlap
        image = np.asarray(Image.open(Path(world["image_root"]) / sc["image"]).convert("RGB")).astype(int)
        assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        cell = IMAGE_SIZE // 3
        for o in objects:
            x0, y0, x1, y1 = o["box"]
            assert (
                o["col"] * cell <= x0 < x1 < (o["col"] + 1) * cell
                and o["row"] * cell <= y0 < y1 < (o["row"] + 1) * cell
            )
            # Every shape covers the centre of its box (the cross's arms cross there): the pixel is the object's colour.
            centre = image[(y0 + y1) // 2, (x0 + x1) // 2]
            assert np.abs(centre - np.array(COLOURS[o["colour"]])).max() < 40, (sc["image"], o)
        corners = image[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert np.abs(corners - sc["background"]).max() < 12  # plain dark background
        for caption in sc["captions"]:
            for o in objects:
                assert f"{o['size']} {o['colour']} {o['shape']}" in caption
                assert CELL_NAMES[(o["row"], o["col"])] in caption
        assert len(set(sc["captions"])) == len(sc["captions"]) == 5

    questions = json.loads(Path(world["test_questions"]).read_text())["questions"]
    annotations = {a["question_id"]: a for a in json.loads(Path(world["test_annotations"]).read_text())["annotations"]}
    assert len(questions) == len(annotations) > 0
    types = set()
    for q in questions:
        ann = annotations[q["question_id"]]
        sc = scenes[q["image_id"]]
        assert sc["split"] == "test" and ann["image_id"] == q["image_id"]
        answer = _answer(sc["objects"], q["question"])
        assert ann["multiple_choice_answer"] == answer
        assert [a["answer"] for a in ann["answers"]] == [answer] * 10
        assert (
            ann["answer_type"]
            == {"colour": "other", "shape": "other", "count": "number", "exists": "yes/no"}[ann["question_type"]]
        )
        types.add(ann["question_type"])
    assert types == {"colour", "shape", "count", "exists"}

    # The language models' corpus: the training images' scenes first, every answer right.
    corpus = read_corpus(world["corpus"])
    assert len(corpus) == SMALL["n_train"] + SMALL["n_corpus"]
    for sc, paragraph in zip(load_scenes(world, "train"), corpus, strict=False):
        assert [c for c, _ in paragraph] == sc["captions"]
        objects = [vars(o) for o in sc["objects"]]
        for _, qa in paragraph:
            assert all(_answer(objects, q) == a for q, a in qa)


def test_real_loaders_read_the_world(world):
    from pycocotools.coco import COCO

    from tasks.data import CaptionDataset, eval_transform
    from tasks.evals.metrics import vqa_metrics
    from tasks.evals.retrieval import load_retrieval_data
    from tasks.evals.vqa import load_vqa_annotations, load_vqa_questions

    train = CaptionDataset(world["train_captions"], world["image_root"], eval_transform(IMAGE_SIZE))
    assert len(train) == 5 * SMALL["n_train"] and train.num_images == SMALL["n_train"]
    item = train[7]
    assert item["image"].shape == (3, IMAGE_SIZE, IMAGE_SIZE) and "skipped" not in item
    assert item["text_input"] == json.loads(Path(world["train_captions"]).read_text())[7]["caption"]

    data = load_retrieval_data(world["test_retrieval"], world["image_root"])
    assert len(data.images) == SMALL["n_test"] and len(data.texts) == 5 * SMALL["n_test"]
    assert all(Path(p).is_file() for p in data.images)
    assert data.img2txt[0] == [0, 1, 2, 3, 4] and data.txt2img[:6] == [0, 0, 0, 0, 0, 1]

    questions = load_vqa_questions(world["test_questions"], world["image_root"], world["image_pattern"])
    annotations = load_vqa_annotations(world["test_annotations"])
    assert all(Path(q.image_path).is_file() for q in questions)
    perfect = {q.question_id: annotations[q.question_id]["multiple_choice_answer"] for q in questions}
    assert vqa_metrics(perfect, annotations)["overall"] == pytest.approx(100.0)

    coco = COCO()
    coco.dataset = json.loads(Path(world["test_coco_gt"]).read_text())
    coco.createIndex()
    first = json.loads(Path(world["test_retrieval"]).read_text())[0]
    assert [a["caption"] for a in coco.imgToAnns[first["image_id"]]] == first["caption"]


# ------------------------------------------------------------------------------------------------------ stage 0


@pytest.fixture(scope="module")
def stage0(shapes_demo):
    """The fast stage 0 that `qformer demo --fast` built (tasks.shapes.stage0.build_stage0, preset "fast")."""
    result = json.loads((shapes_demo / "stage0" / "stage0.json").read_text())
    assert result["preset"] == "fast"
    return result


def test_stage0_vit_learned_and_loads_frozen(stage0):
    from qformer.config import VisionConfig
    from qformer.vision import build_vision_encoder
    from tasks.shapes.stage0 import evaluate_vit, normalize_images

    metrics = stage0["vit_metrics"]
    # An object is right when its shape, colour, size and cell all are: 1 in 360 by chance.
    assert metrics["object_all"] > 0.8 > 100 * metrics["chance_object_all"]
    assert metrics["object_colour"] > 0.9 and metrics["count"] > 0.6

    cfg = VisionConfig(**stage0["vit_config"])
    assert cfg.weights == stage0["vit"] and cfg.weights_format == "timm" and cfg.frozen
    encoder = build_vision_encoder(cfg)
    image = Image.open(Path(stage0["world"]["image_root"]) / "00000.jpg")
    tokens = encoder(normalize_images(torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]))
    assert tokens.shape == (1, 37, stage0["qformer_config"]["encoder_width"]) and not tokens.requires_grad
    # The saved weights, loaded the way stages 1 and 2 load them, keep their accuracy on unseen test images.
    test = evaluate_vit(stage0["world"], stage0["vit"], "test")
    assert test["object_all"] > 0.8


def test_stage0_language_models_answer_from_the_caption(stage0):
    from qformer.stage2 import load_llm
    from tasks.shapes.stage0 import evaluate_lm

    for name in ("opt", "t5"):
        metrics = stage0[f"{name}_metrics"]
        # Held-out scenes, text only: the caption must help clearly; without it the model can only guess.
        assert metrics["qa_caption"] > metrics["qa_no_caption"] + 0.15, (name, metrics)
        assert metrics["qa_caption_count"] > 0.6, (name, metrics)
        llm, tokenizer = load_llm(stage0[name], "fp32")
        assert llm.config.is_encoder_decoder == (name == "t5")
        assert len(tokenizer("\n", add_special_tokens=False).input_ids) == 1
        ids = tokenizer("a big red circle at the top").input_ids
        assert tokenizer.unk_token_id not in ids
        assert (ids[0] == tokenizer.eos_token_id) == (name == "opt") and (ids[-1] == tokenizer.eos_token_id) == (
            name == "t5"
        )
        # The folder, loaded back, answers as the model that was saved.
        again = evaluate_lm(llm, tokenizer, stage0["world"]["corpus_val"], modes=("caption",))
        assert again["qa_caption"] == pytest.approx(metrics["qa_caption"])
    t5 = json.loads((Path(stage0["t5"]) / "config.json").read_text())
    # Flan-T5's shape: gated-GELU, decoder outputs not rescaled before the LM head (T5 v1.1).
    assert t5["feed_forward_proj"] == "gated-gelu" and t5["scale_decoder_outputs"] is False


def test_stage0_bert_fits_the_qformer(stage0):
    from qformer import QFormer, QFormerConfig
    from qformer.bert import init_from_bert, load_tokenizer

    cfg = QFormerConfig(**stage0["qformer_config"])
    tokenizer = load_tokenizer(stage0["bert"])
    assert len(tokenizer) == cfg.vocab_size and tokenizer.bos_token_id == cfg.vocab_size - 1
    model = QFormer(cfg)
    report = init_from_bert(model, stage0["bert"])
    assert "embeddings.word.weight" in report["loaded"] and "lm_head.bias" in report["loaded"]
    for caption in json.loads(Path(stage0["world"]["test_retrieval"]).read_text())[0]["caption"]:
        ids = tokenizer(caption).input_ids
        assert tokenizer.unk_token_id not in ids and len(ids) <= 35
    question = tokenizer("Question: what colour is the circle? Short answer: red").input_ids
    assert tokenizer.unk_token_id not in question


def test_shapes_configs_fit_the_full_stage0(tmp_path, monkeypatch):
    """configs/shapes/*.yaml, run by hand after `python -m tasks.shapes.stage0 runs/shapes/stage0`, describe the
    components that the full preset builds (the demo passes the same values as overrides)."""
    from dataclasses import asdict

    from tasks.config import load_config
    from tasks.evals.config import load_eval_config
    from tasks.shapes.stage0 import PRESETS, bert_folder, qformer_config, vit_config

    full = PRESETS["full"]
    bert = bert_folder(tmp_path / "bert", full.bert_hidden, full.bert_layers)
    want_q = qformer_config(bert, full.vit_width)
    want_v = asdict(vit_config(full.vit_width, full.vit_depth))
    monkeypatch.setenv("SHAPES_ROOT", str(tmp_path / "run"))
    root = Path(__file__).resolve().parents[1] / "configs" / "shapes"
    for name in ("stage1", "stage2_opt", "stage2_t5"):
        cfg = load_config(root / f"{name}.yaml", [])
        q, v = asdict(cfg.model.qformer), asdict(cfg.model.vision)
        assert {k: q[k] for k in want_q if k != "initializer_range"} == {
            k: v for k, v in want_q.items() if k != "initializer_range"
        }, name
        assert q["initializer_range"] == pytest.approx(want_q["initializer_range"], abs=1e-4)
        assert {k: v[k] for k in want_v if k != "weights"} == {k: x for k, x in want_v.items() if k != "weights"}
        assert v["weights"] == str(tmp_path / "run" / "stage0" / "vit.pth")
        assert cfg.data.datasets[0].image_root == str(tmp_path / "run" / "stage0" / "world" / "images")
    for name in ("eval_retrieval", "eval_caption", "eval_vqa"):
        cfg = load_eval_config(str(root / f"{name}.yaml"), [])
        assert cfg.image_root == str(tmp_path / "run" / "stage0" / "world" / "images")
