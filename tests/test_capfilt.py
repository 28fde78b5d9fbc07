"""`qformer capfilt`: the ranking rule, an end-to-end run on a tiny stage-1 checkpoint (captioner and ITC ranker),
resume after a SIGKILL, 2 ranks over gloo, bad images and bad configs, and the training loader on its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds

from qformer.bert import load_tokenizer
from qformer.blip2 import Blip2Stage1
from qformer.checkpoint import load_pretrained, save_pretrained
from qformer.config import LLMConfig
from qformer.stage2 import Blip2Stage2
from tasks.capfilt.config import load_capfilt_config
from tasks.capfilt.pipeline import CRASH_AFTER_SHARDS_ENV, capfilt
from tasks.capfilt.ranking import Kept, keep_top_k
from tasks.cli import load_images, main
from tasks.data.captions import CaptionDataset
from tasks.data.transforms import eval_transform
from tasks.data.webdata import WebCaptionDataset
from tasks.tiny_assets import caption_dataset
from tests.helpers import randomized
from tests.llm_helpers import tiny_opt_folder
from tests.test_cli import tiny_bert_tokenizer_folder, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "capfilt.yaml")
OUTPUTS = ("captions.json", "summary.json", "report.html")


def test_keep_top_k_keeps_the_best_scores_ties_first_listed_duplicates_once():
    captions = ["web cap", "s1", "s2", "s3", "s4", "web cap"]
    sources = ["web", "synthetic", "synthetic", "synthetic", "synthetic", "synthetic"]
    scores = [0.30, 0.10, 0.50, 0.30, 0.45, 0.90]
    # "web cap" counts once, at its first (web) listing and score; 0.30 tie: the web caption is listed before s3.
    assert keep_top_k(scores, captions, sources, 2) == [Kept("s2", 0.5, "synthetic"), Kept("s4", 0.45, "synthetic")]
    assert keep_top_k(scores, captions, sources, 3)[2] == Kept("web cap", 0.3, "web")
    assert [k.caption for k in keep_top_k(scores, captions, sources, 10)] == ["s2", "s4", "web cap", "s3", "s1"]
    assert keep_top_k([0.2, 0.2], ["a", "b"], ["synthetic", "web"], 1) == [Kept("a", 0.2, "synthetic")]
    with pytest.raises(ValueError, match="one each"):
        keep_top_k([0.1], ["a", "b"], ["web", "web"], 1)


def test_paper_config_validates_with_the_paper_settings():
    cfg = load_capfilt_config(str(ROOT / "configs" / "capfilt" / "laion.yaml"))
    assert (cfg.num_captions, cfg.top_p, cfg.top_k, cfg.keep, cfg.ranker) == (10, 0.9, 0, 2, "open_clip")
    assert cfg.open_clip_model == "ViT-L-14" and cfg.prompt == "a photo of"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("capfilt")
    tokenizer = load_tokenizer(tiny_bert_tokenizer_folder(root / "bert"))
    torch.manual_seed(0)
    ckpt = save_pretrained(randomized(Blip2Stage1(tiny_cfg()), std=0.3), root / "ckpt", tokenizer=tokenizer)
    ann = caption_dataset(root / "data", n=12, corrupt=1)  # images/000.jpg is a truncated JPEG
    overrides = [f"ann_paths=[{ann}]", f"image_root={root / 'data'}", f"captioner={ckpt}", "shard_size=4"]
    return {"root": root, "ckpt": ckpt, "overrides": overrides, "ann": ann}


@pytest.fixture(scope="module")
def full_run(setup):
    out = setup["root"] / "full"
    assert main(["capfilt", TINY, *setup["overrides"], f"output_dir={out}"]) == 0
    return out


def files(out: Path, outputs=OUTPUTS) -> dict[str, bytes]:
    names = [*outputs, *(f"shards/{p.name}" for p in sorted((out / "shards").iterdir()))]
    return {name: (out / name).read_bytes() for name in names}


def test_end_to_end_keeps_the_top_two_by_itc_and_lists_the_bad_image(setup, full_run):
    records = json.loads((full_run / "captions.json").read_text())
    summary = json.loads((full_run / "summary.json").read_text())
    assert len(records) == 11 and [r["image_id"] for r in records] == list(range(1, 12))  # input order
    assert (summary["images_in"], summary["images_out"], summary["images_skipped"]) == (12, 11, 1)
    assert summary["skipped"][0]["image"] == "images/000.jpg" and "OSError" in summary["skipped"][0]["reason"]
    assert summary["web_caption_kept"] == sum("web" in r["capfilt"]["sources"] for r in records)
    assert set(summary["scores"]) == {"web", "synthetic", "kept"} and summary["scores"]["kept"]["q50"] is not None
    assert sorted(p.name for p in (full_run / "shards").iterdir()) == ["00000.json", "00001.json", "00002.json"]
    html = (full_run / "report.html").read_text()
    assert html.count('class="card"') == 4 and "data:image/jpeg;base64," in html

    # Kept = the top 2 of every candidate's score (web and synthetic), as the shard files hold them.
    shards = [json.loads((full_run / "shards" / f"{s:05d}.json").read_text()) for s in range(3)]
    synthetic = [scores for sh in shards for scores in sh["synthetic_scores"]]
    for r, syn in zip(records, synthetic, strict=True):
        assert r["capfilt"]["scores"] == sorted(set(r["capfilt"]["web_scores"] + syn), reverse=True)[:2]

    model = load_pretrained(setup["ckpt"]).eval()
    tokenizer = load_tokenizer(setup["root"] / "ckpt" / "tokenizer")
    for r in records:
        meta = r["capfilt"]
        assert r["sample_caption"] is True and len(r["caption"]) == 2 and len(set(r["caption"])) == 2
        assert meta["scores"] == sorted(meta["scores"], reverse=True)
        if "web" not in meta["sources"]:  # the web caption lost to both kept captions
            assert min(meta["scores"]) >= meta["web_scores"][0]
        # The stored scores are the checkpoint's ITC similarity (max over queries) of the kept captions.
        image = load_images([str(setup["root"] / "data" / r["image"])], model.cfg.vision.image_size)
        enc = tokenizer(r["caption"], padding="longest", return_tensors="pt")
        itc = model.match(image.expand(2, -1, -1, -1), enc.input_ids, enc.attention_mask, head="itc")
        assert itc.tolist() == pytest.approx(meta["scores"], abs=1e-5)

    # The training loader: one sample per image, drawing one of its kept captions.
    data = CaptionDataset([full_run / "captions.json"], setup["root"] / "data", eval_transform(28))
    assert len(data) == 11
    drawn = {data[0]["text_input"] for _ in range(30)}
    assert drawn == set(records[0]["caption"])


def test_resume_after_sigkill_ends_with_the_same_files(setup, full_run):
    out = setup["root"] / "resumed"
    cmd = [sys.executable, "-m", "tasks.capfilt", TINY, *setup["overrides"], f"output_dir={out}"]
    env = {**os.environ, CRASH_AFTER_SHARDS_ENV: "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [p.name for p in (out / "shards").iterdir()] == ["00000.json"] and not (out / "captions.json").exists()
    assert main(["capfilt", TINY, *setup["overrides"], f"output_dir={out}"]) == 0  # skips shard 0
    assert files(out) == files(full_run)


def _rank(rank: int, tmp: str, overrides: list[str]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=2)
    torch.set_num_threads(1)
    capfilt(load_capfilt_config(TINY, overrides))  # joins the group set up here; tears it down at the end


def test_two_ranks_give_the_same_outputs_as_one(setup, full_run):
    out = setup["root"] / "two"
    mp.start_processes(
        _rank, args=(str(setup["root"]), [*setup["overrides"], f"output_dir={out}"]), nprocs=2, start_method="spawn"
    )
    assert files(out) == files(full_run)


def test_bad_config_and_stale_shards_are_one_line_errors(setup, full_run, capsys):
    assert main(["capfilt", TINY, *setup["overrides"], "keep=3", "output_dir=x", "--print-config"]) == 0
    assert "keep: 3\nmax_words: 50\n" in capsys.readouterr().out
    assert main(["capfilt", TINY, *setup["overrides"], "num_captons=3", f"output_dir={full_run}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qformer capfilt: error:") and "num_captons" in err and "\n" not in err
    assert main(["capfilt", TINY, *setup["overrides"], "keep=3", f"output_dir={full_run}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "00000.json was written with other settings (keep)" in err and "\n" not in err


def test_open_clip_ranker_without_open_clip_names_the_install(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed: `import open_clip` raises
    extra = ["ranker=open_clip", "ranker_checkpoint=clip.pt", f"output_dir={tmp_path}"]
    assert main(["capfilt", TINY, *setup["overrides"], *extra]) == 2
    assert "pip install open_clip_torch" in capsys.readouterr().err


def test_open_clip_ranker_scores_with_a_local_clip(setup, tmp_path):
    """A real open_clip model (a tiny config registered with open_clip, random weights saved to a local file, as
    users keep ViT-L-14 weights): the ranker's scores are the cosines of its own image and text embeddings."""
    import open_clip
    from PIL import Image

    from tasks.capfilt.ranking import OpenClipRanker

    vision = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}
    text = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny-clip-capfilt.json").write_text(
        json.dumps({"embed_dim": 16, "vision_cfg": vision, "text_cfg": text})
    )
    open_clip.add_model_config(tmp_path / "configs")
    torch.manual_seed(0)
    torch.save(open_clip.create_model("tiny-clip-capfilt").state_dict(), tmp_path / "clip.pt")
    ranker = OpenClipRanker("tiny-clip-capfilt", str(tmp_path / "clip.pt"), torch.device("cpu"))
    images = [Image.new("RGB", (40, 40), colour) for colour in ("red", "blue")]
    texts, owners = ["a red square", "a blue circle", "two dogs"], [0, 1, 1]
    scores = ranker.scores(torch.stack([ranker.transform(im) for im in images]), texts, owners)
    clip = open_clip.create_model("tiny-clip-capfilt")
    clip.load_state_dict(torch.load(tmp_path / "clip.pt", weights_only=True))
    clip.eval()
    _, _, preprocess = open_clip.create_model_and_transforms("tiny-clip-capfilt")
    with torch.no_grad():
        image = torch.nn.functional.normalize(clip.encode_image(torch.stack([preprocess(im) for im in images])), dim=-1)
        tokens = open_clip.get_tokenizer("tiny-clip-capfilt")(texts)
        words = torch.nn.functional.normalize(clip.encode_text(tokens), dim=-1)
    expected = [float(image[o] @ words[j]) for j, o in enumerate(owners)]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 4) for s in scores)) == 3


