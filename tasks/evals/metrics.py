"""Answer metrics (DESIGN.md section 9): VQA accuracy, GQA accuracy. Retrieval recall: `retrieval_metrics.py`.

Pure functions: no I/O, no process group, no model. Inputs are plain Python containers, numpy arrays or
torch tensors; outputs are Python numbers, lists and dicts, ready to log or write out.

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
from typing import Any, Literal

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
