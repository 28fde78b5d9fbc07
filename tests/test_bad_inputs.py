"""Bad input through the real entry points: `qformer X ...` (tasks.cli.main) and `python -m tasks.X ...` (the
module's `main`), called in-process. Every case must end in one line `qformer X: error: ...` naming what is wrong,
exit code 2 and no traceback; `-v` / `--debug` (before or after the command name) add the traceback."""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from qformer.bert import load_tokenizer
from qformer.blip2 import Blip2Stage1
from qformer.checkpoint import save_pretrained
from qformer.config import Blip2Config, LLMConfig
from qformer.stage2 import Blip2Stage2
from tasks import evaluate as evaluate_module
from tasks import train as train_module
from tasks.cli import main as qformer
from tasks.tiny_assets import caption_dataset, tiny_bert_folder, tiny_opt_folder
from tests.train_helpers import tiny_stage1_config, write_config

BOMB_PIXELS = 20_000 * 20_000


def bomb_png(path: Path) -> Path:
    """A 1x1 PNG whose header claims 20000 x 20000 pixels: PIL refuses it on open, before decoding anything."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", 20_000, 20_000)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR CRC over type + data
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(autouse=True)
def _pixel_limit():
    """The configured pixel limit is PIL's process-wide one: give it back as it was after each case."""
    before = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = before


def tiny_cfg(**changes) -> Blip2Config:
    cfg = Blip2Config.preset("tiny")
    return dataclasses.replace(cfg, qformer=cfg.qformer.replace(hidden_dropout=0.0, attention_dropout=0.0), **changes)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Tiny stage-1 and stage-2 checkpoints, a BERT folder, a caption dataset, eval files, and the bad inputs."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    bert = tiny_bert_folder(tmp / "bert")
    torch.manual_seed(0)
    stage1 = save_pretrained(Blip2Stage1(tiny_cfg()), tmp / "stage1", tokenizer=load_tokenizer(bert))
    llm = tiny_opt_folder(tmp / "opt")
    stage2 = save_pretrained(Blip2Stage2(tiny_cfg(llm=LLMConfig(path=str(llm), dtype="fp32"))), tmp / "stage2")
    ann = caption_dataset(tmp / "data", n=8)
    entries = json.loads(ann.read_text())
    f = {"tmp": tmp, "bert": bert, "stage1": stage1, "stage2": stage2, "ann": ann, "image": ann.parent / "images"}
    f["jpg"] = f["image"] / "000.jpg"
    f["bomb"] = bomb_png(tmp / "bomb.png")

    def write(name: str, text: str) -> Path:
        (tmp / name).write_text(text)
        return tmp / name

    f["bad_yaml"] = write("bad.yaml", "task: retrieval\ncheckpoint: [a, b\noutput_dir: x\n")
    f["folder"] = tmp / "a_folder"
    f["folder"].mkdir()
    f["int_image"] = write("int_image.json", json.dumps([{**entries[0], "image": 7}] + entries[1:]))
    f["int_caption"] = write("int_caption.json", json.dumps(entries[:3] + [{**entries[3], "caption": ["a", 5]}]))
    f["bad_json"] = write("bad_json.json", json.dumps(entries)[:-40] + "}, ]")
    f["missing_images"] = write(
        "missing_images.json", json.dumps([{**e, "image": f"gone/{e['image']}"} for e in entries])
    )
    questions = {"questions": [{"question_id": 1, "image_id": 0, "question": "what colour is it?"}]}
    f["questions"] = write("questions.json", json.dumps(questions))
    f["annotations_3"] = write(
        "annotations_3.json", json.dumps({"annotations": [{"question_id": 1, "answers": [{"answer": "red"}] * 3}]})
    )
    f["retrieval"] = write(
        "retrieval.json", json.dumps([{"image": e["image"], "caption": e["caption"]} for e in entries])
    )
    f["retrieval_missing"] = write(
        "retrieval_missing.json", json.dumps([*entries[:2], {**entries[2], "image": "gone.jpg"}])
    )
    return f


