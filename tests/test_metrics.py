"""Metrics on hand-made cases with known answers (tasks/evals/metrics.py, retrieval_metrics.py, DESIGN.md 9).

Each case is chosen so that a plausible wrong implementation gets a different number: text retrieval from
the first caption only, ties broken in favour of the ground truth, VQA matching without leave-one-out,
prediction-style normalization of the annotators' answers, and so on. Expected VQA values were derived by
reading the official vqaEval.py (pre-fix as vendored by LAVIS, and current GT-Vision-Lab) by hand.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tasks.evals.metrics import (
    DEFAULT_VQA_VERSION,
    gqa_accuracy,
    normalize_answer,
    normalize_gqa_prediction,
    prepare_vqa_answers,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
    vqa_metrics,
)
from tasks.evals.retrieval_metrics import RetrievalRanks, recall_at_k, retrieval_metrics, retrieval_ranks

BOTH = ("lavis", "official")

# ---------------------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------------------

IMG2TXT = [[0, 1], [2, 3], [4, 5]]
TXT2IMG = [0, 0, 1, 1, 2, 2]
# Rows: images; columns: texts.
SCORES = [
    [0.1, 0.9, 0.5, 0.2, 0.3, 0.4],  # order 1,2,5,4,3,0: captions 0 and 1 at ranks 5 and 0 -> 0
    [0.8, 0.7, 0.1, 0.6, 0.2, 0.3],  # order 0,1,3,5,4,2: captions 2 and 3 at ranks 5 and 2 -> 2
    [0.9, 0.1, 0.2, 0.3, 0.4, 0.8],  # order 0,5,4,3,2,1: captions 4 and 5 at ranks 2 and 1 -> 1
]


def test_retrieval_ranks_hand_matrix():
    ranks = retrieval_ranks(torch.tensor(SCORES), TXT2IMG, IMG2TXT)
    # TR uses the best caption: the first caption alone would give [5, 5, 2].
    assert ranks.txt == [0, 2, 1]
    # IR: columns of SCORES, e.g. text 0 scores images (0.1, 0.8, 0.9), its image 0 comes last.
    assert ranks.img == [2, 0, 2, 0, 0, 0]


def test_retrieval_ranks_accepts_numpy_and_lists():
    expected = retrieval_ranks(torch.tensor(SCORES), TXT2IMG, IMG2TXT)
    assert retrieval_ranks(np.array(SCORES), np.array(TXT2IMG), IMG2TXT) == expected
    assert retrieval_ranks(SCORES, torch.tensor(TXT2IMG), IMG2TXT) == expected


def test_retrieval_uses_separate_t2i_scores():
    # LAVIS re-ranks each text's own top-k images, so the t2i matrix is not the transpose of i2t.
    t2i = torch.zeros(6, 3)
    t2i[:, 2] = 1.0  # every text puts image 2 first, then images 0 and 1 (tied, lower index first)
    ranks = retrieval_ranks(torch.tensor(SCORES), TXT2IMG, IMG2TXT, scores_t2i=t2i)
    assert ranks.txt == [0, 2, 1]  # TR still from scores_i2t
    assert ranks.img == [1, 1, 2, 2, 0, 0]


def _scores_with_positions(n_cols: int, placed: dict[int, int]) -> list[float]:
    """A score row where column c sits at 0-based position placed[c]; other columns fill the rest in order."""
    order: list[int | None] = [None] * n_cols
    for col, pos in placed.items():
        order[pos] = col
    rest = iter(c for c in range(n_cols) if c not in placed)
    order = [c if c is not None else next(rest) for c in order]
    row = [0.0] * n_cols
    for pos, col in enumerate(order):
        row[col] = float(n_cols - pos)  # strictly decreasing with position: no ties
    return row


def test_retrieval_metrics_known_ranks():
    n_img, n_txt = 12, 24
    img2txt = [[2 * i, 2 * i + 1] for i in range(n_img)]
    txt2img = [t // 2 for t in range(n_txt)]
    tr_ranks = [0, 0, 0, 1, 3, 4, 5, 7, 9, 10, 15, 20]
    ir_ranks = [0] * 6 + [1] * 3 + [4] * 3 + [5] * 4 + [9] * 4 + [11] * 4
    # The first caption of each image sits at 23 (last): only the best caption gives tr_ranks.
    i2t = [_scores_with_positions(n_txt, {2 * i + 1: r, 2 * i: 23}) for i, r in enumerate(tr_ranks)]
    t2i = [_scores_with_positions(n_img, {txt2img[t]: r}) for t, r in enumerate(ir_ranks)]

    ranks = retrieval_ranks(i2t, txt2img, img2txt, scores_t2i=t2i)
    assert ranks == RetrievalRanks(txt=tr_ranks, img=ir_ranks)

    m = retrieval_metrics(i2t, txt2img, img2txt, scores_t2i=t2i)
    # TR: 3, 6 and 9 of 12 ranks below 1, 5, 10.  IR: 6, 12 and 20 of 24.
    expected = {
        "txt_r1": 25.0,
        "txt_r5": 50.0,
        "txt_r10": 75.0,
        "txt_r_mean": 50.0,
        "img_r1": 25.0,
        "img_r5": 50.0,
        "img_r10": 100.0 * 20 / 24,
        "img_r_mean": (25.0 + 50.0 + 100.0 * 20 / 24) / 3,
        "r_mean": (50.0 + (25.0 + 50.0 + 100.0 * 20 / 24) / 3) / 2,
    }
    assert m.keys() == expected.keys()
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key


def test_retrieval_ties_are_stable_lower_index_first():
    # All scores equal: each ground truth ranks after every lower-indexed candidate.
    ranks = retrieval_ranks(torch.zeros(3, 6), TXT2IMG, IMG2TXT)
    assert ranks.txt == [0, 2, 4]
    assert ranks.img == [0, 0, 1, 1, 2, 2]
    # A tie with a lower-indexed candidate costs one place; ties with higher indices cost nothing.
    # (Reversing a stable ascending sort would instead put column 3, then 2, before column 1.)
    row = [[0.5, 0.7, 0.7, 0.7]]
    assert retrieval_ranks(row, [0, 0, 0, 0], [[1]]).txt == [0]
    assert retrieval_ranks(row, [0, 0, 0, 0], [[2]]).txt == [1]
    assert retrieval_ranks(row, [0, 0, 0, 0], [[3]]).txt == [2]
    assert retrieval_ranks(row, [0, 0, 0, 0], [[3, 2]]).txt == [1]  # best of the tied targets: column 2
    assert retrieval_ranks(row, [0, 0, 0, 0], [[0]]).txt == [3]


def test_retrieval_ranks_match_brute_force_with_many_ties():
    rng = random.Random(0)
    n_img, n_txt = 9, 23
    scores = [[rng.randint(0, 3) for _ in range(n_txt)] for _ in range(n_img)]
    img2txt = [rng.sample(range(n_txt), rng.randint(1, 4)) for _ in range(n_img)]
    txt2img = [rng.randrange(n_img) for _ in range(n_txt)]

    def brute(row: list[int], targets: list[int]) -> int:
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        return min(order.index(t) for t in targets)

    ranks = retrieval_ranks(torch.tensor(scores), txt2img, img2txt, chunk_rows=2)
    assert ranks.txt == [brute(scores[i], img2txt[i]) for i in range(n_img)]
    columns = [[scores[i][t] for i in range(n_img)] for t in range(n_txt)]
    assert ranks.img == [brute(columns[t], [txt2img[t]]) for t in range(n_txt)]


def test_recall_at_k_counts_ranks_below_k():
    assert recall_at_k([0, 1, 4, 5, 9, 10], 1) == pytest.approx(100 / 6)
    assert recall_at_k([0, 1, 4, 5, 9, 10], 5) == 50.0  # rank 5 is the sixth place: not within the top 5
    assert recall_at_k([0, 1, 4, 5, 9, 10], 10) == pytest.approx(500 / 6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scores_i2t=[[0.1, float("nan")]], txt2img=[0, 0], img2txt=[[0, 1]]), "NaN"),
        (dict(scores_i2t=[[0.1, 0.2]], txt2img=[0], img2txt=[[0, 1]]), "txt2img has 1 entries"),
        (dict(scores_i2t=[[0.1, 0.2]], txt2img=[0, 0], img2txt=[[0], [1]]), "img2txt has 2 entries"),
        (dict(scores_i2t=[[0.1, 0.2]], txt2img=[0, 0], img2txt=[[0, 2]]), "target 2 outside"),
        (dict(scores_i2t=[[0.1, 0.2]], txt2img=[0, 1], img2txt=[[0, 1]]), "target 1 outside"),
        (dict(scores_i2t=[[0.1, 0.2], [0.3, 0.4]], txt2img=[0, 0], img2txt=[[0, 1], []]), "row 1 has no"),
        (dict(scores_i2t=[0.1, 0.2], txt2img=[0, 0], img2txt=[[0, 1]]), "must be 2-D"),
        (dict(scores_i2t=[[0.1, 0.2]], txt2img=[0, 0], img2txt=[[0, 1]], scores_t2i=[[0.1, 0.2]]), "expected"),
    ],
)
def test_retrieval_rejects_bad_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        retrieval_ranks(**kwargs)


# ---------------------------------------------------------------------------------------------------------
# VQA: normalization
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),
        ("none", "0"),
        ("ten", "10"),
        ("a dog", "dog"),
        ("The Dog", "dog"),
        ("the", ""),
        ("dont", "don't"),
        ("Im", "im"),  # the table's key is "Im", but words are lower-cased first: never matches
        ("yes.", "yes"),
        ("Yes!", "yes"),
        ("what?", "what"),
        ("  fire\thydrant\n", "fire hydrant"),
        ("red-blue", "red blue"),  # no space next to "-": replaced by a space
        ("a-b -", "ab"),  # " -" occurs somewhere: every "-" is deleted, not just that one
        ("1,000", "1000"),
        ("1,000-2,000", "10002000"),  # digit-comma-digit: all punctuation deleted (the quirk)
        ("hello,world", "hello world"),  # no digits around the comma: replaced by a space
        ("x(-z-w", "x z w"),  # marks are checked in the input, not in the text after earlier replacements
        ("2.5", "2.5"),  # a period before a digit is kept
        ("5.", "5"),  # the intended lookbehind would keep it; the official regex has a typo
        ("girl's", "girl's"),  # apostrophe is not punctuation here
        ("2:50 pm", "2:50 pm"),  # nor is the colon
    ],
)
@pytest.mark.parametrize("version", BOTH)
def test_normalize_answer(raw, expected, version):
    assert normalize_answer(raw, version=version) == expected


def test_process_punctuation_keeps_case_and_spaces():
    # What the pre-fix code does to an annotator's answer: "!" becomes a trailing space, case is kept.
    assert process_punctuation("Yes!") == "Yes "
    assert process_punctuation("yes !") == "yes "
    assert process_digit_article("Yes ") == "yes"


def test_process_punctuation_removes_at_most_32_periods():
    # periodStrip.sub("", text, re.UNICODE) passes re.UNICODE (32) as the count.
    assert process_punctuation("x." * 33) == "x" * 33 + "."


def test_default_version_is_lavis():
    assert DEFAULT_VQA_VERSION == "lavis"
    assert vqa_accuracy("two", ["two"] * 10) == vqa_accuracy("two", ["two"] * 10, version="lavis")


def test_unknown_version_rejected():
    with pytest.raises(ValueError, match="unknown VQA evaluation version"):
        vqa_accuracy("yes", ["yes"] * 10, version="v2")


def test_prepare_vqa_answers_per_version():
    gts = ["the dog!"] * 4 + ["cat"] * 6
    assert prepare_vqa_answers("The Dog!", gts, "lavis") == ("dog", ["the dog "] * 4 + ["cat"] * 6)
    assert prepare_vqa_answers("The Dog!", gts, "official") == ("dog", ["dog"] * 4 + ["cat"] * 6)
    # All annotators agree: pre-fix normalizes only the prediction, post-fix neither side.
    assert prepare_vqa_answers(" Two\n", ["two"] * 10, "lavis") == ("2", ["two"] * 10)
    assert prepare_vqa_answers(" Two\n", ["two"] * 10, "official") == ("Two", ["two"] * 10)


# ---------------------------------------------------------------------------------------------------------
# VQA: accuracy
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "matches, expected",
    [
        (0, 0.0),
        (1, (9 * (1 / 3) + 1 * 0) / 10),  # 0.3
        (2, (8 * (2 / 3) + 2 * (1 / 3)) / 10),  # 0.6
        (3, (7 * 1 + 3 * (2 / 3)) / 10),  # 0.9, not 1: leaving out a matching annotator leaves 2
        (4, 1.0),
        (10, 1.0),
    ],
)
@pytest.mark.parametrize("version", BOTH)
def test_vqa_accuracy_leave_one_out(matches, expected, version):
    gts = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_accuracy("cat", gts, version=version) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "prediction, gts, lavis, official",
    [
        # All agree: pre-fix normalizes the prediction only ("two" -> "2"); post-fix compares raw strings.
        ("two", ["two"] * 10, 0.0, 1.0),
        ("Two", ["2"] * 10, 1.0, 0.0),
        ("Yes.", ["yes"] * 10, 1.0, 0.0),
        ("yes", [" yes"] * 10, 0.0, 1.0),  # post-fix strips annotators' answers, pre-fix does not
        ("1000", ["1,000"] * 10, 0.0, 0.0),  # agreeing annotators' answers keep their comma in both versions
        ("1,000", ["1,000"] * 10, 0.0, 1.0),
        # Disagreement: pre-fix gives annotators' answers punctuation processing only.
        ("dog", ["the dog"] * 4 + ["cat"] * 6, 0.0, 1.0),  # no article removal on the annotators' side
        ("yes", ["Yes"] * 3 + ["no"] * 7, 0.0, 0.9),  # no lower-casing on the annotators' side
        ("yes", ["yes!"] * 3 + ["no"] * 7, 0.0, 0.9),  # "yes!" -> "yes " keeps its space pre-fix
        # Both versions agree: digit-comma-digit loses its comma on the annotators' side too (5 matches).
        ("1000", ["1,000"] * 3 + ["1000"] * 2 + ["many"] * 5, 1.0, 1.0),
        ("1,000", ["1,000"] * 3 + ["1000"] * 2 + ["many"] * 5, 1.0, 1.0),
        ("Two", ["2"] * 2 + ["3"] * 8, 0.6, 0.6),
    ],
)
def test_vqa_accuracy_versions(prediction, gts, lavis, official):
    assert vqa_accuracy(prediction, gts, version="lavis") == pytest.approx(lavis, abs=1e-12)
    assert vqa_accuracy(prediction, gts, version="official") == pytest.approx(official, abs=1e-12)


def _ann(qid, answers, answer_type, question_type, as_dicts=True):
    return {
        "question_id": qid,
        "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)] if as_dicts else answers,
        "answer_type": answer_type,
        "question_type": question_type,
    }


ANNOTATIONS = [
    _ann(1, ["yes"] * 10, "yes/no", "is the"),
    _ann(2, ["2"] + ["3"] * 9, "number", "how many"),
    _ann(3, ["red"] * 2 + ["blue"] * 8, "other", "what color"),
    _ann(4, ["no"] * 10, "yes/no", "is the"),
]
PREDICTIONS = {1: "yes", 2: "two", 3: "Red", 4: "yes"}  # accuracies 1.0, 0.3, 0.6, 0.0


@pytest.mark.parametrize("version", BOTH)
def test_vqa_metrics_per_type(version):
    m = vqa_metrics(PREDICTIONS, ANNOTATIONS, version=version)
    assert m["overall"] == 47.5  # 100 * (1 + 0.3 + 0.6 + 0) / 4
    assert m["per_answer_type"] == {"yes/no": 50.0, "number": 30.0, "other": 60.0}
    assert m["per_question_type"] == {"is the": 50.0, "how many": 30.0, "what color": 60.0}
    assert m["per_question"] == {1: 100.0, 2: 30.0, 3: 60.0, 4: 0.0}


def test_vqa_metrics_rounds_once_at_the_end():
    anns = ANNOTATIONS[:2] + ANNOTATIONS[3:]  # accuracies 1.0, 0.3, 0.0
    preds = {1: "yes", 2: "two", 4: "yes"}
    m = vqa_metrics(preds, anns)
    assert m["overall"] == 43.33  # round(100 * 1.3 / 3, 2)
    assert m["per_answer_type"]["yes/no"] == 50.0
    assert vqa_metrics(preds, anns, ndigits=4)["overall"] == 43.3333
    # Two-answer questions: leave-one-out gives 1/6 for one match. Rounding per question first would give
    # (16.67 + 0) / 2 -> 8.34; the official code rounds the unrounded mean: 8.33.
    anns = [_ann(1, ["cat", "dog"], "other", "what"), _ann(2, ["cat", "dog"], "other", "what")]
    m = vqa_metrics({1: "cat", 2: "bird"}, anns)
    assert m["per_question"] == {1: 16.67, 2: 0.0}
    assert m["overall"] == 8.33
    assert m["per_answer_type"] == {"other": 8.33}


def test_vqa_metrics_versions_differ():
    anns = [_ann(7, ["yes"] * 10, "yes/no", "is it"), _ann(8, ["two"] * 10, "number", "how many")]
    preds = {7: "Yes", 8: "two"}
    assert vqa_metrics(preds, anns, version="lavis")["per_question"] == {7: 100.0, 8: 0.0}
    assert vqa_metrics(preds, anns, version="official")["per_question"] == {7: 0.0, 8: 100.0}


def test_vqa_metrics_accepts_mapping_and_plain_answer_strings():
    anns = {}
    for a in ANNOTATIONS:
        strings = [d["answer"] for d in a["answers"]]
        anns[a["question_id"]] = _ann(a["question_id"], strings, a["answer_type"], a["question_type"], as_dicts=False)
    assert vqa_metrics(PREDICTIONS, anns) == vqa_metrics(PREDICTIONS, ANNOTATIONS)


def test_vqa_metrics_requires_matching_question_ids():
    with pytest.raises(ValueError, match="1 annotated question"):
        vqa_metrics({1: "yes", 2: "2", 3: "red"}, ANNOTATIONS)
    with pytest.raises(ValueError, match="1 prediction"):
        vqa_metrics({**PREDICTIONS, 5: "no"}, ANNOTATIONS)
    with pytest.raises(ValueError, match="id types"):
        vqa_metrics({str(k): v for k, v in PREDICTIONS.items()}, ANNOTATIONS)


def test_vqa_metrics_requires_types():
    bad = [{"question_id": 1, "answers": ["yes"] * 10, "answer_type": "yes/no"}]
    with pytest.raises(KeyError, match="question_type"):
        vqa_metrics({1: "yes"}, bad)


# ---------------------------------------------------------------------------------------------------------
# GQA
# ---------------------------------------------------------------------------------------------------------

GQA_PREDICTIONS = ["Yes.", "the red one", "two", "Left!", "blue"]
GQA_ANSWERS = ["yes", "red one", "2", "left", "Blue"]


def test_gqa_normalizes_the_prediction_only():
    # "Yes." -> "yes", "two" -> "2" and "Left!" -> "left" match; "the red one" -> "red 1" and "blue" vs "Blue"
    # do not, because the answer is not normalized (normalizing it too would give 100).
    assert gqa_accuracy(GQA_PREDICTIONS, GQA_ANSWERS) == 60.0
    assert gqa_accuracy(GQA_PREDICTIONS, GQA_ANSWERS, normalize_prediction=False) == 0.0
    assert gqa_accuracy(dict(enumerate(GQA_PREDICTIONS)), dict(enumerate(GQA_ANSWERS))) == 60.0


def test_gqa_normalization_does_not_strip_first():
    # "/ " occurs only before stripping; with it every "/" is deleted, without it each becomes a space.
    assert normalize_gqa_prediction("x/y/ ") == "xy"
    assert normalize_answer("x/y/ ") == "x y"


def test_gqa_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="4 predictions for 5 answers"):
        gqa_accuracy(GQA_PREDICTIONS[:4], GQA_ANSWERS)
    with pytest.raises(ValueError, match="1 question"):
        gqa_accuracy({0: "yes"}, {0: "yes", 1: "no"})
    with pytest.raises(TypeError):
        gqa_accuracy({0: "yes"}, ["yes"])
