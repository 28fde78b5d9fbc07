"""`qformer match IMAGE TEXT ... --checkpoint CKPT` through the CLI on tiny checkpoints written here."""

from __future__ import annotations

import json

import pytest
import torch

from qformer.bert import load_tokenizer
from qformer.blip2 import Blip2Stage1
from qformer.checkpoint import load_pretrained, save_pretrained
from qformer.config import LLMConfig
from qformer.stage2 import Blip2Stage2
from tasks import match as match_module
from tasks.cli import load_images, main
from tests.helpers import randomized
from tests.llm_helpers import tiny_opt_folder
from tests.test_cli import tiny_bert_tokenizer_folder, tiny_cfg, write_jpegs

TEXTS = ["a red cat on the table", "Two DOGS, under the sky!", "a small green bird", "big blue sky", "grass"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("match")
    tokenizer = load_tokenizer(tiny_bert_tokenizer_folder(root / "bert"))
    torch.manual_seed(0)
    folder = save_pretrained(randomized(Blip2Stage1(tiny_cfg()), std=0.3), root / "ckpt", tokenizer=tokenizer)
    return {"ckpt": folder, "tokenizer": tokenizer, "image": write_jpegs(root / "imgs", n=1)[0], "root": root}


def expected_scores(stage1) -> dict[str, tuple[float, float]]:
    """(ITM probability, ITC similarity) of each text, from `Blip2Stage1.match` one text at a time (the image
    re-encoded for each), with the text cleaned as retrieval cleans captions."""
    model = load_pretrained(stage1["ckpt"])
    image = load_images([stage1["image"]], model.cfg.vision.image_size)
    cleaned = {"Two DOGS, under the sky!": "two dogs, under the sky"}  # LAVIS pre_caption: . ! " ( ) * # : ; ~
    out = {}
    for text in TEXTS:
        enc = stage1["tokenizer"]([cleaned.get(text) or text], return_tensors="pt")
        itm = model.match(image, enc.input_ids, enc.attention_mask, head="itm").item()
        itc = model.match(image, enc.input_ids, enc.attention_mask, head="itc").item()
        out[text] = (itm, itc)
    return out


def test_match_prints_each_text_sorted_by_itm_and_json(stage1, capsys):
    expected = expected_scores(stage1)
    order = sorted(TEXTS, key=lambda t: -expected[t][0])
    assert order != TEXTS  # the sort is seen
    assert len({round(v[0], 4) for v in expected.values()}) == len(TEXTS)  # the texts are told apart

    assert main(["match", stage1["image"], *TEXTS, "--checkpoint", str(stage1["ckpt"]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["image"] == stage1["image"] and out["checkpoint"] == str(stage1["ckpt"])
    assert [m["text"] for m in out["matches"]] == order
    for m in out["matches"]:
        assert set(m) == {"text", "itm", "itc"}
        assert m["itm"] == pytest.approx(expected[m["text"]][0], abs=1e-5)
        assert m["itc"] == pytest.approx(expected[m["text"]][1], abs=1e-5)
        assert 0 <= m["itm"] <= 1 and -1 <= m["itc"] <= 1

    assert main(["match", stage1["image"], *TEXTS, "--checkpoint", str(stage1["ckpt"])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "itm\titc\ttext"
    rows = [line.split("\t") for line in lines[1:]]
    assert [r[2] for r in rows] == order
    for itm, itc, text in rows:
        assert (float(itm), float(itc)) == pytest.approx(expected[text], abs=1e-4)


def test_match_reads_the_image_once(stage1, monkeypatch, capsys):
    model = load_pretrained(stage1["ckpt"])
    calls = []
    encode = model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda images: calls.append(images.shape) or encode(images))
    monkeypatch.setattr("qformer.checkpoint.load_pretrained", lambda folder: model)
    assert match_module.main([stage1["image"], "a cat", "a dog", "--checkpoint", str(stage1["ckpt"])]) == 0
    assert calls == [torch.Size([1, 3, 28, 28])]
    assert len(capsys.readouterr().out.strip().splitlines()) == 3


def test_match_errors_are_one_line(stage1, capsys):
    ckpt, image, root = str(stage1["ckpt"]), stage1["image"], stage1["root"]
    assert main(["match", str(root / "missing.jpg"), "a cat", "--checkpoint", ckpt]) == 2
    err = capsys.readouterr().err
    assert "missing.jpg" in err and len(err.strip().splitlines()) == 1
    bad = root / "corrupt.jpg"
    bad.write_bytes(open(image, "rb").read()[:100])
    assert main(["match", str(bad), "a cat", "--checkpoint", ckpt]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qformer match: error:") and "corrupt.jpg" in err and len(err.strip().splitlines()) == 1

    no_tokenizer = save_pretrained(Blip2Stage1(tiny_cfg()), root / "no_tokenizer")
    assert main(["match", image, "a cat", "--checkpoint", str(no_tokenizer)]) == 2
    assert "no tokenizer/ folder" in capsys.readouterr().err


def test_match_refuses_a_checkpoint_without_an_itm_head(tmp_path, capsys):
    llm = tiny_opt_folder(tmp_path / "opt")
    folder = save_pretrained(Blip2Stage2(tiny_cfg(llm=LLMConfig(path=str(llm), dtype="fp32"))), tmp_path / "s2")
    image = write_jpegs(tmp_path / "imgs", n=1)[0]
    capsys.readouterr()
    assert main(["match", image, "a cat", "--checkpoint", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' progress bars loading the LLM
    assert err.startswith("qformer match: error: ")
    assert "Blip2Stage2 without ITM and ITC heads" in err and "stage-1 checkpoint" in err and str(folder) in err
