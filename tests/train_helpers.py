"""Fixtures for runs of the real entry points: a tiny BERT folder, caption JSON + JPEG datasets, run configs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import yaml
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
SHAPES = ["square", "bar"]
WORDS = ["a", "photo", "of", "the", "red", "green", "blue", "square", "bar", "on", "black", "background"]


def tiny_bert_folder(path: Path) -> Path:
    """A tiny BERT (weights + WordPiece vocabulary of 99, so [DEC] = 99 fits the tiny Q-Former's 100 rows)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    vocab += [f"w{i}" for i in range(99 - len(vocab))]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast.from_pretrained(str(path)).save_pretrained(path)  # reads vocab.txt
    cfg = BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(path)
    return path


def caption_dataset(root: Path, n: int = 20, seed: int = 0, corrupt: int = 0, missing: int = 0) -> Path:
    """n images of one coloured shape with matching captions; the first `corrupt` files are truncated JPEGs and
    the next `missing` are listed but absent. Returns the annotation JSON path."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    anns = []
    for i in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        img = Image.new("RGB", (40, 40), (0, 0, 0))
        w, h = (24, 24) if shape == "square" else (30, 10)
        x, y = rng.randint(0, 40 - w), rng.randint(0, 40 - h)
        img.paste(COLOURS[colour], (x, y, x + w, y + h))
        name = f"images/{i:03d}.jpg"
        if i < corrupt:
            img.save(root / name, quality=90)
            data = (root / name).read_bytes()
            (root / name).write_bytes(data[: len(data) // 3])
        elif i >= corrupt + missing:
            img.save(root / name, quality=90)
        anns.append({"image": name, "caption": f"a {colour} {shape} on the black background", "image_id": i})
    (root / "train.json").write_text(json.dumps(anns))
    return root / "train.json"


def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def tiny_stage1_config(tmp: Path, ann: Path, out: Path, bert: Path, **extra) -> dict:
    cfg = {
        "stage": "stage1",
        "model_preset": "tiny",
        "bert": str(bert),
        "output_dir": str(out),
        "precision": "fp32",
        "data": {
            "datasets": [{"ann_paths": [str(ann)], "image_root": str(ann.parent)}],
            "batch_size": 4,
            "num_workers": 0,
            "min_samples_before_check": 1000,
        },
        "optim": {"lr": 1e-3, "warmup_steps": 2, "total_steps": 12, "min_lr": 1e-4, "warmup_lr": 1e-5},
        "save_every": 4,
        "log_every": 1,
        "tensorboard": False,
        "model": {"max_text_length": 12, "qformer": {"hidden_dropout": 0.0, "attention_dropout": 0.0}},
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