def test_loader_sample_caption_flag(tmp_path):
    caption_dataset(tmp_path, n=2)
    anns = [
        {"image": "images/000.jpg", "caption": ["a red square", "a blue circle"], "sample_caption": True},
        {"image": "images/001.jpg", "caption": ["one", "two"]},  # without the flag: one sample per caption
    ]
    (tmp_path / "c.json").write_text(json.dumps(anns))
    data = CaptionDataset([tmp_path / "c.json"], tmp_path, eval_transform(28))
    assert len(data) == 3 and {data[0]["text_input"] for _ in range(30)} == {"a red square", "a blue circle"}
    anns[0]["sample_caption"] = "yes"
    (tmp_path / "c.json").write_text(json.dumps(anns))
    with pytest.raises(ValueError, match=r"c.json\[0\]: 'sample_caption' must be true or false"):
        CaptionDataset([tmp_path / "c.json"], tmp_path, eval_transform(28))


def write_tars(setup) -> str:
    """The tiny caption set as 3 webdataset shards of 4: captions in `txt`, or in `json` for every third sample;
    sample 000's bytes are the truncated JPEG."""
    anns = json.loads(setup["ann"].read_text())
    folder = setup["root"] / "tars"
    folder.mkdir(exist_ok=True)
    for s in range(3):
        with wds.TarWriter(str(folder / f"{s:03d}.tar")) as sink:
            for a in anns[s * 4 : (s + 1) * 4]:
                sample = {"__key__": Path(a["image"]).stem, "jpg": (setup["root"] / "data" / a["image"]).read_bytes()}
                if a["image_id"] % 3 == 0:
                    sample["json"] = json.dumps({"caption": a["caption"], "url": "http://x"}).encode()
                else:
                    sample["txt"] = a["caption"].encode()
                sink.write(sample)
    return str(folder / "{000..002}.tar")


