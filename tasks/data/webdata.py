"""LAION-style webdataset shards (``jpg`` + ``txt`` or ``json`` with a caption) as a resumable stream.

Reading goes through the `webdataset` library (url opening, tar expansion, grouping by key, buffer shuffle);
the splitting, seeding and resume bookkeeping are ours, so that they are exact:

- **Shards per reader.** Each epoch the shard list is shuffled with ``(seed, epoch)`` (the same order on every
  rank), and reader ``r = rank * num_workers + worker`` of ``world_size * num_workers`` takes
  ``shards[r::world_size * num_workers]``. Readers are disjoint within an epoch. Every reader needs at least
  one shard; with fewer shards than readers this raises.
- **Samples per reader.** The reader's samples pass a shuffle buffer seeded with ``(seed, epoch, rank,
  worker)``; the stream is a pure function of (shards, seed, epoch, rank, world_size, worker, num_workers).
  With ``repeat=True`` (training) the reader goes on to the next epoch by itself, so the stream never ends
  and ranks never run dry at different steps: train for a number of steps. With ``repeat=False`` the stream
  is one epoch (`set_epoch`), and ranks may get different numbers of samples.
- **Resume (exact).** Every yielded item carries ``position = (num_workers, worker, (epoch, index))``, the
  index of the raw sample within that reader's epoch stream. The main process feeds each batch to
  ``dataset.update(batch)`` (or `track`); `state_dict` then holds, per worker, the last consumed position
  and the number of batches consumed. After `load_state_dict` each worker replays its stream, skipping the
  consumed raw samples *before* decoding them (the skip costs reading, not decoding, at most one epoch of a
  reader's shards), and the DataLoader workers are rotated so that the next batch comes from the worker the
  uninterrupted run would have used next. Result: the same batches in the same order as without the
  interruption, provided the shard list, seed, rank, world size and number of workers are the same (checked;
  the batch size may differ). Prefetched but unconsumed batches are not counted. Each rank keeps its own
  state: save one per rank. A sample's augmentation draws from its own seed ``(seed, epoch, rank, worker,
  index)``, not from the worker's generators (which a resumed loader restarts), so it replays exactly too.
- **Bad samples** (unreadable shard, missing image or caption, undecodable image) are skipped and attached to
  the next good sample as ``skipped`` paths ``url#key`` (``url`` for shard-level errors), so batches keep
  their size and a `SkipCounter` counts them exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset import tariterators

from qformer.dist import get_rank, get_world_size

from .captions import BadSample, Transform, _describe, _warn_if_truncated_images_allowed, decode_image
from .text import CaptionProcessor, has_words

logger = logging.getLogger(__name__)

__all__ = ["ResumableIterable", "WebCaptionDataset", "expand_shards"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def expand_shards(urls: str | Sequence[str]) -> list[str]:
    """Brace-expand a shard spec (``"dir/{00000..00099}.tar"``, ``::``-separated) or copy a list of urls."""
    if isinstance(urls, str):
        return list(wds.shardlists.expand_urls(urls))
    return [str(u) for u in urls]


def seed_int(*parts: int) -> int:
    """A 64-bit seed mixed from non-negative ints (stable across processes, unlike `hash`)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0])


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Inside: torch's CPU generator and Python's `random` seeded with `seed`; after: both as they were. For
    per-sample augmentation that does not depend on which worker, or which resumed loader, draws it."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


def _worker_layout() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _is_truncated_local_tar(url: str) -> bool:
    """For a local tar file: False when it ends with the two zero blocks of a complete archive, True otherwise.

    Remote urls (``pipe:``, ``http:``, ...) are not checked (False).
    """
    path = url[len("file:") :] if url.startswith("file:") else url
    if ":" in path.split("/")[0] or not os.path.isfile(path):
        return False
    size = os.path.getsize(path)
    if size < 1024 or size % 512:
        return True
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024).count(0) != 1024


