"""InstructBLIP's other held-in training sets, converted to the two formats training reads.

    python -m tasks.data.heldin aokvqa  /data/aokvqa/aokvqa_v1p0_train.json  runs/heldin/aokvqa
    python -m tasks.data.heldin ocrvqa  /data/ocrvqa/dataset.json            runs/heldin/ocrvqa
    python -m tasks.data.heldin textcaps /data/textcaps/TextCaps_0.1_train.json runs/heldin/textcaps

A-OKVQA and OCR-VQA become VQAv2-format `questions.json` + `annotations.json` (`kind: vqa`, `tasks.data.vqa_train`);
TextCaps becomes a caption JSON (`captions.json`, the training caption format). Each run prints the
`data.datasets` entry to add (give it `instructions`, e.g. the VQA or caption templates of
configs/instructblip_*.yaml).

- A-OKVQA (`aokvqa_v1p0_train.json`: a list of {question_id, image_id, question, direct_answers, ...}): the ten
  direct answers are the annotation's answers (the multiple-choice fields are left out, as InstructBLIP trains on
  the direct answers); images are COCO 2017, `train2017/{image_id:012d}.jpg`.
- OCR-VQA (`dataset.json`: {book id: {questions, answers, split, imageURL, ...}}, split 1 = train, 2 = val,
  3 = test): every question of the chosen split with its one answer; images `{book id}.jpg` as its download script
  saves them.
- TextCaps (`TextCaps_0.1_train.json`: {"data": [{image_id, image_path, caption_str, ...}]}): one caption entry per
  caption; the image is its `image_path` under the TextVQA images folder.

Not converted: LLaVA-Instruct-150K (free-form multi-turn conversations; the VQA reader cleans a question as LAVIS's
`pre_question` does, lower case with some punctuation removed, which a long instruction should not get).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tasks import command
from tasks.data.captions import read_json

__all__ = ["aokvqa_to_vqa", "ocrvqa_to_vqa", "textcaps_to_captions", "convert"]


def _vqa_files(rows: list[tuple[Any, Any, str, list[str]]]) -> tuple[dict, dict]:
    """(question_id, image_id, question, answers) rows -> VQAv2 questions and annotations dicts."""
    questions = [{"question_id": qid, "image_id": image_id, "question": q} for qid, image_id, q, _ in rows]
    annotations = [
        {
            "question_id": qid,
            "image_id": image_id,
            "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)],
        }
        for qid, image_id, _, answers in rows
    ]
    return {"questions": questions}, {"annotations": annotations}


def _entry(data: Any, index: Any, keys: tuple[str, ...], path: str) -> None:
    if not isinstance(data, dict) or any(k not in data for k in keys):
        raise ValueError(f"{path}: entry {index!r} needs {', '.join(keys)}")


def aokvqa_to_vqa(entries: list[dict], path: str = "A-OKVQA file") -> tuple[dict, dict]:
    """A-OKVQA entries -> VQAv2 questions and annotations (the direct answers)."""
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected A-OKVQA's list of questions")
    rows = []
    for i, e in enumerate(entries):
        _entry(e, i, ("question_id", "image_id", "question", "direct_answers"), path)
        answers = [str(a) for a in e["direct_answers"]]
        if not answers:
            raise ValueError(f"{path}: entry {i} ({e['question_id']!r}) has no direct_answers")
        rows.append((e["question_id"], e["image_id"], e["question"], answers))
    return _vqa_files(rows)


def ocrvqa_to_vqa(dataset: dict, split: int = 1, path: str = "OCR-VQA file") -> tuple[dict, dict]:
    """OCR-VQA's dataset.json -> VQAv2 questions and annotations of one split (1 = train)."""
    if not isinstance(dataset, dict):
        raise ValueError(f"{path}: expected OCR-VQA's {{book id: {{questions, answers, split}}}}")
    rows = []
    for book, e in dataset.items():
        _entry(e, book, ("questions", "answers", "split"), path)
        if e["split"] != split:
            continue
        if len(e["questions"]) != len(e["answers"]):
            raise ValueError(f"{path}: {book!r} has {len(e['questions'])} questions and {len(e['answers'])} answers")
        for k, (q, a) in enumerate(zip(e["questions"], e["answers"], strict=True)):
            rows.append((f"{book}_{k}", book, q, [str(a)]))
    return _vqa_files(rows)


def textcaps_to_captions(data: dict, path: str = "TextCaps file") -> list[dict]:
    """TextCaps -> caption JSON entries {image, caption, image_id}."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{path}: expected TextCaps' {{'data': [...]}}")
    out = []
    for i, e in enumerate(data["data"]):
        _entry(e, i, ("image_id", "image_path", "caption_str"), path)
        out.append({"image": e["image_path"], "caption": e["caption_str"], "image_id": e["image_id"]})
    return out


DATASET_ENTRIES = {
    "aokvqa": "{{kind: vqa, questions: [{q}], ann_paths: [{a}], image_root: /data/coco/images, "
    "image_pattern: 'train2017/{{image_id:012d}}.jpg', instructions: [...]}}",
    "ocrvqa": "{{kind: vqa, questions: [{q}], ann_paths: [{a}], image_root: /data/ocrvqa/images, "
    "image_pattern: '{{image_id}}.jpg', instructions: [...]}}",
    "textcaps": "{{ann_paths: [{c}], image_root: /data/textvqa/images, instructions: [...]}}",
}


def convert(kind: str, source: str, out: str, split: int = 1) -> dict[str, str]:
    """Convert `source` of `kind` into `out`; returns the written files by name."""
    data = read_json(source, f"{kind} file")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "textcaps":
        files = {"captions": out_dir / "captions.json"}
        files["captions"].write_text(json.dumps(textcaps_to_captions(data, source)))
    else:
        questions, annotations = aokvqa_to_vqa(data, source) if kind == "aokvqa" else ocrvqa_to_vqa(data, split, source)
        files = {"questions": out_dir / "questions.json", "annotations": out_dir / "annotations.json"}
        files["questions"].write_text(json.dumps(questions))
        files["annotations"].write_text(json.dumps(annotations))
    return {k: str(v) for k, v in files.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=sorted(DATASET_ENTRIES), help="which dataset the source file is")
    parser.add_argument("source", help="the dataset's annotation file (see the module docstring)")
    parser.add_argument("out", help="the folder to write the converted files to")
    parser.add_argument("--split", type=int, default=1, help="OCR-VQA split: 1 train, 2 val, 3 test (default: 1)")


def run(args: argparse.Namespace) -> int:
    files = convert(args.kind, args.source, args.out, args.split)
    q, a, c = (files.get(k) for k in ("questions", "annotations", "captions"))
    entry = DATASET_ENTRIES[args.kind].format(q=q, a=a, c=c)
    print(f"wrote {', '.join(files.values())}\ndata.datasets entry (set image_root and instructions): {entry}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return command.main("heldin", add_arguments, run, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
