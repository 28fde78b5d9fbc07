"""Zero-shot VQA evaluation: VQAv2 and OK-VQA (task "vqa") and GQA (task "gqa"), DESIGN.md section 9.

    1. Every rank reads the questions; rank 0 also reads the ground truth and checks that every question has one,
       before any generation starts.
    2. Rank r answers questions r, r + W, r + 2W, ... (W = world size) in batches, with
       `Blip2Stage2.predict_answers` (prompt and beam-search settings from the config). Each question is first
       cleaned as LAVIS's `blip_question` processor does (`tasks.data.text.clean_question`: lower-case, delete
       . ! " ( ) * # : ; ~), then put in the prompt.
    3. The answers are gathered into one dict keyed by question id; an id answered twice is an error, so nothing
       is counted twice (unlike a padded DistributedSampler).
       With `lemmatize: true` each predicted answer is then lemmatised (`tasks.evals.lemmatize`, LAVIS's OK-VQA
       post-processing); the ground truth is not.
    4. Rank 0 writes `results.json` (`[{"question_id", "answer"}]` sorted by question id: the official results
       format), `metrics.json` and `report.html`; every rank returns the same metrics.

Inputs:
    VQAv2 / OK-VQA: the official questions JSON (`{"questions": [{"image_id", "question", "question_id"}]}`) and
    annotations JSON (`{"annotations": [{"question_id", "answers": [{"answer"} x 10], "answer_type",
    "question_type", ...}]}`); images are `image_root / image_pattern.format(image_id=...)`. Without annotations
    (VQAv2 test-dev) only `results.json` is made, for the evaluation server.
    GQA: the balanced questions JSON (`{question_id: {"imageId", "question", "answer", ...}}`, images
    `image_root / f"{imageId}.jpg"`), or LAVIS's list form (`[{"question_id", "image", "question", "answer"}]`).

An image that cannot be read stops the evaluation with an error naming the file (on every rank: a failure on one
rank is reported to all of them instead of leaving them waiting in a collective). An annotation with other than
10 answers is scored over the answers it has, with a warning and `annotations_without_10_answers` in metrics.json
(`strict_annotations: true` makes it an error); a prompt needs exactly one `{}` (`check_vqa_prompt`).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qformer.stage2 import Blip2Stage2, check_vqa_prompt
from tasks.data.captions import set_max_image_pixels
from tasks.data.text import clean_question
from tasks.dist import on_rank0
from tasks.evals.common import (
    METRICS_NAME,
    REPORT_NAME,
    RESULTS_NAME,
    autocast,
    generate_sharded,
    generation_config,
    image_batches,
    read_json,
    results_by_id,
    warn_if_autocast_recasts_llm,
    write_json,
)
from tasks.evals.config import EvalConfig
from tasks.evals.lemmatize import lemmatize_answers, load_lemmatizer
from tasks.evals.metrics import gqa_accuracy, normalize_gqa_prediction, vqa_metrics
from tasks.evals.report import VQASample, sample_indices, vqa_report

logger = logging.getLogger(__name__)

__all__ = [
    "Question",
    "evaluate_vqa",
    "load_gqa_questions",
    "load_vqa_annotations",
    "load_vqa_questions",
]

# ----------------------------------------------------------------------------------------------------------
# Questions and ground truth
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    question_id: Hashable
    image_id: Hashable
    question: str
    image_path: str


def _check_unique_ids(questions: Sequence[Question], source: str) -> None:
    seen: set[Hashable] = set()
    for q in questions:
        if q.question_id in seen:
            raise ValueError(f"{source}: question_id {q.question_id!r} appears more than once")
        seen.add(q.question_id)


def load_vqa_questions(path: str, image_root: str, image_pattern: str) -> list[Question]:
    """Questions from an official VQAv2 / OK-VQA questions file, in file order."""
    data = read_json(path, "VQA questions file")
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise ValueError(f"{path}: expected the official VQA questions format {{'questions': [...]}}")
    questions = []
    for i, entry in enumerate(data["questions"]):
        try:
            qid, image_id, text = entry["question_id"], entry["image_id"], entry["question"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: questions[{i}] needs question_id, image_id and question ({e!r})") from e
        if not isinstance(text, str):
            raise ValueError(f"{path}: questions[{i}]: 'question' must be a string, got {text!r:.100}")
        try:
            name = image_pattern.format(image_id=image_id)
        except (ValueError, KeyError, IndexError) as e:
            raise ValueError(f"image_pattern {image_pattern!r} cannot format image_id {image_id!r}: {e}") from e
        questions.append(Question(qid, image_id, text, os.path.join(image_root, name)))
    _check_unique_ids(questions, path)
    return questions


ANSWERS_PER_QUESTION = 10  # VQAv2 and OK-VQA: ten annotators; the leave-one-out accuracy assumes ten


def load_vqa_annotations(path: str, strict: bool = False) -> dict[Hashable, dict[str, Any]]:
    """question_id -> annotation, from an official VQAv2 / OK-VQA annotations file. Annotations with other than 10
    answers are logged with their counts (`strict`: an error naming the file, the counts and the first entries)."""
    data = read_json(path, "VQA annotations file")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: expected the official VQA annotations format {{'annotations': [...]}}")
    annotations: dict[Hashable, dict[str, Any]] = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "question_id" not in ann or "answers" not in ann:
            raise ValueError(f"{path}: annotations[{i}] needs question_id and answers")
        if not isinstance(ann["answers"], list) or not ann["answers"]:
            raise ValueError(
                f"{path}: annotations[{i}]: 'answers' must be a non-empty list, got {ann['answers']!r:.100}"
            )
        if ann["question_id"] in annotations:
            raise ValueError(f"{path}: question_id {ann['question_id']!r} is annotated twice")
        annotations[ann["question_id"]] = ann
    _check_answer_counts(path, annotations, strict)
    return annotations


def answer_count_problem(path: str, annotations: dict[Hashable, dict[str, Any]]) -> tuple[int, str] | None:
    """(how many annotations have other than 10 answers, a message with the counts), or None when all have 10."""
    odd = {qid: len(ann["answers"]) for qid, ann in annotations.items() if len(ann["answers"]) != ANSWERS_PER_QUESTION}
    if not odd:
        return None
    counts = ", ".join(f"{n} with {k}" for k, n in sorted(Counter(odd.values()).items()))
    first = ", ".join(f"{qid!r}" for qid in list(odd)[:3])
    return len(odd), (
        f"{path}: {len(odd)} of {len(annotations)} annotations have other than {ANSWERS_PER_QUESTION} answers "
        f"({counts}; e.g. question_id {first})"
    )


def _check_answer_counts(path: str, annotations: dict[Hashable, dict[str, Any]], strict: bool) -> None:
    problem = answer_count_problem(path, annotations)
    if problem is None:
        return
    if strict:
        raise ValueError(f"{problem[1]}: refused (strict_annotations=true)")
    logger.warning("%s: scored over the answers they have (strict_annotations=true refuses them)", problem[1])


def load_gqa_questions(path: str, image_root: str) -> tuple[list[Question], dict[Hashable, str] | None]:
    """(questions in file order, question_id -> answer or None when the file has no answers) from GQA's
    `{qid: {"imageId", "question", "answer"}}` questions file or LAVIS's `[{"question_id", "image", ...}]`."""
    data = read_json(path, "GQA questions file")
    if isinstance(data, dict):
        rows = []
        for qid, entry in data.items():
            if not isinstance(entry, dict) or "imageId" not in entry or not isinstance(entry.get("question"), str):
                raise ValueError(f"{path}: question {qid!r} needs imageId and question (a string)")
            rows.append((qid, entry["imageId"], f"{entry['imageId']}.jpg", entry["question"], entry.get("answer")))
    elif isinstance(data, list):
        rows = []
        for i, entry in enumerate(data):
            if not isinstance(entry, dict) or not {"question_id", "image", "question"} <= set(entry):
                raise ValueError(f"{path}[{i}]: a LAVIS GQA entry needs question_id, image and question")
            if not isinstance(entry["image"], str) or not isinstance(entry["question"], str):
                raise ValueError(f"{path}[{i}]: 'image' and 'question' must be strings")
            image = entry["image"]
            rows.append((entry["question_id"], Path(image).stem, image, entry["question"], entry.get("answer")))
    else:
        raise ValueError(f"{path}: expected GQA questions as {{question_id: {{...}}}} or a LAVIS list")
    questions = [Question(qid, image_id, text, os.path.join(image_root, name)) for qid, image_id, name, text, _ in rows]
    _check_unique_ids(questions, path)
    answers = {row[0]: row[4] for row in rows}
    with_answer = sum(a is not None for a in answers.values())
    if with_answer == 0:
        return questions, None
    if with_answer < len(answers):
        missing = [qid for qid, a in answers.items() if a is None][:3]
        raise ValueError(f"{path}: {len(answers) - with_answer} question(s) have no answer (e.g. {missing})")
    return questions, answers


