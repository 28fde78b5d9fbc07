"""Checkpoints that still load when their run folder moves, and `qformer` help a newcomer can use (issue 13, 7-8)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torch.testing import assert_close

from qformer.checkpoint import load_pretrained, save_pretrained
from qformer.config import QFORMER_PRESETS, Blip2Config, LLMConfig
from qformer.stage2 import Blip2Stage2
from qformer.vision import vision_state_dict
from tasks.cli import build_parser, main
from tasks.config import TrainConfig
from tasks.evals.config import EvalConfig
from tests.helpers import randomized
from tests.llm_helpers import tiny_opt_folder

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["a photo of the cat", "two red dog sitting on the grass"]


def _logits(model: Blip2Stage2, pixels: torch.Tensor) -> torch.Tensor:
    from tasks.stage2 import stage2_outputs

    with torch.no_grad():
        return stage2_outputs(model, CAPTIONS, images=pixels)["logits"]


def test_a_checkpoint_loads_after_its_run_folder_moves(tmp_path, monkeypatch):
    """As the demo lays a run out: paths relative to where training ran, the ViT file and the LLM folder in the run
    folder beside the checkpoint; the whole folder moves, the old place is gone, and `final/` loads from the new.
    Then paths given absolute: a checkpoint moved alone, and the whole folder moved once more."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    llm = tiny_opt_folder(run / "stage0" / "opt")
    cfg = Blip2Config.preset("tiny")
    torch.manual_seed(1)
    vit = run / "stage0" / "vit.pth"
    torch.save(vision_state_dict(Blip2Stage2(dataclasses.replace(cfg, llm=LLMConfig(path=str(llm)))).visual), vit)
    vision = dataclasses.replace(cfg.vision, weights="run/stage0/vit.pth", weights_format="timm")
    cfg = dataclasses.replace(
        cfg,
        vision=vision,
        qformer=cfg.qformer.replace(hidden_dropout=0.0, attention_dropout=0.0),
        llm=LLMConfig(path="run/stage0/opt", dtype="fp32"),
    )
    model = Blip2Stage2(cfg)
    randomized(model.qformer, std=0.3)
    final = save_pretrained(model, "run/stage2/final")
    saved = json.loads((final / "config.json").read_text())
    assert saved["config"]["vision"]["weights"] == "../../stage0/vit.pth"  # relative to the checkpoint folder
    assert saved["config"]["llm"]["path"] == "../../stage0/opt"
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    expected = _logits(model.eval(), pixels)

    moved = tmp_path / "elsewhere" / "moved_run"
    moved.parent.mkdir()
    shutil.move(str(run), str(moved))
    assert not run.exists()
    monkeypatch.chdir(moved.parent)  # neither the old folder nor the old working directory's relative paths work
    again = load_pretrained(moved / "stage2" / "final")
    assert_close(_logits(again, pixels), expected, atol=0, rtol=0)
    assert again.cfg.vision.weights == str(moved / "stage2" / "final" / "../../stage0/vit.pth")

    # Paths given absolute (as `again` now has them) stay absolute, and the relative form travels beside them.
    for name in ("alone", "whole"):
        save_pretrained(again, moved / "stage2" / name)
    saved = json.loads((moved / "stage2" / "whole" / "config.json").read_text())
    assert saved["config"]["vision"]["weights"] == str(moved / "stage0" / "vit.pth")
    assert saved["paths"]["vision.weights"]["relative"] == "../../stage0/vit.pth"
    # A checkpoint moved alone, away from weights that stay put: the absolute path.
    alone = shutil.move(str(moved / "stage2" / "alone"), str(tmp_path / "alone"))
    assert_close(_logits(load_pretrained(alone), pixels), expected, atol=0, rtol=0)
    # The whole run folder moved again: the absolute paths are gone, the relative ones work.
    shutil.move(str(moved), str(tmp_path / "moved_again"))
    assert_close(_logits(load_pretrained(tmp_path / "moved_again" / "stage2" / "whole"), pixels), expected)
    # Weights found nowhere: one error naming the field and the places looked at.
    with pytest.raises(FileNotFoundError, match=r"alone/config.json: vision.weights '/.*' is not there any more"):
        load_pretrained(alone)


# -- help ---------------------------------------------------------------------------------------------------------


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"": parser} | {name: p.load_arguments() for name, p in sub.choices.items()}


def test_every_option_of_every_command_has_help_and_shows_its_default():
    commands = _commands()
    assert set(commands) == {"", "convert", "caption", "ask", "features", "match", "train", "eval", "capfilt", "demo"}
    for name, parser in commands.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            what = f"qformer {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{what} has no help"
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue  # positionals: described (above), no default to show
            if action.nargs == 0:
                continue  # a flag (-v, --fast, --print-config): off unless given
            shown = formatter._expand_help(action)
            assert "default" in shown or "(required)" in shown, f"{what} shows no default: {shown!r}"
    shown = {name: " ".join(parser.format_help().split()) for name, parser in commands.items()}  # unwrapped
    assert {"tiny", "tiny_vitl"} < set(QFORMER_PRESETS)
    for preset in QFORMER_PRESETS:  # the registry's names, each with its image encoder
        assert f"{preset} ({Blip2Config.preset(preset).vision.arch} image encoder)" in shown["convert"]
    # The decoding presets' numbers: beams and length of a caption, and of an answer (short).
    assert "1 = greedy (default: 5)" in shown["caption"] and "generate (default: 30)" in shown["caption"]
    assert "generate (default: 10)" in shown["ask"]
    assert "--print-config print the resolved config" in shown["train"] and "--print-config" in shown["eval"]
    assert "--print-config" in shown["capfilt"]


def test_bad_preset_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["convert", "a.pth", "out", "--from", "lavis", "--preset", "huge"])
    assert stop.value.code == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "module", "config", "override", "key"),
    [
        ("train", "tasks.train", "configs/tiny/stage1_vitg.yaml", "optim.lr=0.123", ("optim", "lr", 0.123)),
        ("eval", "tasks.evaluate", "configs/eval/retrieval_coco.yaml", "k_test=7", ("k_test", None, 7)),
    ],
)
def test_print_config_shows_every_key_and_exits(command, module, config, override, key, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("QFORMER_TINY_RUNS", str(tmp_path / "runs"))  # the tiny config's output_dir: ${oc.env:...}
    config = str(REPO / config)
    args = [config, override, "--print-config"]
    assert main([command, *args]) == 0
    out = capsys.readouterr().out
    assert importlib.import_module(module).main(args) == 0  # python -m tasks.X: the same
    assert capsys.readouterr().out == out
    printed = yaml.safe_load(out)
    schema = TrainConfig if command == "train" else EvalConfig
    assert set(printed) == {f.name for f in dataclasses.fields(schema)}
    top, sub, value = key
    assert (printed[top][sub] if sub else printed[top]) == value
    if command == "train":  # the model's keys too, and interpolations resolved
        assert {"vision", "qformer", "llm"} <= set(printed["model"])
        assert "patch_size_override" in printed["model"]["vision"]
        assert printed["output_dir"] == str(tmp_path / "runs" / "stage1_vitg")
        assert not (tmp_path / "runs").exists()  # nothing trained, nothing written
