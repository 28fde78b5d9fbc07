"""Tiny OPT and T5 folders (see tasks.tiny_assets, where they are made for the tiny twin configs too)."""

from tasks.tiny_assets import (  # noqa: F401
    EOS,
    IMAGE,
    PAD,
    SPECIALS,
    VOCAB,
    WORDS,
    tiny_opt_folder,
    tiny_t5_folder,
    word_tokenizer,
)
