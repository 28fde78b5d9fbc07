"""OK-VQA answer lemmatisation as LAVIS applies it (DESIGN.md section 9), on with `lemmatize: true`.

LAVIS's BLIP-2 `predict_answers` (`blip2_t5.py` / `blip2_opt.py`, `apply_lemmatizer: True` in its OK-VQA eval
configs) passes every *predicted* answer through `_lemmatize` before the answers are saved and scored; the
annotators' answers are left alone::

    doc = self.lemmatizer(answer)          # spacy.load("en_core_web_sm")
    for token in doc:
        if token.pos_ in ["NOUN", "VERB"]:
            words.append(token.lemma_)
        else:
            words.append(token.text)
    answer = " ".join(words)

So "two dogs" -> "two dog", "running" -> "run", while numbers, "yes"/"no", adjectives and auxiliaries keep their
text; the tokens are joined by single spaces ("don't" -> "do n't"). spaCy is an optional extra (`pip install -e
".[okvqa]"`); its English model is not on PyPI, and a missing one is a one-line error saying how to get it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["LEMMATIZED_POS", "LemmatizerUnavailable", "lemmatize_answer", "lemmatize_answers", "load_lemmatizer"]

LEMMATIZED_POS = ("NOUN", "VERB")  # the reference's list: every other part of speech keeps its text
EN_CORE_WEB_SM_WHEEL = "https://github.com/explosion/spacy-models/releases/download/en_core_web_sm-3.8.0/en_core_web_sm-3.8.0-py3-none-any.whl"
_INSTALL = (
    f"pip install -e '.[okvqa]' (spaCy and en_core_web_sm), or pip install 'spacy>=3.7,<4' {EN_CORE_WEB_SM_WHEEL}, "
    "or pip install spacy && python -m spacy download en_core_web_sm"
)


class LemmatizerUnavailable(ValueError):
    """`lemmatize: true` but spaCy or the configured pipeline cannot be loaded (bad input: one line, exit 2)."""


def lemmatize_answer(answer: str, nlp: Any) -> str:
    """One predicted answer as the reference lemmatises it: a token's lemma if spaCy tags it NOUN or VERB, else
    its text, joined by spaces."""
    return " ".join(t.lemma_ if t.pos_ in LEMMATIZED_POS else t.text for t in nlp(answer))


def lemmatize_answers(answers: Sequence[str], nlp: Any) -> list[str]:
    """Every answer through `lemmatize_answer`, one spaCy call each, as the reference does."""
    return [lemmatize_answer(a, nlp) for a in answers]


@functools.lru_cache(maxsize=2)
def load_lemmatizer(model: str = "en_core_web_sm") -> Any:
    """The spaCy pipeline `model` (an installed package name or a pipeline folder); it must tag parts of speech and
    lemmatise. A missing spaCy or pipeline is a `LemmatizerUnavailable` naming both ways to install it. Loaded once
    per process: `tasks.evaluate` asks for it before the checkpoint loads, so a missing one fails in seconds."""
    try:
        import spacy
    except ImportError as e:
        raise LemmatizerUnavailable(
            "lemmatize: true needs spaCy and its English model en_core_web_sm, and spaCy is not installed: "
            f"{_INSTALL}; or set lemmatize=false"
        ) from e
    try:
        nlp = spacy.load(model)
    except OSError as e:
        raise LemmatizerUnavailable(
            f"lemmatize: true: spaCy cannot load lemmatizer_model {model!r} (neither an installed pipeline package "
            f"nor a pipeline folder; en_core_web_sm is not on PyPI): {_INSTALL}; or set lemmatizer_model to a "
            "pipeline folder, or lemmatize=false"
        ) from e
    if "lemmatizer" not in nlp.pipe_names:
        raise LemmatizerUnavailable(
            f"lemmatizer_model {model!r} has no lemmatizer component (its pipeline: "
            f"{', '.join(nlp.pipe_names) or 'empty'}): use en_core_web_sm, as the reference does"
        )
    logger.info(
        "lemmatising predicted answers with spaCy %s %s (%s)", spacy.__version__, model, ", ".join(nlp.pipe_names)
    )
    return nlp