def _load_questions(cfg: EvalConfig) -> tuple[list[Question], dict[Hashable, str] | None]:
    if cfg.task == "vqa":
        return load_vqa_questions(cfg.questions, cfg.image_root, cfg.image_pattern), None
    return load_gqa_questions(cfg.questions or cfg.ann_path, cfg.image_root)


def _vqa_ground_truth(cfg: EvalConfig, questions: Sequence[Question]) -> dict[Hashable, dict[str, Any]] | None:
    """The annotation of every question, in question order (None without an annotations file)."""
    if not cfg.annotations:
        logger.warning("no VQA annotations given: writing results.json only (e.g. for the test-dev server)")
        return None
    annotations = load_vqa_annotations(cfg.annotations, strict=cfg.strict_annotations)
    missing = [q.question_id for q in questions if q.question_id not in annotations]
    if missing:
        raise ValueError(
            f"{cfg.annotations}: {len(missing)} question(s) of {cfg.questions} have no annotation "
            f"(e.g. {missing[:3]}): are they the same split?"
        )
    return {q.question_id: annotations[q.question_id] for q in questions}


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------


def _answer_questions(
    model: Blip2Stage2, questions: Sequence[Question], cfg: EvalConfig, device: torch.device, lemmatizer: Any = None
) -> dict[Hashable, str]:
    """question_id -> generated answer for this rank's questions (lemmatised when a spaCy `lemmatizer` is given, as
    LAVIS's `predict_answers` does with `apply_lemmatizer`)."""
    size = cfg.image_size or model.cfg.vision.image_size
    gen = generation_config(cfg)
    answers: dict[Hashable, str] = {}
    paths = [q.image_path for q in questions]
    for indices, images in image_batches(paths, size, cfg.batch_size, cfg.num_workers, device, desc=cfg.task):
        batch = [questions[i] for i in indices]
        texts = [clean_question(q.question) for q in batch]
        with autocast(device, cfg.precision):
            predicted = model.predict_answers(texts, images=images, prompt=cfg.prompt, cfg=gen)
        if lemmatizer is not None:
            predicted = lemmatize_answers(predicted, lemmatizer)
        answers.update((q.question_id, a) for q, a in zip(batch, predicted, strict=True))
    return answers


