"""Evaluation metrics (DESIGN.md section 9): retrieval recall, VQA accuracy, GQA accuracy.

Pure functions: no I/O, no process group, no model. Inputs are plain Python containers, numpy arrays or
torch tensors; outputs are Python numbers, lists and dicts, ready to log or write out.

Retrieval
    `retrieval_ranks` gives each query's 0-based rank; `retrieval_metrics` turns them into the percentages
    that LAVIS's `RetrievalTask._report_metrics` reports (TR@1/5/10, IR@1/5/10, their means).

VQA (VQAv2, OK-VQA)
    `vqa_accuracy` and `vqa_metrics` reproduce the official GT-Vision-Lab evaluation (vqaEval.py), quirks
    included, in two versions that differ only in *which* strings get normalized:

    ``version="lavis"`` (the default): the code LAVIS vendors as ``lavis/common/vqa_tools/vqa_eval.py``, from
    before the official "processing answers" fix. BLIP-2's VQA numbers computed with LAVIS come from it::

        resAns = resAns.replace('\\n', ' ').replace('\\t', ' ').strip()
        resAns = self.processPunctuation(resAns)
        resAns = self.processDigitArticle(resAns)
        gtAnswers = [ans['answer'] for ans in gts[quesId]['answers']]
        if len(set(gtAnswers)) > 1:
            for ansDic in gts[quesId]['answers']:
                ansDic['answer'] = self.processPunctuation(ansDic['answer'])

      The prediction is always fully normalized; the annotators' answers are never stripped, never
      lower-cased and never passed through processDigitArticle, and get processPunctuation only when the
      ten raw answers are not all identical.

    ``version="official"``: the current GT-Vision-Lab/VQA code (read at commit a013f00)::

        for ansDic in gts[quesId]['answers']:
            ansDic['answer'] = ansDic['answer'].replace('\\n', ' ').replace('\\t', ' ').strip()
        resAns = resAns.replace('\\n', ' ').replace('\\t', ' ').strip()
        gtAnswers = [ans['answer'] for ans in gts[quesId]['answers']]
        if len(set(gtAnswers)) > 1:
            for ansDic in gts[quesId]['answers']:
                ansDic['answer'] = self.processPunctuation(ansDic['answer'])
                ansDic['answer'] = self.processDigitArticle(ansDic['answer'])
            resAns = self.processPunctuation(resAns)
            resAns = self.processDigitArticle(resAns)

      Annotators' answers are whitespace-cleaned and stripped first (so the "all identical" test sees the
      stripped answers). When they differ, annotators' answers and the prediction get the same full
      normalization; when all agree, *nothing* beyond whitespace cleaning is applied to either side, so
      "Yes." scores 0 against ten "yes" (the official code does this on purpose, for OCR-like answers).

    Everything else is identical in the two versions: the punctuation list, both regexes, the number-word
    map, the articles, the contraction table, leave-one-out averaging and rounding. (A much older official
    revision had another punctuation list, curly apostrophes in the contraction table and averaged the
    per-type accuracies over the last leave-one-out subset only; neither version here does that.)

GQA
    `gqa_accuracy`: exact match after normalizing the prediction only, as LAVIS's `GQATask` does.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

# ----------------------------------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------------------------------

RECALL_KS = (1, 5, 10)


class RetrievalRanks(NamedTuple):
    """0-based ranks (0 = retrieved first) of the ground truth, one per query."""

    txt: list[int]  # per image: best rank among its captions in its row (text retrieval, TR)
    img: list[int]  # per text: rank of its image in its column (image retrieval, IR)


def _score_matrix(scores: Any, name: str) -> Tensor:
    """A 2-D CPU tensor of `scores` (torch, numpy or nested lists), checked for NaN."""
    t = torch.as_tensor(scores).detach().cpu()
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    if t.is_floating_point() and torch.isnan(t).any():
        raise ValueError(f"{name} contains NaN at (row, col) {tuple(torch.nonzero(torch.isnan(t))[0].tolist())}")
    return t


def _best_target_ranks(scores: Tensor, targets: Sequence[Sequence[int]], name: str, chunk_rows: int) -> list[int]:
    """For each row of `scores` [R, C], the 0-based rank of its best target column.

    A row's columns are ordered by descending score, and among equal scores by ascending column index (a
    stable descending sort). The best target is therefore the one with the highest score, the lowest index
    among equal ones, and its rank is (#columns scoring higher) + (#equal-scoring columns with a lower index).
    """
    n_rows, n_cols = scores.shape
    if len(targets) != n_rows:
        raise ValueError(f"{name}: {len(targets)} target lists for {n_rows} score rows")
    width = 0
    for row, tg in enumerate(targets):
        if len(tg) == 0:
            raise ValueError(f"{name}: row {row} has no ground-truth target")
        bad = [t for t in tg if not 0 <= t < n_cols]
        if bad:
            raise ValueError(f"{name}: row {row} has target {bad[0]} outside [0, {n_cols})")
        width = max(width, len(tg))
    padded = torch.tensor([list(tg) + [-1] * (width - len(tg)) for tg in targets], dtype=torch.long)  # [R, W]

    # Best target per row: scan the target slots, keeping (highest score, lowest index).
    best_idx = padded[:, 0]
    best_val = scores.gather(1, best_idx[:, None])[:, 0]
    for slot in range(1, width):
        cand = padded[:, slot]
        valid = cand >= 0
        cand_val = scores.gather(1, cand.clamp(min=0)[:, None])[:, 0]
        better = valid & ((cand_val > best_val) | ((cand_val == best_val) & (cand < best_idx)))
        best_idx = torch.where(better, cand, best_idx)
        best_val = torch.where(better, cand_val, best_val)

    columns = torch.arange(n_cols)
    ranks = []
    for start in range(0, n_rows, chunk_rows):
        rows = scores[start : start + chunk_rows]  # [r, C]
        val = best_val[start : start + chunk_rows, None]
        idx = best_idx[start : start + chunk_rows, None]
        higher = (rows > val).sum(dim=1)
        tied_before = ((rows == val) & (columns[None, :] < idx)).sum(dim=1)
        ranks.append(higher + tied_before)
    return torch.cat(ranks).tolist()


def retrieval_ranks(
    scores_i2t: Any,
    txt2img: Sequence[int] | Any,
    img2txt: Sequence[Sequence[int]],
    scores_t2i: Any | None = None,
    *,
    chunk_rows: int = 1024,
) -> RetrievalRanks:
    """Per-query 0-based ranks for image-text retrieval.

    Args:
        scores_i2t: [n_images, n_texts] scores (higher = more similar), torch, numpy or nested lists.
        txt2img: for each text, the index of its image.
        img2txt: for each image, the indices of its captions (several per image).
        scores_t2i: [n_texts, n_images] scores used for image retrieval. LAVIS computes this matrix separately
            (each text re-ranks its own top-k images with ITM), so it need not equal ``scores_i2t.T``;
            defaults to ``scores_i2t.T``.
        chunk_rows: rows compared at once (bounds memory at about chunk_rows * n_columns bytes).

    Text retrieval (TR) rank of an image: the best (smallest) rank among its ground-truth captions in its
    row. Image retrieval (IR) rank of a text: the rank of its image in its row of ``scores_t2i``.

    Ties: a row is ordered by descending score and, among equal scores, by ascending index (a stable
    descending sort), so ties never favour the ground truth over a lower-indexed candidate. LAVIS uses
    ``np.argsort(score)[::-1]`` (numpy's default, unstable quicksort), which leaves tie order unspecified.
    In LAVIS's protocol the only mass ties are the -100 fill of candidates outside the ITM top-k; with
    k_test >= 10 they never change R@1/5/10.
    """
    s_i2t = _score_matrix(scores_i2t, "scores_i2t")
    s_t2i = s_i2t.T if scores_t2i is None else _score_matrix(scores_t2i, "scores_t2i")
    n_images, n_texts = s_i2t.shape
    if tuple(s_t2i.shape) != (n_texts, n_images):
        raise ValueError(f"scores_t2i has shape {tuple(s_t2i.shape)}, expected {(n_texts, n_images)}")
    txt2img = [int(i) for i in (txt2img.tolist() if hasattr(txt2img, "tolist") else txt2img)]
    if len(txt2img) != n_texts:
        raise ValueError(f"txt2img has {len(txt2img)} entries for {n_texts} texts")
    if len(img2txt) != n_images:
        raise ValueError(f"img2txt has {len(img2txt)} entries for {n_images} images")
    img2txt = [[int(t) for t in caps] for caps in img2txt]
    return RetrievalRanks(
        txt=_best_target_ranks(s_i2t, img2txt, "img2txt", chunk_rows),
        img=_best_target_ranks(s_t2i, [[i] for i in txt2img], "txt2img", chunk_rows),
    )


def recall_at_k(ranks: Sequence[int], k: int) -> float:
    """Percentage of queries whose 0-based rank is below k, computed as LAVIS does:
    ``100.0 * len(np.where(ranks < k)[0]) / len(ranks)``."""
    if len(ranks) == 0:
        raise ValueError("recall_at_k: no ranks")
    return 100.0 * sum(1 for r in ranks if r < k) / len(ranks)


def retrieval_metrics_from_ranks(ranks: RetrievalRanks) -> dict[str, float]:
    """The metric dict of `retrieval_metrics` from precomputed ranks."""
    out: dict[str, float] = {}
    for side, side_ranks in (("txt", ranks.txt), ("img", ranks.img)):
        for k in RECALL_KS:
            out[f"{side}_r{k}"] = recall_at_k(side_ranks, k)
        out[f"{side}_r_mean"] = sum(out[f"{side}_r{k}"] for k in RECALL_KS) / len(RECALL_KS)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def retrieval_metrics(
    scores_i2t: Any,
    txt2img: Sequence[int] | Any,
    img2txt: Sequence[Sequence[int]],
    scores_t2i: Any | None = None,
) -> dict[str, float]:
    """Recall percentages for image-text retrieval, as LAVIS reports them.

    Keys: ``txt_r1, txt_r5, txt_r10, txt_r_mean`` (text retrieval: image queries), ``img_r1, img_r5, img_r10,
    img_r_mean`` (image retrieval: text queries) and ``r_mean`` (mean of the two means). LAVIS's extra
    ``agg_metrics`` equals ``txt_r_mean``. Arguments and tie rule: see `retrieval_ranks`.
    """
    return retrieval_metrics_from_ranks(retrieval_ranks(scores_i2t, txt2img, img2txt, scores_t2i))


# ----------------------------------------------------------------------------------------------------------
# VQA
# ----------------------------------------------------------------------------------------------------------

VQAVersion = Literal["lavis", "official"]
VQA_VERSIONS: tuple[str, ...] = ("lavis", "official")
DEFAULT_VQA_VERSION: VQAVersion = "lavis"

# Replaced by a space, or deleted (see `process_punctuation`). Apostrophe and colon are deliberately absent
# ("girl's", "2:50"); the period has its own rule.
_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# Official regex, typo included: "(?!<=\d)" is a negative *lookahead* for the text "<=digit", which can never
# match where a "." starts, so the rule is just "a period not followed by a digit" ("5." -> "5", "2.5" kept).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official call is `periodStrip.sub("", outText, re.UNICODE)`: the flag lands in the `count` argument,
# so at most int(re.UNICODE) == 32 periods are removed.
_PERIOD_STRIP_COUNT = int(re.UNICODE)
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# The official table verbatim (ASCII apostrophes), oddities included: the capitalised keys ("Im", "Ive",
# "Id've", "I'dve") can never match because words are lower-cased first, and "somebody'd" maps to "somebodyd".
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}


def _check_version(version: str) -> None:
    if version not in VQA_VERSIONS:
        raise ValueError(f"unknown VQA evaluation version {version!r}; expected one of {VQA_VERSIONS}")


def _clean_whitespace(text: str) -> str:
    """Newlines and tabs to spaces, then strip (the first step the official code applies)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``.

    Each listed punctuation mark is deleted if the *input* text contains it next to a space ("p " or " p"),
    and replaced by a space otherwise. Quirk: if the input contains a digit-comma-digit ("1,000"), every
    listed mark is deleted everywhere ("1,000-2,000" -> "10002000"). Finally up to 32 periods that are not
    followed by a digit are deleted. Case and surrounding whitespace are left alone.
    """
    out = text
    digit_comma_digit = _COMMA_STRIP.search(text) is not None
    for p in _PUNCTUATION:
        if p + " " in text or " " + p in text or digit_comma_digit:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, split on whitespace, number words ("zero".."ten",
    and "none") to digits, drop articles (a, an, the), add missing apostrophes ("dont" -> "don't"), and
    join with single spaces."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str, version: VQAVersion = DEFAULT_VQA_VERSION) -> str:
    """The full normalization the official code applies to a prediction.

    Whitespace cleaning and strip, `process_punctuation`, `process_digit_article`. The string transformation is
    the same in both versions; `version` is validated only. The versions differ in *when* it is applied:
    "lavis" applies it to every prediction, "official" only to questions whose annotators disagree, and then
    to the annotators' answers as well (see `prepare_vqa_answers`). Examples: "Two" -> "2", "a dog" -> "dog",
    "dont" -> "don't", "yes." -> "yes", "1,000" -> "1000".
    """
    _check_version(version)
    return process_digit_article(process_punctuation(_clean_whitespace(answer)))


def prepare_vqa_answers(
    prediction: str, gt_answers: Sequence[str], version: VQAVersion = DEFAULT_VQA_VERSION
) -> tuple[str, list[str]]:
    """The prediction and annotators' answers exactly as the chosen version compares them (see module doc)."""
    _check_version(version)
    if not isinstance(prediction, str):
        raise TypeError(f"VQA prediction must be a str, got {type(prediction).__name__}: {prediction!r}")
    if version == "lavis":
        gts = list(gt_answers)
        if len(set(gts)) > 1:
            gts = [process_punctuation(a) for a in gts]
        return normalize_answer(prediction, version), gts
    pred = _clean_whitespace(prediction)
    gts = [_clean_whitespace(a) for a in gt_answers]
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        pred = process_digit_article(process_punctuation(pred))
    return pred, gts


def vqa_accuracy(prediction: str, gt_answers: Sequence[str], version: VQAVersion = DEFAULT_VQA_VERSION) -> float:
    """VQA accuracy of one prediction in [0, 1].

    Mean over the leave-one-out subsets of the annotators' answers (10 subsets of 9 for VQAv2) of
    ``min(1, matches / 3)``. With m of 10 answers matching: m=0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >=4 -> 1.
    The official code builds each subset as ``[item for item in answers if item != gtAnsDatum]`` over answer
    *dicts*; VQAv2's distinct ``answer_id`` makes that drop exactly one answer, which is what we do.
    """
    pred, gts = prepare_vqa_answers(prediction, gt_answers, version)
    if not gts:
        raise ValueError("vqa_accuracy: no ground-truth answers")
    matches = sum(1 for g in gts if g == pred)
    return sum(min(1, (matches - (g == pred)) / 3) for g in gts) / len(gts)


def _answer_strings(answers: Sequence[Any], qid: Hashable) -> list[str]:
    """Annotators' answers as strings, from VQA-format dicts ({"answer": ...}) or plain strings."""
    out = []
    for a in answers:
        text = a["answer"] if isinstance(a, Mapping) else a
        if not isinstance(text, str):
            raise TypeError(f"question {qid!r}: ground-truth answer {text!r} is not a str")
        out.append(text)
    return out


def vqa_metrics(
    predictions: Mapping[Hashable, str],
    annotations: Sequence[Mapping[str, Any]] | Mapping[Hashable, Mapping[str, Any]],
    version: VQAVersion = DEFAULT_VQA_VERSION,
    ndigits: int = 2,
) -> dict[str, Any]:
    """VQA accuracy over a set of questions, as the official ``VQAEval.evaluate`` reports it.

    Args:
        predictions: question id -> predicted answer.
        annotations: VQA-format annotations, either a list of dicts with "question_id" or a mapping question
            id -> dict. Each dict has "answers" (dicts with "answer", or plain strings), "answer_type" and
            "question_type". As in LAVIS's ``VQA.loadRes``, the prediction and annotation question ids must be
            the same set.
        version: "lavis" (default) or "official"; see the module docstring.
        ndigits: rounding, the official ``n`` (2).

    Returns:
        ``{"overall": float, "per_answer_type": {type: float}, "per_question_type": {type: float},
        "per_question": {qid: float}}``, all percentages rounded to ``ndigits`` like the official code, which
        rounds ``100 * sum(acc) / len(acc)`` once at the end. Questions are visited in annotation order.
    """
    _check_version(version)
    if isinstance(annotations, Mapping):
        items = list(annotations.items())
    else:
        items = [(ann["question_id"], ann) for ann in annotations]
    if not items:
        raise ValueError("vqa_metrics: no annotations")
    ann_ids = [qid for qid, _ in items]
    missing = set(ann_ids) - set(predictions)
    extra = set(predictions) - set(ann_ids)
    if missing or extra:
        raise ValueError(
            f"vqa_metrics: predictions and annotations disagree: {len(missing)} annotated question(s) without a "
            f"prediction (e.g. {sorted(missing, key=repr)[:3]}), {len(extra)} prediction(s) without an "
            f"annotation (e.g. {sorted(extra, key=repr)[:3]}); check the id types (int vs str)"
        )

    per_question: dict[Hashable, float] = {}
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    for qid, ann in items:
        for key in ("answers", "answer_type", "question_type"):
            if key not in ann:
                raise KeyError(f"annotation of question {qid!r} has no {key!r}")
        acc = vqa_accuracy(predictions[qid], _answer_strings(ann["answers"], qid), version)
        per_question[qid] = acc
        by_answer_type.setdefault(ann["answer_type"], []).append(acc)
        by_question_type.setdefault(ann["question_type"], []).append(acc)

    def pct(accs: Sequence[float]) -> float:
        return round(100 * float(sum(accs)) / len(accs), ndigits)

    return {
        "overall": pct(list(per_question.values())),
        "per_answer_type": {t: pct(a) for t, a in by_answer_type.items()},
        "per_question_type": {t: pct(a) for t, a in by_question_type.items()},
        "per_question": {qid: round(100 * acc, ndigits) for qid, acc in per_question.items()},
    }


# ----------------------------------------------------------------------------------------------------------
# GQA
# ----------------------------------------------------------------------------------------------------------


def normalize_gqa_prediction(prediction: str) -> str:
    """LAVIS ``GQATask``'s normalization: `process_punctuation` then `process_digit_article`, without the
    whitespace cleaning and strip that the VQA code applies first."""
    return process_digit_article(process_punctuation(prediction))


def gqa_accuracy(
    predictions: Sequence[str] | Mapping[Hashable, str],
    answers: Sequence[str] | Mapping[Hashable, str],
    normalize_prediction: bool = True,
) -> float:
    """GQA accuracy in percent: exact match of the (normalized) prediction with the single answer.

    As LAVIS's ``GQATask._report_metrics``: only the prediction is normalized (`normalize_gqa_prediction`), and
    only with ``inference_method == "generate"`` (BLIP-2 zero-shot); pass ``normalize_prediction=False`` for
    answers ranked from the answer list. The answer is compared as given. Result: ``sum(hits) / n * 100``,
    unrounded. `predictions` and `answers` are aligned sequences or mappings with the same keys.
    """
    if isinstance(predictions, Mapping) != isinstance(answers, Mapping):
        raise TypeError("gqa_accuracy: predictions and answers must both be sequences or both be mappings")
    if isinstance(predictions, Mapping):
        if set(predictions) != set(answers):
            raise ValueError(
                f"gqa_accuracy: {len(set(answers) - set(predictions))} question(s) without a prediction, "
                f"{len(set(predictions) - set(answers))} prediction(s) without an answer"
            )
        pairs = [(predictions[qid], answers[qid]) for qid in answers]
    else:
        if len(predictions) != len(answers):
            raise ValueError(f"gqa_accuracy: {len(predictions)} predictions for {len(answers)} answers")
        pairs = list(zip(predictions, answers, strict=True))
    if not pairs:
        raise ValueError("gqa_accuracy: no questions")
    hits = [1 if (normalize_gqa_prediction(p) if normalize_prediction else p) == a else 0 for p, a in pairs]
    return sum(hits) / len(hits) * 100
