"""Stage 2's prefix LM for T5: the split of each caption, and `LLMConfig.prefix_lm_full_caption` (the share of
captions given whole to the decoder, with no text prefix after the soft prompt)."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from torch.testing import assert_close

from qformer.config import Blip2Config, LLMConfig
from qformer.stage2 import Blip2Stage2
from tasks.stage2 import prefix_lm_split, stage2_outputs
from tests.llm_helpers import tiny_t5_folder

CAPTION = "a big red circle at the top left and a small blue square in the center"


def _split_by_hand(text: str, rng: random.Random) -> tuple[str, str]:
    words = text.split()
    k = rng.randint(1, len(words) // 2)
    return " ".join(words[:k]), " ".join(words[k:])


def test_default_split_is_uniform_in_one_to_half_and_draws_as_before():
    a, b = random.Random(3), random.Random(3)
    prefixes = set()
    for _ in range(500):
        got = prefix_lm_split(CAPTION, a)
        assert got == _split_by_hand(CAPTION, b)  # same draws: a run without the option is unchanged
        prefixes.add(len(got[0].split()))
    assert prefixes == set(range(1, len(CAPTION.split()) // 2 + 1))


def test_full_caption_share():
    rng = random.Random(0)
    splits = [prefix_lm_split(CAPTION, rng, 0.5) for _ in range(4000)]
    whole = sum(s == ("", CAPTION) for s in splits) / len(splits)
    assert 0.46 < whole < 0.54
    assert all(p == "" or " ".join([p, r]) == CAPTION for p, r in splits)
    assert prefix_lm_split(CAPTION, rng, 1.0) == ("", CAPTION)


def test_config_rejects_a_share_outside_zero_one():
    with pytest.raises(ValueError, match="prefix_lm_full_caption"):
        LLMConfig(prefix_lm_full_caption=1.5)


def test_t5_loss_with_every_caption_whole_is_the_loss_of_an_empty_prefix(tmp_path):
    cfg = Blip2Config.preset("tiny")
    llm = LLMConfig(path=str(tiny_t5_folder(tmp_path)), dtype="fp32", prefix_lm_full_caption=1.0)
    cfg = dataclasses.replace(cfg, qformer=cfg.qformer.replace(hidden_dropout=0.0, attention_dropout=0.0), llm=llm)
    torch.manual_seed(0)
    model = Blip2Stage2(cfg).eval()
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    captions = ["a photo of the cat", "two red dog sitting on the grass"]
    got = stage2_outputs(model, captions, images=images, rng=random.Random(0))["loss"]
    expected = stage2_outputs(model, [""] * 2, images=images, text_output=captions)["loss"]
    assert_close(got, expected, atol=0, rtol=0)
    # With the paper's split (no whole captions) the targets are shorter: a different loss.
    model.cfg = dataclasses.replace(model.cfg, llm=dataclasses.replace(llm, prefix_lm_full_caption=0.0))
    assert not torch.allclose(stage2_outputs(model, captions, images=images, rng=random.Random(0))["loss"], expected)
