"""Caption and question cleaning, as BLIP/LAVIS do it.

Reproduces `BlipCaptionProcessor.pre_caption` and `BlipQuestionProcessor.pre_question` from LAVIS
(`lavis/processors/blip_processors.py`) character for character:

- caption: lower-case; each of the characters ``. ! " ( ) * # : ; ~`` becomes a space; every run of two or
  more whitespace characters becomes one space (a single tab or newline is left alone, as in LAVIS); one
  trailing newline run is stripped, then leading/trailing spaces; the result is cut to `max_words` words
  split on single spaces. A prompt, when given, is prepended to the cleaned caption (not cleaned itself).
- question: lower-case; the same characters are *deleted* (not replaced by a space); trailing spaces are
  stripped (leading ones are kept, repeated spaces are not collapsed); cut to `max_words` words.

Commas, apostrophes, question marks, hyphens and slashes survive both. `has_words` tells a caption that cleaning
leaves with words from an empty or blank one (or one of punctuation only), which the datasets skip as bad samples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["CaptionProcessor", "clean_caption", "clean_question", "has_words"]

# The LAVIS character class: . ! " ( ) * # : ; ~
_PUNCT = re.compile(r"([.!\"()*#:;~])")
_MULTI_SPACE = re.compile(r"\s{2,}")
_WORD_CHAR = re.compile(r"[^\s.!\"()*#:;~]")  # neither whitespace nor a character cleaning removes


def _truncate(text: str, max_words: int) -> str:
    words = text.split(" ")
    if len(words) > max_words:
        return " ".join(words[:max_words])
    return text


def clean_caption(text: str, max_words: int = 50, prompt: str = "") -> str:
    """LAVIS `pre_caption`, optionally prefixed with `prompt` (LAVIS `BlipCaptionProcessor.__call__`)."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}: {text!r}")
    caption = _PUNCT.sub(" ", text.lower())
    caption = _MULTI_SPACE.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    return prompt + _truncate(caption, max_words)


def has_words(text: str) -> bool:
    """Whether `text` has a character that is neither whitespace nor one of the characters cleaning removes: False
    for an empty or blank caption, or one of punctuation only (`"..."`), which would train on the prompt alone."""
    return _WORD_CHAR.search(text) is not None


def clean_question(text: str, max_words: int = 50) -> str:
    """LAVIS `pre_question`."""
    if not isinstance(text, str):
        raise TypeError(f"question must be a str, got {type(text).__name__}: {text!r}")
    question = _PUNCT.sub("", text.lower()).rstrip(" ")
    return _truncate(question, max_words)


@dataclass(frozen=True)
class CaptionProcessor:
    """Picklable caption cleaner (travels to DataLoader workers): `prompt + clean_caption(text)`."""

    max_words: int = 50
    prompt: str = ""

    def __call__(self, text: str) -> str:
        return clean_caption(text, max_words=self.max_words, prompt=self.prompt)
