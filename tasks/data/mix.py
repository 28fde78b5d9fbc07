"""Mixing datasets by sampling ratios, and a resumable rank-aware sampler for map-style datasets.

- `MixedDataset` (map-style): an epoch of `length` indices, of which source k gets exactly its share
  (largest-remainder rounding of ``ratio_k * length``), interleaved in a seeded random order. The j-th use of
  source k in the run (counted across epochs) maps to a seeded permutation of that source, so down-sampled
  sources show different samples each epoch and up-sampled ones repeat every sample equally often. A pure
  function of (seed, epoch): use it with `ResumableDistributedSampler`, whose position is the resume state.
  ``image_id`` values are offset per source so that ids of different sources never collide.
- `MixedIterableDataset`: a seeded weighted random choice of the source for every item (as LAVIS's
  `MultiIterLoader`, ``random.choices`` with the ratios), over `ResumableIterable` sources; exact resume.
- `ResumableDistributedSampler`: `DistributedSampler`'s shuffling and rank split plus a position that the
  loop advances with consumed batches, so a resumed run skips exactly what was consumed in the epoch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from qformer.dist import get_rank, get_world_size

from .captions import BadSample
from .webdata import ResumableIterable, seed_int

logger = logging.getLogger(__name__)

__all__ = [
    "MixedDataset",
    "MixedIterableDataset",
    "ResumableDistributedSampler",
    "normalize_ratios",
    "sqrt_size_ratios",
]


def normalize_ratios(ratios: Sequence[float]) -> np.ndarray:
    weights = np.asarray(ratios, dtype=np.float64)
    if weights.ndim != 1 or len(weights) == 0 or not np.all(np.isfinite(weights)) or np.any(weights <= 0):
        raise ValueError(f"sampling ratios must be positive finite numbers, got {list(ratios)}")
    return weights / weights.sum()


def sqrt_size_ratios(sizes: Sequence[int], ratios: Sequence[float] | None = None) -> np.ndarray:
    """Sampling weights in proportion to the square root of each dataset's size (InstructBLIP, "Balancing Training
    Datasets"), times an optional per-dataset factor (the paper adjusts a few by hand); normalised to sum to 1."""
    if any(int(n) <= 0 for n in sizes):
        raise ValueError(f"square-root mixing needs non-empty datasets, got sizes {list(sizes)}")
    factors = normalize_ratios([1.0] * len(sizes) if ratios is None else ratios)
    return normalize_ratios(np.sqrt(np.asarray(sizes, dtype=np.float64)) * factors)


def _quotas(weights: np.ndarray, total: int) -> np.ndarray:
    """Largest-remainder split of `total` by `weights` (sums to `total` exactly)."""
    exact = weights * total
    counts = np.floor(exact).astype(np.int64)
    remainder = total - int(counts.sum())
    if remainder:
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:remainder]] += 1
    return counts


