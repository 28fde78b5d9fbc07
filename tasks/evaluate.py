"""`qformer eval CONFIG [key=value ...]` (or `python -m tasks.evaluate`): retrieval, zero-shot VQA / GQA, captioning.

Runs as plain python or under torchrun (the work is split across ranks, results merged on rank 0). Writes
`metrics.json`, the per-query results and an HTML report to `output_dir`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from tasks import command
from tasks.command import add_config_arguments, config_and_overrides
from tasks.config import to_yaml
from tasks.dist import setup_distributed, teardown_distributed
from tasks.evals.config import EvalConfig, load_eval_config

logger = logging.getLogger(__name__)


def evaluate(cfg: EvalConfig) -> dict:
    from qformer.blip2 import Blip2Stage1
    from qformer.checkpoint import load_pretrained, load_tokenizer_from

    if cfg.lemmatize:  # a missing spaCy model fails now, not after a large checkpoint has loaded
        from tasks.evals.lemmatize import load_lemmatizer

        load_lemmatizer(cfg.lemmatizer_model)
    device = setup_distributed()
    model = load_pretrained(cfg.checkpoint).to(device)
    if cfg.image_size and cfg.image_size != model.cfg.vision.image_size:
        raise ValueError(
            f"image_size={cfg.image_size} but {cfg.checkpoint} was built for {model.cfg.vision.image_size} px: "
            "convert or fine-tune the checkpoint at that size"
        )
    try:
        if cfg.task == "retrieval":
            from tasks.evals.retrieval import evaluate_retrieval

            if not isinstance(model, Blip2Stage1):
                raise ValueError(f"{cfg.checkpoint}: retrieval needs a stage-1 checkpoint (ITC and ITM heads)")
            tokenizer = load_tokenizer_from(cfg.checkpoint)
            if tokenizer is None:
                raise ValueError(f"{cfg.checkpoint} has no tokenizer/ folder (convert it with --bert)")
            metrics = evaluate_retrieval(model, tokenizer, cfg, device)
        elif cfg.task in ("vqa", "gqa"):
            from tasks.evals.vqa import evaluate_vqa

            metrics = evaluate_vqa(model, cfg, device)
        else:
            from tasks.evals.caption import evaluate_caption

            metrics = evaluate_caption(model, cfg, device)
    finally:
        teardown_distributed()
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `qformer eval` and `python -m tasks.evaluate`."""
    add_config_arguments(
        parser, "configs/eval/retrieval_coco.yaml", "checkpoint=runs/x/final k_test=64 (or task=... without a config)"
    )


def run(args: argparse.Namespace) -> int:
    cfg = load_eval_config(*config_and_overrides(args))  # a ConfigError (ValueError) stops here, before any work
    if getattr(args, "print_config", False):
        print(to_yaml(cfg), end="")
        return 0
    torch.manual_seed(0)
    metrics = evaluate(cfg)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}, indent=1))
    print(f"results in {Path(cfg.output_dir)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return command.main("eval", add_arguments, run, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
