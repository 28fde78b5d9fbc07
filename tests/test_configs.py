"""Every run config validates, every paper config has a tiny twin with the same recipe, and every twin runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tasks.config import load_config
from tasks.optim import lr_at, param_groups
from tasks.tiny_assets import make_all
from tasks.train import TrainStep, build_objective, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER = sorted(CONFIGS.glob("*.yaml"))
# Stage 1 first: the stage-2 and fine-tuning twins start from its checkpoint.
ORDER = [
    "stage1_vitg",
    "stage1_vitl",
    "stage2_opt2.7b",
    "stage2_opt6.7b",
    "stage2_flant5xl",
    "stage2_flant5xxl",
    "stage2_vicuna7b",
    "stage2_vicuna13b",
    "finetune_coco_retrieval",
    "finetune_coco_caption",
    "finetune_vqav2_opt",
    "finetune_vqav2_flant5",
    "instructblip_flant5xl",
    "instructblip_flant5xxl",
    "instructblip_vicuna7b",
    "instructblip_vicuna13b",
]


def recipe(cfg) -> dict:
    """What a tiny twin must share with its paper config (everything but sizes, paths and step counts)."""
    llm = cfg.model.llm
    return {
        "stage": cfg.stage,
        "vision_frozen": cfg.model.vision.frozen,
        "vision_family": "clip" if "vitl" in cfg.model.vision.arch or "clip" in cfg.model.vision.arch else "eva",
        "image_size_up": cfg.model.vision.image_size > {"paper": 224, "paper_vitl": 224}.get(cfg.model_preset, 28),
        "use_image_ids": cfg.use_image_ids,
        "llm": None if cfg.stage == "stage1" else ("t5" if "t5" in llm.path else "opt"),
        "prompt": llm.prompt if cfg.stage == "stage2" else "",
        "layer_decay": cfg.optim.layer_decay != 1.0,
        "grad_checkpointing": cfg.vit_grad_checkpointing,
        "init_from": bool(cfg.init_from),
        "qformer_instruction": llm.qformer_instruction if cfg.stage == "stage2" else False,
        "end_of_text": llm.end_of_text if cfg.stage == "stage2" else "",
        "mix": cfg.data.mix,
        "kinds": sorted({(d.kind, bool(d.instructions)) for d in cfg.data.datasets}),
    }


def test_paper_configs_validate_and_have_tiny_twins():
    assert sorted(p.stem for p in PAPER) == sorted(ORDER)
    for path in PAPER:
        paper, twin = load_config(path), load_config(CONFIGS / "tiny" / path.name)
        assert recipe(paper) == recipe(twin), path.name
        assert twin.model_preset.startswith("tiny") and not paper.model_preset.startswith("tiny")
    stage1 = load_config(CONFIGS / "stage1_vitg.yaml")
    assert (stage1.optim.lr, stage1.optim.warmup_steps, stage1.optim.total_steps) == (1e-4, 2000, 250_000)
    assert (stage1.optim.beta1, stage1.optim.beta2, stage1.optim.weight_decay) == (0.9, 0.98, 0.05)
    assert load_config(CONFIGS / "stage2_flant5xl.yaml").model.llm.dtype == "bf16"


def test_every_tiny_twin_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("QFORMER_TINY", str(make_all(tmp_path / "assets")))
    monkeypatch.setenv("QFORMER_TINY_RUNS", str(tmp_path / "runs"))
    for name in ORDER:
        cfg = load_config(CONFIGS / "tiny" / f"{name}.yaml")
        final = train(cfg)
        log = [json.loads(line) for line in (Path(cfg.output_dir) / "log.jsonl").read_text().splitlines()]
        assert len(log) == cfg.optim.total_steps and all(math.isfinite(r["loss"]) for r in log), name
        assert (final / "model.safetensors").is_file(), name


def test_layer_decay_reaches_the_optimizer(tmp_path, monkeypatch):
    monkeypatch.setenv("QFORMER_TINY", str(make_all(tmp_path / "assets")))
    cfg = load_config(CONFIGS / "tiny" / "finetune_coco_retrieval.yaml", ["init_from=''", "optim.layer_decay=0.5"])
    from tasks.train import build_model

    model, _ = build_model(cfg)
    groups = param_groups(model, cfg)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    depth = model.visual.depth
    assert scale[id(named["visual.model.blocks.0.mlp.fc1.weight"])] == pytest.approx(0.5**depth)
    assert scale[id(named[f"visual.model.blocks.{depth - 1}.mlp.fc1.weight"])] == pytest.approx(0.5)
    assert scale[id(named["visual.model.patch_embed.proj.weight"])] == pytest.approx(0.5 ** (depth + 1))
    assert scale[id(named["qformer.query_tokens"])] == 1.0
    # No weight decay on biases, norms and 1-D parameters; decay on matrices.
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(named["qformer.layers.0.ffn_query.fc1.bias"])] == 0.0
    assert decay[id(named["ln_vision.weight"])] == 0.0
    assert decay[id(named["qformer.layers.0.ffn_query.fc1.weight"])] == cfg.optim.weight_decay
    # The schedule: linear warmup from warmup_lr, then cosine to min_lr.
    assert lr_at(0, cfg) == cfg.optim.warmup_lr and lr_at(cfg.optim.warmup_steps, cfg) == pytest.approx(cfg.optim.lr)
    assert lr_at(cfg.optim.total_steps, cfg) == pytest.approx(cfg.optim.min_lr)
    # DDP would see only trainable modules: here the unfrozen ViT is one of them.
    step = TrainStep(model, build_objective(cfg, model, None))
    assert any(n.startswith("trainable.visual.") for n, _ in step.named_parameters())
    assert torch.isfinite(torch.tensor(lr_at(3, cfg)))
