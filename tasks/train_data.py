"""The training loop's view of the data: an endless, resumable stream of collated batches for this rank.

Map-style caption JSON datasets go through a `ResumableDistributedSampler` (rank-disjoint, position saved), and
each sample's augmentation is seeded from (seed, epoch, index), so a resumed run draws the same crops and flips
whichever worker loads the sample. Webdataset shards resume at the same sample (see `tasks.data.webdata`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from tasks.config import DatasetConfig, TrainConfig
from tasks.data import (
    CaptionDataset,
    MixedDataset,
    MixedIterableDataset,
    ResumableDistributedSampler,
    SkipCounter,
    WebCaptionDataset,
    collate,
    train_transform,
)
from tasks.data.captions import require_usable, set_max_image_pixels
from tasks.data.instructions import InstructedCaptions
from tasks.data.mix import sqrt_size_ratios
from tasks.data.webdata import seeded_rng

logger = logging.getLogger(__name__)


class SeededSamples(Dataset):
    """Draws each sample's augmentation from its own seed, leaving the caller's random state untouched."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        with seeded_rng((self.seed * 1_000_003 + self.epoch * 7_919 + index) % 2**62):
            return self.dataset[index]

    def state_dict(self) -> dict:
        return self.dataset.state_dict() if hasattr(self.dataset, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self.dataset, "load_state_dict"):
            self.dataset.load_state_dict(state)


def _map_dataset(d: DatasetConfig, transform, max_words: int) -> Dataset:
    """A map-style dataset for one `DatasetConfig`: captions (as instruction samples when it has templates) or VQA."""
    if d.kind == "vqa":
        from tasks.data.vqa_train import VQATrainDataset

        return VQATrainDataset(
            d.questions, d.ann_paths, d.image_root, d.image_pattern, transform, d.instructions, max_words=max_words
        )
    captions = CaptionDataset(d.ann_paths, d.image_root, transform, max_words=max_words)
    return InstructedCaptions(captions, d.instructions) if d.instructions else captions


class TrainLoader:
    """Endless batches for this rank, with `state_dict`/`load_state_dict` for exact resume and skip accounting."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, seed: int):
        data = cfg.data
        if not data.datasets:
            raise ValueError("data.datasets is empty: give at least one caption JSON dataset or webdataset shards")
        self.cfg, self.rank, self.world, self.seed = cfg, rank, world, seed
        transform = train_transform(cfg.model.vision.image_size, min_scale=data.min_scale, hflip=data.hflip)
        kinds = {"shards" if d.shards else "json" for d in data.datasets}
        if len(kinds) > 1:
            raise ValueError("mix either caption JSON (or vqa) datasets or webdataset shards, not both")
        if kinds == {"shards"} and data.mix != "ratio":
            raise ValueError("data.mix=sqrt needs dataset sizes: JSON or vqa datasets, not webdataset shards")
        self.streaming = kinds == {"shards"}
        self.skips = SkipCounter(max_skip_fraction=data.max_skip_fraction, min_samples=data.min_samples_before_check)
        set_max_image_pixels(data.max_image_pixels)  # before any worker starts: they inherit it
        if self.streaming:
            streams = [
                (WebCaptionDataset(d.shards, transform, seed=seed, rank=rank, world_size=world), d.ratio)
                for d in data.datasets
            ]
            self.dataset = streams[0][0] if len(streams) == 1 else MixedIterableDataset(streams, seed=seed)
            self.sampler = None
        else:
            for d in data.datasets:
                for path in [*d.ann_paths, *d.questions]:
                    if not Path(path).is_file():
                        raise FileNotFoundError(f"annotation file not found: {path}")
            parts = [(_map_dataset(d, transform, data.max_words), d.ratio) for d in data.datasets]
            if data.mix == "sqrt":
                weights = sqrt_size_ratios([len(p) for p, _ in parts], [r for _, r in parts])
                logger.info("square-root mixing: weights %s", ", ".join(f"{w:.3f}" for w in weights))
                parts = [(p, float(w)) for (p, _), w in zip(parts, weights, strict=True)]
            base = parts[0][0] if len(parts) == 1 else MixedDataset(parts, seed=seed)
            self.dataset = SeededSamples(base, seed)
            self.sampler = ResumableDistributedSampler(self.dataset, rank=rank, world_size=world, seed=seed)
        self.epoch = 0

    def _loader(self) -> DataLoader:
        data = self.cfg.data
        # A DataLoader iterator draws its workers' base seed from this generator; left to the global RNG, a
        # resumed run would draw it at a different moment and every later dropout mask and negative would shift.
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.rank * 1_009 + self.epoch)
        if self.streaming:
            return DataLoader(
                self.dataset,
                batch_size=data.batch_size,
                num_workers=data.num_workers,
                collate_fn=collate,
                generator=generator,
            )
        return DataLoader(
            self.dataset,
            batch_size=data.batch_size,
            sampler=self.sampler,
            num_workers=data.num_workers,
            collate_fn=collate,
            drop_last=True,
            persistent_workers=False,  # workers must see each new epoch's set_epoch
            generator=generator,
        )

    def _epoch_used_up(self) -> bool:
        """A resumed position that leaves no full batch: the checkpoint was taken on the epoch's last batch, and the
        uninterrupted run's next batch is the next epoch's first."""
        if self.sampler is None or self.sampler.position == 0:
            return False
        return self.sampler.num_samples - self.sampler.position < self.cfg.data.batch_size

    def __iter__(self) -> Iterator[dict]:
        # Not `self.sampler or ...`: a sampler resumed at the end of its epoch has len 0, which is falsy.
        trackers = [self.skips, self.sampler if self.sampler is not None else self.dataset]
        while True:
            self.dataset.set_epoch(self.epoch)
            if self.sampler is not None:
                self.sampler.set_epoch(self.epoch)
                if self._epoch_used_up():
                    self.epoch += 1
                    continue
            got = False
            for batch in self._loader():
                for tracker in trackers:
                    tracker.update(batch)
                got = True
                yield require_usable(batch)  # a batch of nothing but bad samples is an error naming them
            if not got and not self.streaming:
                raise ValueError(f"rank {self.rank} got no full batch of {self.cfg.data.batch_size} in an epoch")
            self.epoch += 1

    @property
    def skipped(self) -> int:
        return self.skips.num_skipped

    def skip_summary(self) -> str:
        return self.skips.summary()

    def state_dict(self) -> dict:
        position = self.sampler.state_dict() if self.sampler is not None else self.dataset.state_dict()
        return {"epoch": self.epoch, "position": position, "skips": self.skips.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        if self.sampler is not None:
            self.sampler.load_state_dict(state["position"])
        else:
            self.dataset.load_state_dict(state["position"])
        self.skips.load_state_dict(state["skips"])

    def write_skipped(self, out: Path) -> Path:
        """Every skipped path with its reason, one file per rank, for the person who has to fix the data."""
        path = out / f"skipped_rank{self.rank}.json"
        path.write_text(json.dumps(self.skips.state_dict(), indent=1, default=str))
        return path


def build_loader(cfg: TrainConfig, rank: int, world: int, seed: int) -> TrainLoader:
    return TrainLoader(cfg, rank, world, seed)
