"""Fixtures for runs of the real entry points: assets from tasks.tiny_assets, run configs, logs."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tasks.tiny_assets import caption_dataset, tiny_bert_folder  # noqa: F401


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


def assert_same_run(full: Path, resumed: Path, steps: int, keys: tuple[str, ...]) -> list[dict]:
    """A resumed run equals the uninterrupted one: steps 1..`steps` logged once each, `keys` equal at every step,
    and the final weights equal (atol 1e-6). Returns the resumed run's log for further checks."""
    from safetensors.torch import load_file
    from torch.testing import assert_close

    a, b = read_log(full), read_log(resumed)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b, strict=True):
        for key in keys:
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    wa = load_file(full / "final" / "model.safetensors")
    wb = load_file(resumed / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert_close(wb[key], wa[key], atol=1e-6, rtol=0, msg=key)
    return b