def call(entry: str, argv: list[str], capsys) -> tuple[int, str]:
    """Run `qformer ARGV` ("qformer") or `python -m tasks.X ARGV[1:]` ("python -m", X = ARGV[0]) in-process:
    (exit code, stderr)."""
    capsys.readouterr()
    try:
        if entry == "qformer":
            code = qformer(argv)
        else:
            module = {"train": train_module, "eval": evaluate_module}[argv[0]]
            code = module.main(argv[1:])
    except SystemExit as stop:  # argparse's own usage errors
        code = stop.code
    return code, capsys.readouterr().err


def one_error_line(err: str, command: str) -> str:
    """The single `qformer COMMAND: error: ...` line of `err` (the last line), with no traceback before it."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"qformer {command}: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


def corrupt(files) -> Path:
    """A caption dataset of 8 images whose first is a truncated JPEG."""
    root = files["tmp"] / "corrupt"
    return root / "train.json" if (root / "train.json").exists() else caption_dataset(root, n=8, corrupt=1)


def train_config(files, name: str, ann: Path | None = None, **changes) -> Path:
    cfg = tiny_stage1_config(files["tmp"], ann or files["ann"], files["tmp"] / f"run_{name}", files["bert"])
    cfg["optim"]["total_steps"] = 2
    for key, value in changes.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    return write_config(files["tmp"] / f"{name}.yaml", **cfg)


def eval_args(files, name: str, **overrides) -> list[str]:
    values = {"output_dir": str(files["tmp"] / f"eval_{name}"), "num_workers": 0, "batch_size": 4, **overrides}
    return ["eval", *(f"{k}={v}" for k, v in values.items())]


# name -> (argv from the files, what the one line must hold). Each runs as `qformer X ...` and `python -m tasks.X ...`.
CASES = {
    "yaml syntax error (train)": (
        lambda f: ["train", str(f["bad_yaml"])],
        ["bad.yaml: not valid YAML: did not find expected ',' or ']' at line 3, column 11"],
    ),
    "yaml syntax error (eval)": (lambda f: ["eval", str(f["bad_yaml"])], ["bad.yaml: not valid YAML", "line 3"]),
    "folder as config (train)": (lambda f: ["train", str(f["folder"])], ["a_folder is a folder, not a YAML config"]),
    "folder as config (eval)": (lambda f: ["eval", str(f["folder"])], ["a_folder is a folder, not a YAML config"]),
    "image: 7 in a caption JSON": (
        lambda f: ["train", str(train_config(f, "int_image", f["int_image"]))],
        ["int_image.json[0]: 'image' must be a path", "got 7"],
    ),
    "caption neither str nor list of str": (
        lambda f: ["train", str(train_config(f, "int_caption", f["int_caption"]))],
        ["int_caption.json[3]: 'caption' must be a string or a non-empty list of strings"],
    ),
    "invalid caption JSON": (
        lambda f: ["train", str(train_config(f, "bad_json", f["bad_json"]))],
        ["bad_json.json is not valid JSON", "line 1 column"],
    ),
    "a batch whose samples are all bad": (
        lambda f: ["train", str(train_config(f, "all_bad", f["missing_images"]))],
        ["a batch of 4 sample(s) has none usable", "gone/images/00", "FileNotFoundError"],
    ),
    "too many bad images": (
        lambda f: [
            "train",
            str(train_config(f, "strict", corrupt(f))),
            "data.max_skip_fraction=0.01",
            "data.min_samples_before_check=4",
        ],
        ["too many bad samples", "max_skip_fraction=0.01", "000.jpg"],
    ),
    "decompression bomb, configured pixel limit (train)": (
        lambda f: ["train", str(train_config(f, "limit", data={"max_image_pixels": 1000}))],
        ["has none usable", "1,600 pixels, above the limit of 1,000 (max_image_pixels"],
    ),
    "decompression bomb, configured pixel limit (eval)": (
        lambda f: (
            eval_args(
                f,
                "limit",
                task="retrieval",
                checkpoint=f["stage1"],
                ann_path=f["retrieval"],
                image_root=f["ann"].parent,
            )
            + ["max_image_pixels=1000"]
        ),
        ["evaluation image", "000.jpg: 1,600 pixels, above the limit of 1,000"],
    ),
    "a missing evaluation image (DataLoader workers)": (
        lambda f: eval_args(
            f,
            "missing",
            task="retrieval",
            checkpoint=f["stage1"],
            ann_path=f["retrieval_missing"],
            image_root=f["ann"].parent,
            num_workers=1,
        ),
        ["evaluation image not found", "gone.jpg"],
    ),
    "VQA evaluation given a stage-1 checkpoint": (
        lambda f: eval_args(f, "vqa1", task="vqa", checkpoint=f["stage1"], questions=f["questions"]),
        ["stage1 holds a Blip2Stage1 (stage 1): vqa evaluation needs a stage-2 (LLM) checkpoint"],
    ),
    "retrieval evaluation given a questions file": (
        lambda f: eval_args(f, "retq", task="retrieval", checkpoint=f["stage1"], ann_path=f["questions"]),
        ["questions.json: expected a JSON list", "a VQA questions file? (task=vqa)"],
    ),
    "VQA annotations with 3 answers, strict": (
        lambda f: eval_args(
            f,
            "strict",
            task="vqa",
            checkpoint=f["stage2"],
            questions=f["questions"],
            annotations=f["annotations_3"],
            image_root=f["image"],
            strict_annotations="true",
        ),
        ["annotations_3.json: 1 of 1 annotations have other than 10 answers (1 with 3", "strict_annotations=true"],
    ),
}
ENTRY_CASES = [(entry, name) for name in CASES for entry in ("qformer", "python -m")]


@pytest.mark.parametrize(("entry", "name"), ENTRY_CASES, ids=[f"{e}: {n}" for e, n in ENTRY_CASES])
def test_bad_input_is_one_line_exit_2(files, entry, name, capsys):
    argv_of, expected = CASES[name]
    argv = [str(a) for a in argv_of(files)]
    code, err = call(entry, argv, capsys)
    line = one_error_line(err, argv[0])
    assert code == 2, err
    for part in expected:
        assert part in line, (part, line)


@pytest.mark.parametrize(
    ("prompt", "has"), [("hi", "has: none"), ("{q}", "has: {q}"), ("{} {}", "has: {}, {}"), ("{", "Single '{'")]
)
def test_ask_prompt_needs_exactly_one_placeholder(files, prompt, has, capsys):
    code, err = call(
        "qformer", ["ask", str(files["jpg"]), "what?", "--checkpoint", str(files["stage2"]), "--prompt", prompt], capsys
    )
    line = one_error_line(err, "ask")
    assert code == 2 and f"prompt {prompt!r}" in line and has in line


def test_convert_unknown_preset(files, capsys):
    code, err = call(
        "qformer",
        ["convert", str(files["tmp"] / "x.pth"), str(files["tmp"] / "out"), "--from", "lavis", "--preset", "huge"],
        capsys,
    )
    assert code == 2 and "Traceback" not in err
    assert "huge" in err.strip().splitlines()[-1] and "tiny" in err.strip().splitlines()[-1]


def test_decompression_bomb_names_the_image_and_its_pixels(files, capsys):
    code, err = call("qformer", ["caption", str(files["bomb"]), "--checkpoint", str(files["stage1"])], capsys)
    line = one_error_line(err, "caption")
    assert code == 2 and f"bomb.png: {BOMB_PIXELS:,} pixels, above the limit of 89,478,485" in line


@pytest.mark.parametrize("flag", ["-v", "--debug"])
@pytest.mark.parametrize("where", ["before", "after", "python -m"])
def test_verbose_adds_the_traceback_before_or_after_the_command(files, flag, where, capsys):
    config = str(files["folder"])
    if where == "before":
        code, err = call("qformer", [flag, "train", config], capsys)
    elif where == "after":
        code, err = call("qformer", ["train", config, flag], capsys)
    else:
        code, err = call("python -m", ["train", config, flag], capsys)
    assert code == 2
    assert "Traceback (most recent call last)" in err and "ConfigError" in err
    assert err.strip().splitlines()[-1] == f"qformer train: error: {config} is a folder, not a YAML config file"
