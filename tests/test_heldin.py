"""InstructBLIP's other held-in sets converted to the formats training reads (tasks/data/heldin.py): hand-made files
in each dataset's own layout, converted, then read by the real training datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tasks.data import CaptionDataset
from tasks.data.heldin import convert, main
from tasks.data.transforms import eval_transform
from tasks.data.vqa_train import VQATrainDataset

AOKVQA = [
    {
        "split": "train",
        "image_id": 299207,
        "question_id": "22MexNkBPpdZGX6sxbxVBH",
        "question": "What is the man by the bags awaiting?",
        "choices": ["skateboarder", "train", "delivery", "cab"],
        "correct_choice_idx": 3,
        "direct_answers": ["ride", "ride", "bus", "taxi", "travelling", "traffic", "taxi", "cab", "cab", "his ride"],
        "difficult_direct_answer": False,
        "rationales": ["A train would not be on the street."],
    }
]
OCRVQA = {
    "0001": {"imageURL": "http://x/0001.jpg", "questions": ["Who wrote this book?", "Is this a comedy book?"],
             "answers": ["Jane Doe", "No"], "title": "T", "authorName": "Jane Doe", "genre": "G", "split": 1},
    "0002": {"imageURL": "http://x/0002.jpg", "questions": ["What is the title?"], "answers": ["Val"], "split": 2},
}  # fmt: skip
TEXTCAPS = {
    "dataset_type": "train",
    "data": [
        {"image_id": "011e7e629fb9ae7b", "image_path": "train/011e7e629fb9ae7b.jpg", "caption_id": 1,
         "caption_str": "A sign that says Stop.", "image_classes": ["Sign"]},
        {"image_id": "011e7e629fb9ae7b", "image_path": "train/011e7e629fb9ae7b.jpg", "caption_id": 2,
         "caption_str": "A red stop sign on a pole.", "image_classes": ["Sign"]},
    ],
}  # fmt: skip


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (200, 0, 0)).save(path)


def test_aokvqa_direct_answers_become_the_ten_answers(tmp_path):
    src = tmp_path / "aokvqa.json"
    src.write_text(json.dumps(AOKVQA))
    files = convert("aokvqa", str(src), str(tmp_path / "out"))
    _image(tmp_path / "coco" / "train2017" / "000000299207.jpg")
    ds = VQATrainDataset(
        [files["questions"]], [files["annotations"]], str(tmp_path / "coco"), "train2017/{image_id:012d}.jpg",
        eval_transform(16), ["Question: {} Short answer:"],
    )  # fmt: skip
    assert len(ds) == 1
    path, question, answers, _, qid = ds.samples[0]
    assert (question, answers, qid) == (AOKVQA[0]["question"], AOKVQA[0]["direct_answers"], AOKVQA[0]["question_id"])
    item = ds[0]
    assert item["text_input"] == "Question: what is the man by the bags awaiting? Short answer:"
    assert item["text_output"] in AOKVQA[0]["direct_answers"]


def test_ocrvqa_keeps_one_split_and_every_question_of_a_book(tmp_path):
    src = tmp_path / "dataset.json"
    src.write_text(json.dumps(OCRVQA))
    files = convert("ocrvqa", str(src), str(tmp_path / "out"))
    _image(tmp_path / "images" / "0001.jpg")
    ds = VQATrainDataset(
        [files["questions"]], [files["annotations"]], str(tmp_path / "images"), "{image_id}.jpg", eval_transform(16),
        ["{}"],
    )  # fmt: skip
    assert [(q, a) for _, q, a, _, _ in ds.samples] == [
        ("Who wrote this book?", ["Jane Doe"]),
        ("Is this a comedy book?", ["No"]),
    ]
    assert ds.num_images == 1
    val = json.loads(Path(convert("ocrvqa", str(src), str(tmp_path / "val"), split=2)["questions"]).read_text())
    assert [q["question"] for q in val["questions"]] == ["What is the title?"]


def test_textcaps_captions_read_as_training_captions(tmp_path):
    src = tmp_path / "textcaps.json"
    src.write_text(json.dumps(TEXTCAPS))
    files = convert("textcaps", str(src), str(tmp_path / "out"))
    _image(tmp_path / "textvqa" / "train" / "011e7e629fb9ae7b.jpg")
    ds = CaptionDataset([files["captions"]], str(tmp_path / "textvqa"), eval_transform(16))
    assert len(ds) == 2
    assert {ds[i]["text_input"] for i in range(2)} == {"a sign that says stop", "a red stop sign on a pole"}


@pytest.mark.parametrize(
    "kind, content, message",
    [
        ("aokvqa", {"questions": []}, "expected A-OKVQA's list"),
        ("aokvqa", [{"question_id": "x", "image_id": 1, "question": "q?"}], "entry 0 needs"),
        ("ocrvqa", {"1": {"questions": ["a?", "b?"], "answers": ["x"], "split": 1}}, "2 questions and 1 answers"),
        ("textcaps", {"data": [{"image_id": "a", "caption_str": "c"}]}, "entry 0 needs image_id, image_path"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, capsys, kind, content, message):
    src = tmp_path / "in.json"
    src.write_text(json.dumps(content))
    assert main([kind, str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and str(src) in err and len(err.splitlines()) == 1
    assert main([kind, str(tmp_path / "missing.json"), str(tmp_path / "out")]) == 2
    assert "missing.json" in capsys.readouterr().err
