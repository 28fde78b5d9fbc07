"""`qformer caption` decoding options on a tiny stage-1 checkpoint: sampling (repeatable with --seed), several
captions per image, and clear errors for options that would not act."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qformer.bert import load_tokenizer
from qformer.blip2 import Blip2Stage1
from qformer.checkpoint import save_pretrained
from qformer.config import Blip2Config
from tasks.cli import main
from tasks.tiny_assets import tiny_bert_folder
from tests.helpers import randomized
from tests.test_cli import write_jpegs


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generation_cli")
    cfg = Blip2Config.preset("tiny")
    cfg = dataclasses.replace(cfg, qformer=cfg.qformer.replace(hidden_dropout=0.0, attention_dropout=0.0))
    torch.manual_seed(0)
    model = randomized(Blip2Stage1(cfg), std=0.3)
    folder = save_pretrained(model, tmp / "ckpt", tokenizer=load_tokenizer(tiny_bert_folder(tmp / "bert")))
    return folder, write_jpegs(tmp / "imgs")


def _captions(capsys, *args):
    assert main(["caption", *args]) == 0
    return [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]


def test_sampled_captions_repeat_with_a_seed_and_come_n_per_image(stage1, capsys):
    folder, images = stage1
    args = [*images, "--checkpoint", str(folder), "--max-new-tokens", "6", "--sample", "--num-captions", "3"]
    first = _captions(capsys, *args, "--seed", "3")
    assert [path for path, _ in first] == [images[0]] * 3 + [images[1]] * 3
    assert _captions(capsys, *args, "--seed", "3") == first
    assert _captions(capsys, *args, "--seed", "4", "--top-p", "1.0", "--temperature", "2.0") != first


def test_beam_captions_n_best_per_image(stage1, capsys):
    folder, images = stage1
    lines = _captions(
        capsys,
        *images,
        "--checkpoint",
        str(folder),
        "--max-new-tokens",
        "4",
        "--beams",
        "3",
        "--num-captions",
        "2",
        "--length-penalty",
        "0",
        "--repetition-penalty",
        "1.2",
    )
    assert [path for path, _ in lines] == [images[0]] * 2 + [images[1]] * 2


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--top-p", "0.5"], "only act with --sample"),
        (["--beams", "2", "--num-captions", "3"], "num_return_sequences"),
        (["--sample", "--top-p", "0"], "top_p"),
    ],
)
def test_decoding_options_that_cannot_act_are_one_line_errors(stage1, capsys, bad, message):
    folder, images = stage1
    assert main(["caption", images[0], "--checkpoint", str(folder), *bad]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
