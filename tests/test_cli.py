"""Our checkpoint folders and the `qformer` command line on files written here (LAVIS .pth, JPEGs, LLM folders)."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.testing import assert_close

from qformer.blip2 import Blip2Stage1, stage1_state_dict
from qformer.checkpoint import CheckpointError, load_pretrained, read_state_dict, save_pretrained
from qformer.config import Blip2Config, LLMConfig
from qformer.stage2 import Blip2Stage2, stage2_state_dict
from qformer.vision import vision_state_dict
from tasks.cli import load_images, main
from tests.helpers import randomized
from tests.llm_helpers import tiny_opt_folder

BERT_WORDS = "a photo of the cat dog bird red blue green small big two on under table grass sky".split()


def tiny_bert_tokenizer_folder(path):
    """A BERT WordPiece tokenizer with 99 entries, so `[DEC]` gets id 99 = the tiny Q-Former's last row."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + BERT_WORDS
    vocab += [f"w{i}" for i in range(99 - len(vocab))]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast.from_pretrained(str(path)).save_pretrained(path)  # reads vocab.txt
    return path


def write_jpegs(folder, n=2):
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        pixels = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        paths.append(folder / f"img{i}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=95)
    return [str(p) for p in paths]


def tiny_cfg(**changes) -> Blip2Config:
    cfg = Blip2Config.preset("tiny")
    return dataclasses.replace(cfg, qformer=cfg.qformer.replace(hidden_dropout=0.0, attention_dropout=0.0), **changes)


@pytest.fixture()
def vit_file(tmp_path):
    """A frozen-ViT weights file, as users have eva_vit_g.pth beside their BLIP-2 checkpoints."""
    torch.manual_seed(1)
    source = Blip2Stage1(tiny_cfg())
    path = tmp_path / "tiny_vit.pth"
    torch.save(vision_state_dict(source.visual, "lavis"), path)
    return path


def vit_from(vit_file):
    """The tiny ViT exactly as the weights file has it."""
    vision = dataclasses.replace(Blip2Config.preset("tiny").vision, weights=str(vit_file))
    return Blip2Stage1(tiny_cfg(vision=vision)).visual


def test_stage1_checkpoint_round_trip_leaves_out_a_rebuildable_vit(tmp_path, vit_file):
    cfg = tiny_cfg(vision=dataclasses.replace(Blip2Config.preset("tiny").vision, weights=str(vit_file)))
    model = randomized(Blip2Stage1(cfg), std=0.3)
    model.visual.load_state_dict(Blip2Stage1(cfg).visual.state_dict())  # the ViT as its file has it
    save_pretrained(model, tmp_path / "ckpt")
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert not any(k.startswith("visual.") for k in saved) and "qformer.query_tokens" in saved
    restored = load_pretrained(tmp_path / "ckpt")
    images = torch.randn(2, 3, 28, 28)
    ids, mask = torch.randint(5, 90, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    assert_close(restored.match(images, ids, mask), model.match(images, ids, mask), atol=0, rtol=0)


def test_damaged_checkpoints_name_the_file_and_the_problem(tmp_path):
    model = Blip2Stage1(tiny_cfg())
    folder = save_pretrained(model, tmp_path / "ckpt")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(folder)
    pth = tmp_path / "broken.pth"
    torch.save({"model": stage1_state_dict(model, "lavis")}, pth)
    pth.write_bytes(pth.read_bytes()[:-200])
    with pytest.raises(CheckpointError, match="broken.pth"):
        read_state_dict(pth)
    (folder / "config.json").write_text('{"stage": "stage1", "config": {"qformer": {"hiden_size": 3}}}')
    with pytest.raises(ValueError, match="hiden_size"):
        load_pretrained(folder)


def test_cli_converts_a_lavis_stage1_file_then_captions_and_extracts(tmp_path, vit_file, capsys):
    model = randomized(Blip2Stage1(tiny_cfg()), std=0.3)
    model.visual.load_state_dict(vit_from(vit_file).state_dict())
    torch.save({"model": stage1_state_dict(model, "lavis", include_visual=False)}, tmp_path / "blip2_pretrained.pth")
    bert = tiny_bert_tokenizer_folder(tmp_path / "bert")
    out = tmp_path / "ckpt"
    args = ["convert", str(tmp_path / "blip2_pretrained.pth"), str(out), "--from", "lavis", "--preset", "tiny"]
    # A LAVIS stage-1 file has no ViT: without --vision-weights that is a clear error, not a random encoder.
    assert main(args) == 2
    assert "--vision-weights" in capsys.readouterr().err
    assert main([*args, "--vision-weights", str(vit_file), "--bert", str(bert)]) == 0

    images = write_jpegs(tmp_path / "imgs")
    assert main(["caption", *images, "--checkpoint", str(out), "--beams", "2", "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[-2:]
    assert [line.split("\t")[0] for line in lines] == images

    assert (
        main(
            ["features", *images, "--checkpoint", str(out), "--mode", "image", "--out", str(tmp_path / "f.safetensors")]
        )
        == 0
    )
    feats = load_file(tmp_path / "f.safetensors")
    expected = model.extract_features(load_images(images, 28), mode="image")
    assert_close(feats["image_embeds_proj"], expected.image_embeds_proj, atol=1e-6, rtol=0)
    assert (
        main(
            [
                "features",
                "--text",
                "a red cat",
                "--text",
                "two dogs",
                "--checkpoint",
                str(out),
                "--mode",
                "text",
                "--out",
                str(tmp_path / "t.npy"),
            ]
        )
        == 0
    )
    import numpy as np

    assert np.load(tmp_path / "t.npy").shape == (2, model.cfg.embed_dim)


def test_cli_stage2_lavis_file_then_ask(tmp_path, vit_file, capsys):
    llm = tiny_opt_folder(tmp_path / "opt")
    cfg = tiny_cfg(llm=LLMConfig(path=str(llm), dtype="fp32"))
    model = Blip2Stage2(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(("llm.", "visual.")):
                p.normal_(0.0, 0.3)
    model.visual.load_state_dict(vit_from(vit_file).state_dict())
    state = stage2_state_dict(model, "lavis", include_visual=False)
    assert "opt_proj.weight" in state and not any(k.startswith("language_model") for k in state)
    torch.save({"model": state}, tmp_path / "blip2_opt.pth")
    out = tmp_path / "ckpt"
    convert = [
        "convert",
        str(tmp_path / "blip2_opt.pth"),
        str(out),
        "--from",
        "lavis",
        "--preset",
        "tiny",
        "--vision-weights",
        str(vit_file),
        "--llm-dtype",
        "fp32",
    ]
    assert main(convert) == 2 and "--llm" in capsys.readouterr().err
    assert main([*convert, "--llm", str(llm)]) == 0
    images = write_jpegs(tmp_path / "imgs", n=1)
    assert main(["ask", images[0], "what colour is the cat?", "--checkpoint", str(out)]) == 0
    answer = capsys.readouterr().out.strip().splitlines()[-1]
    assert answer == model.eval().predict_answers(["what colour is the cat?"], images=load_images(images, 28))[0]


def test_cli_bad_input_is_a_clear_error(tmp_path, capsys):
    folder = save_pretrained(Blip2Stage1(tiny_cfg()), tmp_path / "ckpt")
    assert main(["caption", str(tmp_path / "missing.jpg"), "--checkpoint", str(folder)]) == 2
    assert "missing.jpg" in capsys.readouterr().err
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    assert main(["caption", str(bad), "--checkpoint", str(folder)]) == 2
    assert "bad.jpg" in capsys.readouterr().err
    assert main(["caption", str(bad), "--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


# -- one way into every command ------------------------------------------------------------------------------------

# The entry point as a user starts it, with the command's real work replaced by two log lines, so that only the
# parsing and logging set-up of that entry point run.
ENTRY_SCRIPT = """
import logging, sys
import {module} as command
def work(cfg):
    logging.getLogger("{module}").info("would run %s", type(cfg).__name__)
    logging.getLogger("{module}").debug("not shown at INFO")
    return {{}}
command.{work} = work
if sys.argv[1] == "qformer":
    from tasks.cli import main
    code = main(["{name}", *sys.argv[2:]])
else:
    code = command.main(sys.argv[2:])
print("root level", logging.getLogger().level, file=sys.stderr)
sys.exit(code)
"""
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", re.MULTILINE)


@pytest.mark.parametrize(
    ("name", "module", "work", "overrides"),
    [
        ("train", "tasks.train", "train", ["stage=stage1", "model_preset=tiny", "output_dir=never"]),
        ("eval", "tasks.evaluate", "evaluate", ["task=retrieval", "checkpoint=none", "output_dir=never"]),
    ],
)
def test_qformer_x_and_python_m_log_the_same_lines(name, module, work, overrides, tmp_path):
    script = ENTRY_SCRIPT.format(module=module, work=work, name=name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = {}
    for way in ("qformer", "python -m"):
        done = subprocess.run(
            [sys.executable, "-c", script, way, *overrides], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert TIMESTAMP.search(done.stderr), done.stderr  # the one format, tasks.log.FORMAT
        logs[way] = TIMESTAMP.sub("", done.stderr)
    assert f"INFO {module}: would run" in logs["qformer"]
    assert "not shown" not in logs["qformer"]
    assert logs["qformer"] == logs["python -m"]
    assert f"root level {logging.INFO}" in logs["qformer"]


def test_qformer_help_imports_no_command_module():
    check = (
        "import sys; from tasks.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'tasks.train', 'tasks.evaluate', 'tasks.shapes.demo', 'tasks.convert', "
        "'tasks.match') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_train_and_eval_share_their_parser_with_python_m(tmp_path, capsys):
    from tasks import evaluate, train
    from tasks.cli import build_parser
    from tasks.command import command_parser, config_and_overrides

    for name, module in (("train", train), ("eval", evaluate)):
        args = build_parser().parse_args([name, "a.yaml", "x=1", "y=2"])
        assert args.func is module.run and config_and_overrides(args) == ("a.yaml", ["x=1", "y=2"])
        args = command_parser(name, module.add_arguments).parse_args(["x=1", "y=2"])
        assert config_and_overrides(args) == (None, ["x=1", "y=2"])
        # Bad input is one line naming the command, exit code 2, either way in.
        for entry in (module.main, lambda argv, name=name: main([name, *argv])):
            assert entry([str(tmp_path / "missing.yaml")]) == 2
            err = capsys.readouterr().err.strip()
            assert err == f"qformer {name}: error: config file not found: {tmp_path / 'missing.yaml'}"
        with pytest.raises(SystemExit) as stop:
            module.main([])
        assert stop.value.code == 2
        assert f"qformer {name}: error: the following arguments are required: config" in capsys.readouterr().err


def test_convert_and_match_are_their_modules_commands(capsys):
    from tasks import convert, match
    from tasks.cli import build_parser

    args = build_parser().parse_args(["convert", "a.pth", "out", "--from", "lavis", "--llm", "opt"])
    assert args.func is convert.run and (args.source, args.dest, args.src_fmt, args.llm) == (
        "a.pth",
        "out",
        "lavis",
        "opt",
    )
    assert build_parser().parse_args(["match", "a.jpg", "a dog", "--checkpoint", "c"]).func is match.run
    with pytest.raises(SystemExit) as done:
        convert.main(["--help"])  # python -m tasks.convert
    assert done.value.code == 0 and "--vision-weights" in capsys.readouterr().out
