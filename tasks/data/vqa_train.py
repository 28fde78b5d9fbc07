"""VQA training data (BLIP-2 VQA fine-tuning, InstructBLIP's VQA sets): official VQAv2-format files to
(image, instruction, answer) samples.

The files are the ones the VQA evaluator reads (`tasks.evals.vqa.load_vqa_questions` / `load_vqa_annotations`):
questions `{"questions": [{"question_id", "image_id", "question"}]}` and annotations `{"annotations":
[{"question_id", "answers": [{"answer"} x 10]}]}`, images `image_root / image_pattern.format(image_id=...)`. Every
question of the questions files is a sample; one with no annotation is an error naming it.

The question is cleaned as for evaluation (`clean_question`, LAVIS `pre_question`) and put into a template drawn per
sample (`tasks.data.instructions`; BLIP-2 fine-tuning: "Question: {} Answer:"): that is the instruction both the LLM
and an instruction-aware Q-Former read. The target is one of the ten answers, drawn per sample with probability
proportional to how many annotators gave it (`choose_answer`). LAVIS gives each distinct answer the weight
count / 10 (`COCOVQADataset.__getitem__`, lavis/datasets/datasets/coco_vqa_datasets.py): BLIP-1's VQA loss weights
every distinct answer by it, and drawing by that weight is the one-target-per-question estimate of that loss. LAVIS's
`COCOVQAInstructDataset` draws uniformly over the distinct answers instead, which gives a one-vote answer as much
weight as a ten-vote one; we follow the weights. Draws use Python's `random`, seeded per sample by
`tasks.train_data.SeededSamples` (worker-independent, resume-exact).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

from tasks.data.captions import BadSample, load_image
from tasks.data.instructions import check_templates
from tasks.data.text import clean_question
from tasks.evals.vqa import load_vqa_annotations, load_vqa_questions

logger = logging.getLogger(__name__)


def choose_answer(answers: Sequence[str], rng: random.Random | None = None) -> str:
    """One answer, each distinct one with probability (its count) / len(answers): one annotation drawn uniformly."""
    if not answers:
        raise ValueError("a VQA annotation with no answers")
    return (rng or random).choice(list(answers))


class VQATrainDataset:
    """``VQATrainDataset([questions.json], [annotations.json], image_root, image_pattern, transform, templates)``;
    items ``{"image", "text_input": instruction, "text_output": answer, "image_id", "question_id"}``."""

    def __init__(
        self,
        question_paths: Sequence[str],
        ann_paths: Sequence[str],
        image_root: str,
        image_pattern: str,
        transform: Callable,
        templates: Sequence[str],
        max_words: int = 50,
        max_replacement_tries: int = 10,
    ):
        if len(question_paths) != len(ann_paths) or not ann_paths:
            raise ValueError(
                f"VQA training data pairs each questions file with its annotations file: got {len(question_paths)} "
                f"questions and {len(ann_paths)} annotation files"
            )
        self.templates = check_templates(templates, 1, "VQA instructions")
        self.transform, self.max_words, self.max_replacement_tries = transform, max_words, max_replacement_tries
        self.samples: list[tuple[str, str, list[str], int, Any]] = []  # (image path, question, answers, id, qid)
        image_ids: dict[Any, int] = {}
        for q_path, a_path in zip(question_paths, ann_paths, strict=True):
            annotations = load_vqa_annotations(a_path)
            for q in load_vqa_questions(q_path, image_root, image_pattern):
                if q.question_id not in annotations:
                    raise ValueError(f"{a_path}: no annotation for question_id {q.question_id!r} of {q_path}")
                answers = [str(a["answer"]).strip() for a in annotations[q.question_id]["answers"]]
                answers = [a for a in answers if a] or answers
                image_id = image_ids.setdefault(q.image_id, len(image_ids))
                self.samples.append((q.image_path, q.question, answers, image_id, q.question_id))
        if not self.samples:
            raise ValueError(f"no questions in {list(question_paths)}")
        self.num_images = len(image_ids)
        logger.info("VQATrainDataset: %d questions on %d images", len(self.samples), self.num_images)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> dict[str, Any]:
        path, question, answers, image_id, qid = self.samples[index]
        instruction = random.choice(self.templates).format(clean_question(question, self.max_words))
        return {
            "image": self.transform(load_image(path)),
            "text_input": instruction,
            "text_output": choose_answer(answers),
            "image_id": image_id,
            "question_id": qid,
        }

    def __getitem__(self, index: int) -> dict[str, Any] | BadSample:
        try:
            return self._load(index)
        except Exception as exc:  # an unreadable image makes this one sample bad, as in CaptionDataset
            bad = BadSample(self.samples[index][0], f"{type(exc).__name__}: {exc}")
        for attempt in range(self.max_replacement_tries):  # a deterministic substitute keeps the batch size
            other = random.Random(index * 1_000_003 + attempt).randrange(len(self.samples))
            if other == index:
                continue
            try:
                sample = self._load(other)
            except Exception:
                continue
            sample["skipped"] = [(bad.path, bad.reason)]
            return sample
        return bad