def _score_and_write(
    cfg: EvalConfig,
    questions: Sequence[Question],
    answers: dict[Hashable, str],
    vqa_truth: dict[Hashable, dict[str, Any]] | None,
    gqa_truth: dict[Hashable, str] | None,
) -> dict[str, Any]:
    """Rank 0: results.json, metrics.json and report.html; returns the metrics."""
    out = Path(cfg.output_dir)
    write_json(out / RESULTS_NAME, results_by_id(answers, "question_id", "answer"))

    metrics: dict[str, Any] = {"task": cfg.task, "num_questions": len(questions)}
    if cfg.lemmatize:
        metrics["lemmatized_with"] = cfg.lemmatizer_model
    per_question: dict[Hashable, float] = {}
    if vqa_truth is not None:
        scored = vqa_metrics(answers, vqa_truth, version=cfg.vqa_eval_version)
        per_question = scored.pop("per_question")
        metrics.update(vqa_eval_version=cfg.vqa_eval_version, **scored)
        problem = answer_count_problem(cfg.annotations, vqa_truth)
        if problem is not None:
            metrics[f"annotations_without_{ANSWERS_PER_QUESTION}_answers"] = problem[0]
    elif gqa_truth is not None:
        metrics["accuracy"] = gqa_accuracy(answers, {q.question_id: gqa_truth[q.question_id] for q in questions})
        per_question = {
            qid: 100.0 * (normalize_gqa_prediction(answers[qid]) == answer) for qid, answer in gqa_truth.items()
        }
    else:
        metrics["note"] = "no ground truth given: results.json is in the format of the evaluation server"
    write_json(out / METRICS_NAME, metrics)

    samples = []
    for i in sample_indices(len(questions), cfg.report_samples):
        q = questions[i]
        if vqa_truth is not None:
            truth = [a["answer"] if isinstance(a, dict) else a for a in vqa_truth[q.question_id]["answers"]]
        else:
            truth = [gqa_truth[q.question_id]] if gqa_truth is not None else []
        samples.append(
            VQASample(
                q.image_path, q.question, answers[q.question_id], truth, per_question.get(q.question_id), q.question_id
            )
        )
    title = f"{cfg.task.upper()}: {Path(cfg.questions or cfg.ann_path).name} ({cfg.checkpoint})"
    vqa_report(out / REPORT_NAME, samples, title=title, metrics=metrics)
    logger.info("%s: %s", cfg.task, {k: v for k, v in metrics.items() if not isinstance(v, dict)})
    return metrics