def test_webdataset_shards_in_and_out_resume_and_train(setup):
    spec = write_tars(setup)
    overrides = [f"shards={spec}", "ann_paths=[]", f"captioner={setup['ckpt']}"]
    out, resumed = setup["root"] / "web", setup["root"] / "web_resumed"
    assert main(["capfilt", TINY, *overrides, f"output_dir={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["images_in"], summary["images_out"], summary["images_skipped"]) == (12, 11, 1)
    assert summary["skipped"][0]["image"].endswith("000.tar#000") and summary["output"] == "shards/{00000..00002}.tar"
    assert "data:image/jpeg;base64," in (out / "report.html").read_text()

    samples = list(wds.WebDataset(str(out / summary["output"]), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:03d}" for i in range(1, 12)]
    metas = [json.loads(s["json"]) for s in samples]
    assert all(len(m["caption"]) == 2 and m["capfilt"]["sources"] for m in metas)
    assert metas[2]["url"] == "http://x"  # 003's own json fields are kept
    # The training loader reads the output shards, one kept caption per sample.
    data = WebCaptionDataset(str(out / summary["output"]), eval_transform(28), shuffle=False, repeat=False)
    drawn = {s["key"]: s["text_input"] for s in data}
    assert {m["caption"].index(drawn[s["__key__"]]) for s, m in zip(samples, metas, strict=True)} == {0, 1}

    cmd = [sys.executable, "-m", "tasks.capfilt", TINY, *overrides, f"output_dir={resumed}"]
    env = {**os.environ, CRASH_AFTER_SHARDS_ENV: "2", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    assert subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True).returncode == -9
    assert main(["capfilt", TINY, *overrides, f"output_dir={resumed}"]) == 0
    assert files(resumed, ("summary.json", "report.html")) == files(out, ("summary.json", "report.html"))


def test_stage2_captioner_with_a_stage1_ranker(setup, tmp_path, capsys):
    llm = tiny_opt_folder(tmp_path / "opt")
    torch.manual_seed(0)
    s2 = randomized(Blip2Stage2(tiny_cfg(llm=LLMConfig(path=str(llm), dtype="fp32"))), std=0.3)
    folder = save_pretrained(s2, tmp_path / "s2")
    overrides = [*setup["overrides"], f"captioner={folder}", "shard_size=12", f"output_dir={tmp_path / 'out'}"]
    assert main(["capfilt", TINY, *overrides]) == 2  # a stage-2 model cannot rank by ITC
    assert "ranker itc needs a stage-1 checkpoint" in capsys.readouterr().err
    assert main(["capfilt", TINY, *overrides, f"ranker_checkpoint={setup['ckpt']}"]) == 0
    records = json.loads((tmp_path / "out" / "captions.json").read_text())
    assert len(records) == 11 and all(len(r["caption"]) == 2 for r in records)


def test_itm_ranker_keeps_the_top_two_by_the_itm_head(setup, tmp_path):
    """`ranker: itm`: the stored scores are the checkpoint's ITM match probabilities of the kept captions, and no
    candidate left out (the web caption, or a synthetic one in the shard file) scores higher than a kept one."""
    out = tmp_path / "itm"
    assert main(["capfilt", TINY, *setup["overrides"], "ranker=itm", "shard_size=12", f"output_dir={out}"]) == 0
    records = json.loads((out / "captions.json").read_text())
    synthetic = json.loads((out / "shards" / "00000.json").read_text())["synthetic_scores"]
    model = load_pretrained(setup["ckpt"]).eval()
    tokenizer = load_tokenizer(setup["root"] / "ckpt" / "tokenizer")
    assert len(records) == 11
    for r, syn in zip(records, synthetic, strict=True):
        meta = r["capfilt"]
        assert meta["scores"] == sorted(set(meta["web_scores"] + syn), reverse=True)[:2]
        image = load_images([str(setup["root"] / "data" / r["image"])], model.cfg.vision.image_size)
        enc = tokenizer(r["caption"], padding="longest", return_tensors="pt")
        itm = model.match(image.expand(2, -1, -1, -1), enc.input_ids, enc.attention_mask, head="itm")
        itc = model.match(image.expand(2, -1, -1, -1), enc.input_ids, enc.attention_mask, head="itc")
        assert itm.tolist() == pytest.approx(meta["scores"], abs=1e-5)
        assert itc.tolist() != pytest.approx(meta["scores"], abs=1e-3)  # not the ITC similarity
