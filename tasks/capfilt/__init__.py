"""`qformer capfilt CONFIG [key=value ...]` (or `python -m tasks.capfilt`): bootstrapped captions for web data
(CapFilt, as BLIP-2's pretraining data was made).

For every image of caption JSON files or webdataset shards: N synthetic captions by nucleus sampling from one of our
checkpoints, ranked together with the web caption by image-text similarity (a stage-1 checkpoint's ITC, or a CLIP
model through open_clip); the top k are kept. Runs as plain python or under torchrun (shards split across ranks),
resumes at shard granularity, skips and lists images that fail to decode. Writes to `output_dir`: captions.json for
JSON input (the training format: point `data.datasets[].ann_paths` at it with the same image_root) or
shards/NNNNN.tar for webdataset input (point `data.datasets[].shards` at them), where a training step samples one
kept caption per image; summary.json and report.html; shards/NNNNN.json are the finished shards (see
tasks/capfilt/report.py).

    qformer capfilt configs/capfilt/laion.yaml captioner=runs/opt/final ranker_checkpoint=runs/stage1/final
    torchrun --nproc_per_node 8 -m tasks.capfilt configs/capfilt/laion.yaml ...
"""

from __future__ import annotations

import argparse

from tasks import command
from tasks.command import add_config_arguments, config_and_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `qformer capfilt` and `python -m tasks.capfilt`."""
    add_config_arguments(parser, "configs/capfilt/laion.yaml", "captioner=runs/opt/final num_captions=5")


def run(args: argparse.Namespace) -> int:
    from tasks.capfilt.config import load_capfilt_config
    from tasks.config import to_yaml

    cfg = load_capfilt_config(*config_and_overrides(args))  # a ConfigError (ValueError) stops here, before any work
    if getattr(args, "print_config", False):
        print(to_yaml(cfg), end="")
        return 0
    from tasks.capfilt.pipeline import capfilt

    out = capfilt(cfg)
    print(f"kept captions in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return command.main("capfilt", add_arguments, run, argv, description=__doc__)
