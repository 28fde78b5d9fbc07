"""Our checkpoint folders and the `qformer` command line on files written here (LAVIS .pth, JPEGs, LLM folders)."""

from __future__ import annotations

import dataclasses

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
