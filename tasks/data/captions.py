"""Image-caption datasets from JSON annotation files, and the bad-sample accounting every dataset here shares.

Annotation files are JSON lists of ``{"image": relative path, "caption": str | [str], "image_id": any}``
(COCO Karpathy, Visual Genome, CC3M, SBU as LAVIS ships them). Several files are concatenated; arbitrary
image ids map to contiguous ints in order of first appearance, consistently across files (LAVIS
`CaptionDataset.img_ids`). With a list of captions and `split_captions=True` every caption is its own sample, except
in an entry marked ``"sample_caption": true`` (what `qformer capfilt` writes): its captions are alternatives, one
sample that draws one of them at each access.

Annotation files are checked when read: invalid JSON, an entry without a path string in "image" or with a caption
that is neither a string nor a list of strings is an error naming the file and the entry (`file[i]`). A caption
with no words once cleaned (empty, blank, only punctuation) is a bad sample like an unreadable image: skipped when
drawn, counted, and listed as `file[i]`. An image with more pixels than PIL's `Image.MAX_IMAGE_PIXELS`
(`set_max_image_pixels`; the configs' `max_image_pixels`) is refused as a possible decompression bomb
(`ImageTooLarge`, naming the image and its pixel count) before it is decoded.

Bad data never kills a run and never passes silently. What a dataset item can be:

- a good sample: a dict with ``image`` (tensor), ``text_input`` (str), maybe ``image_id`` (int) and the
  bookkeeping keys ``skipped`` (list of ``(path, reason)`` of bad source samples this item replaces or
  follows), ``attempts`` (source samples this item accounts for, default 1) and ``position`` (stream
  position, for the resumable iterables of `webdata.py` / `mix.py`);
- a `BadSample` (or ``None``): nothing usable; `collate` drops it but keeps its path.

`collate` turns a list of items into a batch whose ``skipped``/``num_attempted`` entries tell the main
process exactly what was skipped, also when the items were produced in DataLoader worker processes. A
`SkipCounter` fed with every batch (``counter.update(batch)``, or `track`) keeps the count and the paths and
raises `TooManyBadSamples` once the skip rate passes its threshold.

Map-style datasets default to ``on_error="replace"``: a bad index is answered with a deterministic
substitute (another index of the same dataset) carrying the bad path in ``skipped``, so batches keep their
size, which distributed training needs (every rank must gather tensors of the same shape). With
``on_error="drop"`` the dataset returns a `BadSample` and the batch shrinks.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from .text import CaptionProcessor, has_words

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "BadSample",
    "CaptionDataset",
    "ImageTooLarge",
    "SkipCounter",
    "TooManyBadSamples",
    "collate",
    "decode_image",
    "load_image",
    "read_json",
    "require_usable",
    "set_max_image_pixels",
    "track",
]

Transform = Callable[[Image.Image], torch.Tensor]
# Keys `collate` handles itself; any other key of the good samples is passed through as a list.
_BOOKKEEPING = ("image", "text_input", "image_id", "skipped", "attempts", "position")
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default Image.MAX_IMAGE_PIXELS (PIL only warns up to twice it)
_PIXELS = re.compile(r"\((\d+) pixels\)")  # in PIL's decompression-bomb messages


@dataclass
class BadSample:
    """A source sample that could not be used. `position` is set by resumable streams."""

    path: str
    reason: str
    position: Any = None


class TooManyBadSamples(RuntimeError, ValueError):
    """Raised by `SkipCounter` when the fraction of skipped samples passes `max_skip_fraction`, and by
    `require_usable` for a batch with no usable sample. A ValueError too: the command line reports it as bad input."""


class ImageTooLarge(ValueError):
    """An image with more pixels than `Image.MAX_IMAGE_PIXELS` (a possible decompression bomb); names the image."""


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The parsed JSON file at `path`; a missing, unreadable or invalid file is an error naming it and `what` (and,
    for invalid JSON, the line and column)."""
    if not path:
        raise ValueError(f"no {what} given (empty path in the config)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text: {e}") from e


def set_max_image_pixels(limit: int) -> None:
    """Refuse images of more than `limit` pixels (width x height) from now on, in this process and the DataLoader
    workers it starts; 0 = no limit. Sets PIL's process-wide `Image.MAX_IMAGE_PIXELS`."""
    if limit < 0:
        raise ValueError(f"max_image_pixels must be >= 0 (0 = no limit), got {limit}")
    Image.MAX_IMAGE_PIXELS = limit or None


