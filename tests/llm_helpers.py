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

# transformers' side of the "tiny" image encoder (its ViT eps, 1e-6, is the default of Blip2VisionConfig).
TINY_VISION = dict(
    hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14
)
