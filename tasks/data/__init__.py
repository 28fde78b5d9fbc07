"""Data pipeline for BLIP-2 pretraining: transforms, caption cleaning, datasets, mixing, resumable sampling.

Typical map-style loop (one process per rank)::

    ds = MixedDataset([(CaptionDataset(coco_jsons, coco_root, train_transform(224)), 0.6),
                       (CaptionDataset(vg_jsons, vg_root, train_transform(224)), 0.4)], seed=0)
    sampler = ResumableDistributedSampler(ds, seed=0)           # rank/world from the process group
    skips = SkipCounter(max_skip_fraction=0.05, min_samples=1000)
    for epoch in range(start_epoch, epochs):
        ds.set_epoch(epoch); sampler.set_epoch(epoch)           # no-ops for the epoch a resume loaded
        loader = DataLoader(ds, batch_size=B, sampler=sampler, collate_fn=collate, num_workers=8, drop_last=True)
        for batch in track(loader, skips, sampler):
            ...  # checkpoint: sampler.state_dict(), ds.state_dict(), skips.state_dict()

Streams (`WebCaptionDataset`, `MixedIterableDataset`) are tracked the same way: ``track(loader, skips, ds)``
and ``ds.state_dict()`` per rank.
"""

from .captions import (
    BadSample,
    CaptionDataset,
    SkipCounter,
    TooManyBadSamples,
    collate,
    decode_image,
    load_image,
    track,
)
from .mix import MixedDataset, MixedIterableDataset, ResumableDistributedSampler
from .text import CaptionProcessor, clean_caption, clean_question
from .transforms import CLIP_MEAN, CLIP_STD, eval_transform, train_transform
from .webdata import ResumableIterable, WebCaptionDataset, expand_shards

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "BadSample",
    "CaptionDataset",
    "CaptionProcessor",
    "MixedDataset",
    "MixedIterableDataset",
    "ResumableDistributedSampler",
    "ResumableIterable",
    "SkipCounter",
    "TooManyBadSamples",
    "WebCaptionDataset",
    "clean_caption",
    "clean_question",
    "collate",
    "decode_image",
    "eval_transform",
    "expand_shards",
    "load_image",
    "track",
    "train_transform",
]