def _open_rgb(source: str | os.PathLike | io.BytesIO, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice that: here the limit is the limit.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                img.load()  # full decode now: a truncated or corrupt file raises here, not later in a transform
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        match = _PIXELS.search(str(e))
        pixels = f"{int(match.group(1)):,} pixels" if match else "too many pixels"
        raise ImageTooLarge(
            f"{name}: {pixels}, above the limit of {Image.MAX_IMAGE_PIXELS:,} (max_image_pixels; PIL refuses "
            "larger images as possible decompression bombs)"
        ) from e


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file as RGB; raises (OSError, ImageTooLarge, ...) on missing, truncated,
    corrupt or too large files."""
    return _open_rgb(path, str(path))


def decode_image(data: bytes, name: str = "<image bytes>") -> Image.Image:
    """Fully decode encoded image bytes (jpg/png/webp) as RGB; raises on truncated, corrupt or too large data."""
    return _open_rgb(io.BytesIO(data), name)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _warn_if_truncated_images_allowed() -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by some other code): truncated images will load "
            "with grey fill instead of being detected and skipped"
        )


# --------------------------------------------------------------------------------------------- batching


def collate(batch: Sequence[dict[str, Any] | BadSample | None]) -> dict[str, Any]:
    """Drop bad items and stack the rest.

    Returns ``{"image": [B, 3, H, W] (None when B == 0), "text_input": list[str], "image_id": LongTensor[B]
    (only when every good sample has one), "skipped": list[str] paths, "skip_reasons": list[str],
    "num_attempted": int (source samples this batch accounts for, bad ones included), "position": list
    (only for resumable streams)}`` plus, as lists, any other key all good samples share.
    """
    good: list[dict[str, Any]] = []
    skipped: list[str] = []
    reasons: list[str] = []
    positions: list[Any] = []
    attempted = 0
    for item in batch:
        if item is None:
            skipped.append("<unknown: dataset returned None>")
            reasons.append("dataset returned None")
            attempted += 1
        elif isinstance(item, BadSample):
            skipped.append(item.path)
            reasons.append(item.reason)
            attempted += 1
            if item.position is not None:
                positions.append(item.position)
        else:
            good.append(item)
            attempted += int(item.get("attempts", 1))
            for path, reason in item.get("skipped", ()):
                skipped.append(path)
                reasons.append(reason)
            if "position" in item:
                positions.append(item["position"])

    out: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in good]) if good else None,
        "text_input": [s["text_input"] for s in good],
    }
    if good and all("image_id" in s for s in good):
        out["image_id"] = torch.tensor([int(s["image_id"]) for s in good], dtype=torch.long)
    elif not good:
        out["image_id"] = torch.zeros(0, dtype=torch.long)
    shared = set(good[0]) if good else set()
    for s in good[1:]:
        shared &= set(s)
    for key in sorted(shared - set(_BOOKKEEPING)):
        out[key] = [s[key] for s in good]
    out["skipped"] = skipped
    out["skip_reasons"] = reasons
    out["num_attempted"] = attempted
    if positions:
        out["position"] = positions
    return out


def require_usable(batch: dict[str, Any]) -> dict[str, Any]:
    """`batch` (from `collate`) if it holds a sample; else `TooManyBadSamples` naming what was skipped (a training
    step cannot use an empty batch)."""
    if batch["text_input"]:
        return batch
    first = batch["skipped"][0] if batch["skipped"] else "?"
    reason = (batch.get("skip_reasons") or [""])[0]
    raise TooManyBadSamples(
        f"a batch of {batch['num_attempted']} sample(s) has none usable, substitutes included; the first: {first}"
        + (f" ({reason})" if reason else "")
        + ". Are data.datasets' image_root and ann_paths right?"
    )


class SkipCounter:
    """Counts skipped samples from batches (exact with any number of DataLoader workers) and enforces a limit.

    Feed it every batch the loop takes (``counter.update(batch)``). Once at least `min_samples` source samples
    were seen, a skip fraction above `max_skip_fraction` (None: never) raises `TooManyBadSamples` naming the
    threshold, the counts and the most recent bad paths. The fraction is cumulative over the run (and over
    resumes, via `state_dict`). Every skipped path is logged: the first `log_first` at WARNING, then one
    WARNING summary per `log_every` skips (the rest at DEBUG). At most `keep_paths` paths are kept.
    """

    def __init__(
        self,
        max_skip_fraction: float | None = 0.05,
        min_samples: int = 1000,
        recent: int = 10,
        keep_paths: int = 100_000,
        log_first: int = 100,
        log_every: int = 1000,
    ) -> None:
        if max_skip_fraction is not None and not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1] or None, got {max_skip_fraction}")
        self.max_skip_fraction = max_skip_fraction
        self.min_samples = min_samples
        self.keep_paths = keep_paths
        self.log_first = log_first
        self.log_every = log_every
        self.num_seen = 0
        self.num_skipped = 0
        self.skipped_paths: list[str] = []
        self.recent: deque[str] = deque(maxlen=recent)

    @property
    def skip_fraction(self) -> float:
        return self.num_skipped / self.num_seen if self.num_seen else 0.0

    def _add_skip(self, path: str, reason: str) -> None:
        self.num_skipped += 1
        if len(self.skipped_paths) < self.keep_paths:
            self.skipped_paths.append(path)
        self.recent.append(path)
        if self.num_skipped <= self.log_first:
            logger.warning("skipped bad sample %s (%s); %d skipped so far", path, reason, self.num_skipped)
        elif self.num_skipped % self.log_every == 0:
            logger.warning("skipped bad sample %s (%s); %s", path, reason, self.summary())
        else:
            logger.debug("skipped bad sample %s (%s)", path, reason)

    def record_good(self, n: int = 1) -> None:
        self.num_seen += n

    def record_bad(self, path: str, reason: str = "") -> None:
        self.num_seen += 1
        self._add_skip(path, reason)
        self.check()

    def update(self, batch: dict[str, Any]) -> None:
        """Count one collated batch (see `collate`), then check the threshold."""
        if "num_attempted" not in batch:
            raise KeyError("batch has no 'num_attempted': build it with tasks.data.collate")
        self.num_seen += int(batch["num_attempted"])
        reasons = batch.get("skip_reasons") or [""] * len(batch["skipped"])
        for path, reason in zip(batch["skipped"], reasons, strict=True):
            self._add_skip(path, reason)
        self.check()

    def check(self) -> None:
        if self.max_skip_fraction is None or self.num_seen < self.min_samples:
            return
        if self.skip_fraction > self.max_skip_fraction:
            raise TooManyBadSamples(
                f"too many bad samples: {self.num_skipped} of {self.num_seen} skipped ({self.skip_fraction:.2%}), "
                f"above max_skip_fraction={self.max_skip_fraction} (checked from min_samples={self.min_samples}); "
                f"most recent bad paths: {list(self.recent)}"
            )

    def summary(self) -> str:
        return f"{self.num_skipped} of {self.num_seen} samples skipped ({self.skip_fraction:.2%})"

    def state_dict(self) -> dict[str, Any]:
        return {"num_seen": self.num_seen, "num_skipped": self.num_skipped, "skipped_paths": list(self.skipped_paths)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_seen = int(state["num_seen"])
        self.num_skipped = int(state["num_skipped"])
        self.skipped_paths = list(state["skipped_paths"])
        self.recent.clear()
        self.recent.extend(self.skipped_paths[-(self.recent.maxlen or 0) :])


def track(batches: Iterable[dict[str, Any]], *trackers: Any) -> Iterator[dict[str, Any]]:
    """Yield `batches`, first calling ``tracker.update(batch)`` on each tracker (SkipCounter, samplers, streams).

    A batch counts as consumed as soon as it is yielded: save checkpoints after the step that used it.
    """
    for batch in batches:
        for tracker in trackers:
            tracker.update(batch)
        yield batch


# ------------------------------------------------------------------------------------------- the dataset


class CaptionDataset(Dataset):
    """Map-style image-caption dataset over LAVIS-style JSON annotation lists.

    Item: ``{"image": transform(RGB image), "text_input": prompt + clean_caption(caption), "image_id": int}``.
    With ``split_captions=False`` a list of captions stays one sample and each access picks one caption with
    Python's `random` (seeded per DataLoader worker by torch).
    """

    def __init__(
        self,
        ann_paths: str | os.PathLike | Sequence[str | os.PathLike],
        image_root: str | os.PathLike,
        transform: Transform,
        split_captions: bool = True,
        max_words: int = 50,
        prompt: str = "",
        on_error: Literal["replace", "drop"] = "replace",
        max_replacement_tries: int = 8,
    ) -> None:
        if on_error not in ("replace", "drop"):
            raise ValueError(f"on_error must be 'replace' or 'drop', got {on_error!r}")
        if isinstance(ann_paths, (str, os.PathLike)):
            ann_paths = [ann_paths]
        self.ann_paths = [str(p) for p in ann_paths]
        self.image_root = str(image_root)
        self.transform = transform
        self.text_processor = CaptionProcessor(max_words=max_words, prompt=prompt)
        self.split_captions = split_captions
        self.on_error = on_error
        self.max_replacement_tries = max_replacement_tries

        self.image_ids: dict[Any, int] = {}
        # (image path relative to image_root, caption or tuple of captions, contiguous image id)
        self.samples: list[tuple[str, str | tuple[str, ...], int]] = []
        self.blank: dict[int, str] = {}  # sample index -> "file[i]" of a caption with no words: a bad sample
        for ann_path in self.ann_paths:
            self._read_annotations(ann_path)
        if not self.samples:
            raise ValueError(f"no samples in annotation files {self.ann_paths}")
        logger.info(
            "CaptionDataset: %d samples, %d images from %d annotation file(s)",
            len(self.samples),
            len(self.image_ids),
            len(self.ann_paths),
        )
        _warn_if_truncated_images_allowed()

    def _read_annotations(self, ann_path: str) -> None:
        entries = read_json(ann_path, "caption annotation file")
        if not isinstance(entries, list):
            raise ValueError(f"{ann_path}: expected a JSON list of annotations, got {type(entries).__name__}")
        blank: list[int] = []
        for i, ann in enumerate(entries):
            if not isinstance(ann, dict) or "image" not in ann or "caption" not in ann:
                raise ValueError(f"{ann_path}[{i}]: annotation needs 'image' and 'caption' keys, got {ann!r:.200}")
            if not isinstance(ann["image"], str) or not ann["image"]:
                raise ValueError(f"{ann_path}[{i}]: 'image' must be a path (a non-empty string), got {ann['image']!r}")
            captions = ann["caption"]
            if isinstance(captions, str):
                captions = [captions]
            if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
                raise ValueError(
                    f"{ann_path}[{i}]: 'caption' must be a string or a non-empty list of strings, got {captions!r:.200}"
                )
            raw_id = ann.get("image_id", ann["image"])
            if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool):
                raise ValueError(f"{ann_path}[{i}]: 'image_id' must be a string or an integer, got {raw_id!r:.200}")
            sample_one = ann.get("sample_caption", False)
            if not isinstance(sample_one, bool):
                raise ValueError(f"{ann_path}[{i}]: 'sample_caption' must be true or false, got {sample_one!r:.200}")
            image_id = self.image_ids.setdefault(raw_id, len(self.image_ids))
            worded = [c for c in captions if has_words(c)]
            if len(worded) < len(captions):
                blank.append(i)
            if self.split_captions and not sample_one:
                for c in captions:
                    if c not in worded:
                        self.blank[len(self.samples)] = f"{ann_path}[{i}]"
                    self.samples.append((ann["image"], c, image_id))
            else:
                # Blank captions of a list are left out; a list of nothing but blanks is one bad sample.
                kept = worded or captions[:1]
                if not worded:
                    self.blank[len(self.samples)] = f"{ann_path}[{i}]"
                self.samples.append((ann["image"], tuple(kept) if len(kept) > 1 else kept[0], image_id))
        if blank:
            logger.warning(
                "%s: %d entr%s with an empty or blank caption (e.g. %s): skipped and counted as bad samples",
                ann_path,
                len(blank),
                "y" if len(blank) == 1 else "ies",
                ", ".join(f"[{i}]" for i in blank[:5]),
            )

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    def __len__(self) -> int:
        return len(self.samples)

    def image_path(self, index: int) -> str:
        return os.path.join(self.image_root, self.samples[index][0])

    def _load(self, index: int) -> dict[str, Any]:
        if index in self.blank:
            raise ValueError("empty or blank caption")
        _, caption, image_id = self.samples[index]
        if isinstance(caption, tuple):
            caption = random.choice(caption)
        image = self.transform(load_image(self.image_path(index)))
        return {"image": image, "text_input": self.text_processor(caption), "image_id": image_id}

    def __getitem__(self, index: int) -> dict[str, Any] | BadSample:
        try:
            return self._load(index)
        except Exception as exc:  # any failure to read/decode/transform makes this one sample bad
            path, reason = self.blank.get(index) or self.image_path(index), _describe(exc)
        logger.debug("bad sample %d: %s (%s)", index, path, reason)
        if self.on_error == "drop":
            return BadSample(path, reason)
        for attempt in range(self.max_replacement_tries):
            # Deterministic pseudo-random substitute (neighbours often share the bad image).
            other = random.Random(index * 1_000_003 + attempt).randrange(len(self.samples))
            if other == index:
                continue
            try:
                sample = self._load(other)
            except Exception as exc:
                logger.debug("substitute %d for %d is bad too: %s", other, index, _describe(exc))
                continue
            sample["skipped"] = [(path, reason)]
            return sample
        return BadSample(path, reason)