class ResumableIterable(IterableDataset):
    """Base for rank- and worker-aware streams with exact resume (see the module docstring).

    Subclasses implement `_stream(worker, num_workers, consumed)`: the items of logical worker `worker`,
    resuming after the payload `consumed` (None: from the start of `self.epoch`), each item tagged with
    ``position = (num_workers, worker, payload)``; and `_fingerprint()`, the settings a resume must match.
    """

    def __init__(self, seed: int = 0, rank: int | None = None, world_size: int | None = None) -> None:
        self.seed = int(seed)
        self.rank = get_rank() if rank is None else int(rank)
        self.world_size = get_world_size() if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        self.epoch = 0
        self._consumed: dict[int, Any] = {}  # logical worker -> payload of its last consumed item
        self._num_workers: int | None = None  # worker count the consumed positions were recorded with
        self._batches = 0  # batches consumed since the start of the stream (epoch `self.epoch`)

    # -- to implement
    def _stream(self, worker: int, num_workers: int, consumed: Any) -> Iterator[dict[str, Any] | BadSample]:
        raise NotImplementedError

    def _fingerprint(self) -> dict[str, Any]:
        raise NotImplementedError

    def _observe(self, worker: int, payload: Any) -> None:
        self._consumed[worker] = payload

    # -- iteration
    def set_epoch(self, epoch: int) -> None:
        """Start the stream at `epoch` (a no-op when it already is; otherwise forgets consumed positions)."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._consumed.clear()
            self._num_workers = None
            self._batches = 0

    def __iter__(self) -> Iterator[dict[str, Any] | BadSample]:
        worker, num_workers = _worker_layout()
        if self._num_workers is not None and self._num_workers != num_workers:
            raise ValueError(
                f"{type(self).__name__}: resume positions were recorded with {self._num_workers} DataLoader "
                f"worker(s) but this loader has {num_workers}; exact resume needs the same num_workers"
            )
        # The DataLoader asks workers 0, 1, ... in turn; rotate so that physical worker 0 plays the logical
        # worker the uninterrupted run would have asked next.
        logical = (worker + self._batches) % num_workers
        return self._stream(logical, num_workers, self._consumed.get(logical))

    # -- bookkeeping in the main process
    def update(self, batch: dict[str, Any]) -> None:
        """Record a consumed batch (built by `collate`); call it for every batch the loop takes."""
        positions = batch.get("position")
        if not positions:
            raise KeyError(f"{type(self).__name__}.update: batch has no 'position' (build it with collate)")
        for num_workers, worker, payload in positions:
            if self._num_workers is not None and num_workers != self._num_workers:
                raise ValueError(f"batch from a loader with {num_workers} workers, expected {self._num_workers}")
            self._num_workers = num_workers
            self._observe(worker, payload)
        self._batches += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            **self._fingerprint(),
            "epoch": self.epoch,
            "num_workers": self._num_workers,
            "batches": self._batches,
            "consumed": [[w, _to_lists(p)] for w, p in sorted(self._consumed.items())],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in self._fingerprint().items():
            if _to_lists(state.get(key)) != _to_lists(value):
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: '{key}' was {state.get(key)!r} in the saved state "
                    f"but is {value!r} now; exact resume needs the same value"
                )
        self.epoch = int(state["epoch"])
        self._num_workers = state["num_workers"]
        self._batches = int(state["batches"])
        self._consumed = {int(w): p for w, p in state["consumed"]}


def _to_lists(x: Any) -> Any:
    """Tuples -> lists, recursively, so that states compare equal after a JSON round trip."""
    if isinstance(x, (list, tuple)):
        return [_to_lists(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _to_lists(v) for k, v in x.items()}
    return x


class WebCaptionDataset(ResumableIterable):
    """Image-caption pairs from webdataset tar shards; items as `CaptionDataset` minus ``image_id``.

    Args:
        urls: shard paths/urls, or a brace spec such as ``"/data/laion/{00000..01743}.tar"``.
        transform: PIL RGB image -> tensor (`train_transform` / `eval_transform`).
        seed, rank, world_size: rank/world default to the process group (0/1 without one).
        shuffle: shuffle shards per epoch and samples in a buffer of `shuffle_buffer` (False: file order).
        repeat: endless stream over epochs (training) or a single epoch.
        caption_from: where to read the caption, first present wins: ``"txt"`` (a text member) or
            ``"json:<field>"`` (a field of the ``json`` member; a list of strings there is a set of alternatives,
            one drawn per sample from the sample's own seed, as `qformer capfilt` writes its kept captions).
        max_words, prompt: caption cleaning (`clean_caption`).
        max_pending_bad: flush this many consecutive bad samples as `BadSample` items (so that a shard of
            garbage still reaches the `SkipCounter` instead of stalling the batch).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        transform: Transform,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        repeat: bool = True,
        caption_from: Sequence[str] = ("txt", "json:caption"),
        max_words: int = 50,
        prompt: str = "",
        max_pending_bad: int = 1000,
    ) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size)
        self.urls = expand_shards(urls)
        if not self.urls:
            raise ValueError(f"no shards in {urls!r}")
        self.transform = transform
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.repeat = repeat
        for source in caption_from:
            if source != "txt" and not source.startswith("json:"):
                raise ValueError(f"caption source must be 'txt' or 'json:<field>', got {source!r}")
        self.caption_from = tuple(caption_from)
        self.text_processor: Callable[[str], str] = CaptionProcessor(max_words=max_words, prompt=prompt)
        self.max_pending_bad = max_pending_bad
        _warn_if_truncated_images_allowed()

    def _fingerprint(self) -> dict[str, Any]:
        digest = hashlib.sha1("\n".join(self.urls).encode()).hexdigest()[:16]
        return {
            "kind": "webdata",
            "shards": f"{len(self.urls)}:{digest}",
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
        }

    # -- the raw stream of one reader
    def shards_for(self, epoch: int, worker: int, num_workers: int) -> list[str]:
        """The shards logical `worker` of this rank reads in `epoch`."""
        order = list(self.urls)
        if self.shuffle:
            random.Random(seed_int(self.seed, 0, epoch)).shuffle(order)
        readers = self.world_size * num_workers
        reader = self.rank * num_workers + worker
        mine = order[reader::readers]
        if not mine:
            raise ValueError(
                f"{len(order)} shard(s) cannot feed {readers} readers (world_size={self.world_size} x "
                f"num_workers={num_workers}); use fewer workers or more shards"
            )
        return mine

    def _raw_samples(self, epoch: int, worker: int, num_workers: int) -> Iterator[dict[str, Any] | BadSample]:
        shards = self.shards_for(epoch, worker, num_workers)
        shard_set = set(shards)
        errors: list[BaseException] = []

        def handler(exn: BaseException) -> bool:
            errors.append(exn)
            return True  # skip what failed and go on

        def bad_from_errors() -> Iterator[BadSample]:
            while errors:
                exn = errors.pop(0)
                url = next((a for a in reversed(exn.args) if isinstance(a, str) and a in shard_set), "<shard>")
                yield BadSample(url, f"shard read error: {type(exn).__name__}: {exn.args[0] if exn.args else ''}")

        def samples() -> Iterator[dict[str, Any] | BadSample]:
            for url in shards:
                for sample in tariterators.tarfile_samples(iter([{"url": url}]), handler=handler):
                    yield from bad_from_errors()
                    yield sample
                yield from bad_from_errors()
                if _is_truncated_local_tar(url):
                    # tarfile stops silently at a cut inside a member header: say so
                    yield BadSample(
                        url, "shard is truncated (no end-of-archive blocks): samples after the cut are lost"
                    )

        stream = samples()
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(seed_int(self.seed, 1, epoch, self.rank, worker))
            stream = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(stream)
        return stream

    def _decode(self, raw: dict[str, Any] | BadSample, seed: int) -> dict[str, Any] | BadSample:
        """`seed`: the sample's own, for its augmentation (see `seeded_rng`)."""
        if isinstance(raw, BadSample):
            return raw
        path = f"{raw.get('__url__', '<shard>')}#{raw.get('__key__', '?')}"
        try:
            data = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
            if data is None:
                return BadSample(path, f"no image member (has {sorted(k for k in raw if not k.startswith('__'))})")
            caption = self._caption(raw, seed)
            if caption is None:
                return BadSample(path, f"no caption in {self.caption_from}")
            if not has_words(caption):
                return BadSample(path, "empty or blank caption")
            image = decode_image(data, path)
            with seeded_rng(seed):
                image = self.transform(image)
            return {"image": image, "text_input": self.text_processor(caption), "key": raw["__key__"]}
        except Exception as exc:
            return BadSample(path, _describe(exc))

    def _caption(self, raw: dict[str, Any], seed: int) -> str | None:
        for source in self.caption_from:
            if source == "txt" and "txt" in raw:
                return raw["txt"].decode("utf-8")
            if source.startswith("json:") and "json" in raw:
                value = json.loads(raw["json"]).get(source[len("json:") :])
                if isinstance(value, str):
                    return value
                if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
                    # Alternatives (the kept captions `qformer capfilt` writes): one per draw, from the sample's seed.
                    return random.Random(seed).choice(value)
        return None

    def _stream(self, worker: int, num_workers: int, consumed: Any) -> Iterator[dict[str, Any] | BadSample]:
        if consumed is None or consumed[0] < self.epoch:
            epoch, start = self.epoch, 0
        else:
            epoch, start = int(consumed[0]), int(consumed[1]) + 1
        pending: list[tuple[BadSample, tuple[int, int]]] = []  # bad samples waiting for the next good one
        while True:
            n_raw = 0
            for index, raw in enumerate(self._raw_samples(epoch, worker, num_workers)):
                n_raw += 1
                if index < start:
                    continue  # consumed before the resume: skipped undecoded
                item = self._decode(raw, seed_int(self.seed, 5, epoch, self.rank, worker, index))
                position = (num_workers, worker, (epoch, index))
                if isinstance(item, BadSample):
                    logger.debug("bad sample %s: %s", item.path, item.reason)
                    pending.append((item, position))
                    if len(pending) >= self.max_pending_bad:
                        yield from self._flush(pending)
                    continue
                item["position"] = position
                if pending:
                    item["skipped"] = [(bad.path, bad.reason) for bad, _ in pending]
                    item["attempts"] = 1 + len(pending)
                    pending = []
                yield item
            if n_raw == 0:
                raise RuntimeError(
                    f"worker {worker} of rank {self.rank} read no samples in epoch {epoch} from "
                    f"{self.shards_for(epoch, worker, num_workers)}"
                )
            if not self.repeat:
                yield from self._flush(pending)
                return
            epoch, start = epoch + 1, 0

    @staticmethod
    def _flush(pending: list[tuple[BadSample, Any]]) -> Iterator[BadSample]:
        for bad, position in pending:
            bad.position = position
            yield bad
        pending.clear()