def evaluate_vqa(model: Blip2Stage2, cfg: EvalConfig, device: torch.device | str) -> dict[str, Any]:
    """Zero-shot VQA / GQA evaluation of a stage-2 model (see the module docstring); call it on every rank.

    The model should already be on `device`. Returns the metrics written to `output_dir/metrics.json`:
    VQA: `{"task", "num_questions", "vqa_eval_version", "overall", "per_answer_type", "per_question_type"}`
    (percentages); GQA: `{"task", "num_questions", "accuracy"}` (percent).
    """
    if cfg.task not in ("vqa", "gqa"):
        raise ValueError(f"evaluate_vqa handles tasks vqa and gqa, got {cfg.task!r}")
    if not isinstance(model, Blip2Stage2):
        raise ValueError(
            f"{cfg.checkpoint} holds a {type(model).__name__} (stage 1): {cfg.task} evaluation needs a stage-2 (LLM) "
            "checkpoint"
        )
    check_vqa_prompt(cfg.prompt)
    lemmatizer = load_lemmatizer(cfg.lemmatizer_model) if cfg.lemmatize else None  # a missing one fails before work
    set_max_image_pixels(cfg.max_image_pixels)
    device = torch.device(device)
    warn_if_autocast_recasts_llm(model, cfg.precision, device)
    questions, gqa_truth = _load_questions(cfg)
    if cfg.limit:
        questions = questions[: cfg.limit]
        if gqa_truth is not None:
            gqa_truth = {q.question_id: gqa_truth[q.question_id] for q in questions}
    if not questions:
        raise ValueError(f"no questions in {cfg.questions or cfg.ann_path}")
    vqa_truth = (
        on_rank0(lambda: _vqa_ground_truth(cfg, questions), "reading the annotations") if cfg.task == "vqa" else None
    )

    model.eval()
    answers = generate_sharded(
        questions, lambda mine: _answer_questions(model, mine, cfg, device, lemmatizer), f"{cfg.task} answers"
    )
    return on_rank0(
        lambda: _score_and_write(cfg, questions, answers, vqa_truth, gqa_truth), "scoring and writing", share=True
    )
