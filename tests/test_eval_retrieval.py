"""Retrieval evaluation: `qformer eval` on a COCO-style test set written here, against a straightforward per-query
re-implementation in the reference's style (one query at a time, fp32), and 2 processes against 1."""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch.testing import assert_close

from qformer.bert import load_tokenizer
from qformer.blip2 import Blip2Stage1
from qformer.checkpoint import save_pretrained
from qformer.config import Blip2Config
from tasks.cli import load_images
from tasks.cli import main as cli
from tasks.data.text import clean_caption
from tasks.evals.config import load_eval_config
from tasks.tiny_assets import COLOURS, tiny_bert_folder
from tests.helpers import randomized

N_IMG, K = 6, 4


def _write_testset(root: Path) -> Path:
    entries = []
    (root / "images").mkdir(parents=True)
    names = list(COLOURS)
    for i in range(N_IMG):
        colour = names[i % 3]
        img = Image.new("RGB", (40, 40), (i * 30, 10, 200 - i * 20))
        img.paste(COLOURS[colour], (5 + i, 5, 25 + i, 25))
        img.save(root / "images" / f"{i}.jpg", quality=95)
        # Every caption distinct: duplicate texts would tie exactly, and tie order is a convention, not a result.
        extra = "the " * (i // 3)
        captions = [f"a {colour} square on {extra}black background", f"the {colour} photo of a bar on {extra}black"]
        entries.append({"image": f"images/{i}.jpg", "caption": captions})
    (root / "test.json").write_text(json.dumps(entries))
    return root / "test.json"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrieval")
    bert = tiny_bert_folder(tmp / "bert")
    cfg = Blip2Config.preset("tiny")
    cfg = dataclasses.replace(cfg, qformer=cfg.qformer.replace(hidden_dropout=0.0, attention_dropout=0.0))
    torch.manual_seed(0)
    model = randomized(Blip2Stage1(cfg), std=0.3)
    ckpt = save_pretrained(model, tmp / "ckpt", tokenizer=load_tokenizer(bert))
    ann = _write_testset(tmp / "data")
    return {"tmp": tmp, "ckpt": ckpt, "ann": ann, "model": model.eval(), "tokenizer": load_tokenizer(bert)}


def _config(setup, out: Path, **extra) -> list[str]:
    args = {
        "task": "retrieval",
        "checkpoint": setup["ckpt"],
        "output_dir": out,
        "ann_path": setup["ann"],
        "image_root": setup["ann"].parent,
        "k_test": K,
        "batch_size": 5,
        "num_workers": 0,
        "precision": "fp32",
    }
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


@torch.no_grad()
def reference_scores(setup, score="itm+itc"):
    """The reference's protocol written plainly: per image and per text, one ITM call per candidate."""
    model, tok = setup["model"], setup["tokenizer"]
    entries = json.loads(setup["ann"].read_text())
    images = load_images([str(setup["ann"].parent / e["image"]) for e in entries], 28)
    texts = [clean_caption(c) for e in entries for c in e["caption"]]
    enc = tok(texts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    embeds = model.encode_image(images)
    feats = model.image_features(embeds).feats
    tfeat = model.text_features(enc.input_ids, enc.attention_mask).feat
    sim = torch.stack([torch.stack([(feats[i] @ tfeat[j]).max() for j in range(len(texts))]) for i in range(N_IMG)])

    def pair(i, j):
        itm = model.itm_logits(embeds[i : i + 1], enc.input_ids[j : j + 1], enc.attention_mask[j : j + 1])[0, 1]
        logit = sim[i, j] / model.temp  # the ITC loss's logit
        return {"itm+itc": itm + sim[i, j], "itm": itm, "itc": sim[i, j], "itm+itc_logit": itm + logit}[score]

    s_i2t = torch.full((N_IMG, len(texts)), -100.0)
    for i in range(N_IMG):
        for j in sim[i].topk(K).indices.tolist():
            s_i2t[i, j] = pair(i, j)
    s_t2i = torch.full((len(texts), N_IMG), -100.0)
    for j in range(len(texts)):
        for i in sim[:, j].topk(K).indices.tolist():
            s_t2i[j, i] = pair(i, j)
    return s_i2t, s_t2i


def recalls(s_i2t, s_t2i):
    """Recall@1/5/10 written independently. The -100 fill outside the top k ties by construction (k < 10 here), so
    the documented rule decides: rank = candidates scoring higher + candidates scoring equal at a lower index."""
    caps = 2

    def rank(row, j):
        return int((row > row[j]).sum()) + int((row[:j] == row[j]).sum())

    out = {}
    tr = [min(rank(s_i2t[i], j) for j in range(i * caps, i * caps + caps)) for i in range(N_IMG)]
    ir = [rank(s_t2i[j], j // caps) for j in range(N_IMG * caps)]
    for k in (1, 5, 10):
        out[f"txt_r{k}"] = 100 * sum(r < k for r in tr) / len(tr)
        out[f"img_r{k}"] = 100 * sum(r < k for r in ir) / len(ir)
    return out


@pytest.mark.parametrize("score", ["itm+itc", "itc", "itm+itc_logit"])
def test_eval_equals_the_per_query_reference(setup, tmp_path, score):
    out = tmp_path / "out"
    assert cli(["eval", _write_yaml(setup, out, score)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    s_i2t, s_t2i = reference_scores(setup, score)
    expected = recalls(s_i2t, s_t2i)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    topk = json.loads((out / "topk.json").read_text())
    for i, row in enumerate(topk["image_to_text"]):
        assert_close(torch.tensor(row["scores"]), s_i2t[i].topk(len(row["scores"])).values, atol=1e-5, rtol=0)
    for j, row in enumerate(topk["text_to_image"]):
        assert_close(torch.tensor(row["scores"]), s_t2i[j].topk(len(row["scores"])).values, atol=1e-5, rtol=0)
    assert (out / "report.html").is_file()


def _write_yaml(setup, out, score):
    path = out.parent / f"{score.replace('+', '_')}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "\n".join(f"{a.split('=', 1)[0]}: '{a.split('=', 1)[1]}'" for a in _config(setup, out, score=score))
    )
    return str(path)


def _worker(rank, setup_paths, out, result):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out}.rdzv", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    from tasks.evaluate import evaluate

    cfg = load_eval_config(None, [f"{k}={v}" for k, v in setup_paths.items()] + [f"output_dir={out}"])
    metrics = evaluate(cfg)
    torch.save(metrics, f"{result}.{rank}")


def test_two_processes_equal_one(setup, tmp_path):
    paths = {
        "task": "retrieval",
        "checkpoint": setup["ckpt"],
        "ann_path": setup["ann"],
        "image_root": setup["ann"].parent,
        "k_test": K,
        "batch_size": 4,
        "num_workers": 0,
        "precision": "fp32",
    }
    one, two = tmp_path / "one", tmp_path / "two"
    from tasks.evaluate import evaluate

    single = evaluate(load_eval_config(None, [f"{k}={v}" for k, v in paths.items()] + [f"output_dir={one}"]))
    mp.spawn(_worker, args=(paths, two, tmp_path / "result"), nprocs=2, join=True)
    for rank in range(2):
        assert torch.load(f"{tmp_path / 'result'}.{rank}", weights_only=True) == single
    assert json.loads((two / "metrics.json").read_text()) == json.loads((one / "metrics.json").read_text())
    a, b = json.loads((one / "topk.json").read_text()), json.loads((two / "topk.json").read_text())
    for side in a:
        for ra, rb in zip(a[side], b[side], strict=True):
            assert ra.keys() == rb.keys()
            assert_close(torch.tensor(rb["scores"]), torch.tensor(ra["scores"]), atol=1e-5, rtol=0)


def test_a_missing_test_image_is_an_error(setup, tmp_path):
    entries = json.loads(setup["ann"].read_text())
    entries[2]["image"] = "images/nowhere.jpg"
    ann = setup["ann"].parent / "broken.json"
    ann.write_text(json.dumps(entries))
    from tasks.evaluate import evaluate

    cfg = load_eval_config(None, _config(setup, tmp_path / "x", ann_path=ann))
    with pytest.raises(ValueError, match="nowhere.jpg"):
        evaluate(cfg)