class MixedDataset(Dataset):
    """Map-style mixture: ``MixedDataset([(coco, 0.7), (vg, 0.3)], seed=0, length=None)``.

    `length` defaults to the sum of the source lengths. Call `set_epoch` each epoch (before creating the
    DataLoader iterator; workers copy the dataset at that point, so do not combine with persistent_workers).
    """

    def __init__(
        self,
        datasets: Sequence[tuple[Dataset, float]],
        seed: int = 0,
        length: int | None = None,
        offset_image_ids: bool = True,
    ) -> None:
        if not datasets:
            raise ValueError("MixedDataset needs at least one (dataset, ratio) pair")
        self.datasets = [d for d, _ in datasets]
        self.weights = normalize_ratios([r for _, r in datasets])
        self.sizes = [len(d) for d in self.datasets]
        if any(n == 0 for n in self.sizes):
            raise ValueError(f"empty source dataset in the mix (sizes {self.sizes})")
        self.seed = int(seed)
        self.length = int(length) if length is not None else sum(self.sizes)
        self.quotas = _quotas(self.weights, self.length)
        # Image ids of source k are shifted by the ids of sources 0..k-1 (num_images, or len as a bound).
        spans = [int(getattr(d, "num_images", len(d))) for d in self.datasets]
        self.id_offsets = np.concatenate([[0], np.cumsum(spans)[:-1]]).tolist() if offset_image_ids else None
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}
        self.epoch = -1
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.epoch:
            return
        self.epoch = int(epoch)
        sources = np.repeat(np.arange(len(self.datasets), dtype=np.int64), self.quotas)
        np.random.default_rng(seed_int(self.seed, 2, self.epoch)).shuffle(sources)
        occurrence = np.empty(self.length, dtype=np.int64)  # j: this index is the j-th use of its source
        for k in range(len(self.datasets)):
            where = np.flatnonzero(sources == k)
            occurrence[where] = np.arange(len(where)) + self.epoch * int(self.quotas[k])
        self._source, self._occurrence = sources, occurrence
        self._perm_cache.clear()

    def _permutation(self, k: int, cycle: int) -> np.ndarray:
        key = (k, cycle)
        if key not in self._perm_cache:
            if len(self._perm_cache) >= 4 * len(self.datasets):
                self._perm_cache.clear()
            rng = np.random.default_rng(seed_int(self.seed, 3, k, cycle))
            self._perm_cache[key] = rng.permutation(self.sizes[k])
        return self._perm_cache[key]

    def source_index(self, index: int) -> tuple[int, int]:
        """(source k, index within source k) that mixed `index` reads in the current epoch."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for MixedDataset of length {self.length}")
        k = int(self._source[index])
        cycle, offset = divmod(int(self._occurrence[index]), self.sizes[k])
        return k, int(self._permutation(k, cycle)[offset])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        k, j = self.source_index(index)
        item = self.datasets[k][j]
        if self.id_offsets is not None and isinstance(item, dict) and "image_id" in item:
            item = {**item, "image_id": int(item["image_id"]) + self.id_offsets[k]}
        return item

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "length": self.length, "sizes": list(self.sizes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "length", "sizes"):
            if list(np.atleast_1d(state[key])) != list(np.atleast_1d(getattr(self, key))):
                raise ValueError(f"MixedDataset.load_state_dict: '{key}' was {state[key]} but is {getattr(self, key)}")
        self.set_epoch(int(state["epoch"]))


class MixedIterableDataset(ResumableIterable):
    """Seeded weighted mixture of `ResumableIterable` streams: ``MixedIterableDataset([(laion, 0.8), (cc, 0.2)])``.

    The source of the n-th item of a worker is drawn with numpy from ``(seed, rank, worker, n // 4096)``, so a
    resume jumps to draw n without replaying the draws. Each source splits itself over ranks and workers
    (the mix passes its worker identity down). The mix ends when any source ends (finite sources); with
    ``repeat=True`` sources it is endless. Resume state: per worker, the draws consumed and each source's own
    position.
    """

    CHUNK = 4096

    def __init__(
        self,
        sources: Sequence[tuple[ResumableIterable, float]],
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size)
        if not sources:
            raise ValueError("MixedIterableDataset needs at least one (dataset, ratio) pair")
        self.sources = [s for s, _ in sources]
        for s in self.sources:
            if not isinstance(s, ResumableIterable):
                raise TypeError(f"mixed iterable sources must be ResumableIterable, got {type(s).__name__}")
        self.weights = normalize_ratios([r for _, r in sources])

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "mix",
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "weights": [float(w) for w in self.weights],
            "sources": [s._fingerprint() for s in self.sources],
        }

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        for source in self.sources:
            source.set_epoch(epoch)

    def _observe(self, worker: int, payload: Any) -> None:
        draw, k, inner = payload
        entry = self._consumed.setdefault(worker, [0, [None] * len(self.sources)])
        entry[0] = draw
        entry[1][k] = inner

    def _choices(self, worker: int, start: int) -> Iterator[int]:
        chunk, offset = divmod(start, self.CHUNK)
        while True:
            rng = np.random.default_rng(seed_int(self.seed, 4, self.rank, worker, chunk))
            block = rng.choice(len(self.sources), size=self.CHUNK, p=self.weights)
            yield from (int(k) for k in block[offset:])
            chunk, offset = chunk + 1, 0

    def _stream(self, worker: int, num_workers: int, consumed: Any) -> Iterator[dict[str, Any] | BadSample]:
        draw, inner = (0, [None] * len(self.sources)) if consumed is None else (consumed[0] + 1, consumed[1])
        streams = [src._stream(worker, num_workers, inner[k]) for k, src in enumerate(self.sources)]
        for k in self._choices(worker, draw):
            try:
                item = next(streams[k])
            except StopIteration:
                logger.info("mixed stream ends: source %d is exhausted (worker %d, draw %d)", k, worker, draw)
                return
            if isinstance(item, BadSample):
                item.position = (num_workers, worker, (draw, k, item.position[2]))
            else:
                item["position"] = (num_workers, worker, (draw, k, item["position"][2]))
            yield item
            draw += 1


class ResumableDistributedSampler(Sampler[int]):
    """Shuffled (seed + epoch, as `DistributedSampler`), rank-disjoint indices with a resumable position.

    Rank r takes ``perm[r::world_size]`` of the epoch's permutation (truncated to a multiple of world_size
    with `drop_last`, else padded with its first indices). `position` counts this rank's indices consumed in
    the current epoch: advance it with ``sampler.update(batch)`` (``batch["num_attempted"]``, which includes
    skipped samples) or ``sampler.advance(n)`` for every batch the loop takes; `state_dict` gives
    ``{"epoch", "position", ...}``; after `load_state_dict` the next iteration starts at `position`.
    `set_epoch` to a new epoch resets the position to 0 (and to the loaded epoch keeps it).
    """

    def __init__(
        self,
        dataset: Any,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        self.dataset = dataset
        self.rank = get_rank() if rank is None else int(rank)
        self.world_size = get_world_size() if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        n = len(dataset)
        self.num_samples = n // self.world_size if drop_last else math.ceil(n / self.world_size)
        if self.num_samples == 0:
            raise ValueError(f"dataset of {n} samples is too small for world_size {self.world_size}")
        self.total_size = self.num_samples * self.world_size
        self.epoch = 0
        self.position = 0
        self._start = 0  # where the next iteration starts (position at set_epoch / load_state_dict)

    def indices(self) -> list[int]:
        """This rank's indices for the current epoch, from the start of the epoch."""
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        if self.total_size <= n:
            order = order[: self.total_size]
        else:
            repeats = math.ceil((self.total_size - n) / n)
            order = (order + order * repeats)[: self.total_size]
        return order[self.rank : self.total_size : self.world_size]

    def __iter__(self) -> Iterator[int]:
        start = self.position
        self._start = start
        if start >= self.num_samples:
            logger.warning("sampler: epoch %d already fully consumed; call set_epoch for the next one", self.epoch)
        return iter(self.indices()[start:])

    def __len__(self) -> int:
        return self.num_samples - self._start

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.position = 0
            self._start = 0

    def advance(self, n: int) -> None:
        if self.position + n > self.num_samples:
            raise ValueError(
                f"sampler advanced past the end of epoch {self.epoch}: {self.position} + {n} > {self.num_samples}"
            )
        self.position += int(n)

    def update(self, batch: dict[str, Any]) -> None:
        self.advance(int(batch["num_attempted"]))

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "dataset_size": len(self.dataset),
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        current = self.state_dict()
        for key in ("seed", "world_size", "dataset_size", "shuffle", "drop_last"):
            if key in state and state[key] != current[key]:
                raise ValueError(
                    f"ResumableDistributedSampler.load_state_dict: '{key}' was {state[key]!r} in the saved state "
                    f"but is {current[key]!r} now; exact resume needs the same value"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        if not 0 <= self.position <= self.num_samples:
            raise ValueError(f"saved position {self.position} is outside 0..{self.num_samples}")
        self._start = self.position
