"""Test fixtures for tasks.data: tiny JPEGs, LAVIS-style annotation files and webdataset shards, all on disk."""

from __future__ import annotations

import io
import json
import zlib
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image


def jpeg_bytes(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    """A noisy RGB JPEG (noise keeps the file large enough that a truncation really cuts image data)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def write_caption_dataset(
    root: Path, n_images: int = 20, bad: tuple[int, ...] = (3,), missing: tuple[int, ...] = (11,)
):
    """Write `n_images` annotated images: indices in `bad` get truncated JPEG bytes, those in `missing` no file.

    Image i has two captions when i % 4 == 0, else one. Annotations are split over two JSON files, and
    image 0 is annotated in both (same raw id), as happens with concatenated splits.
    Returns (annotation paths, image root, {image index: absolute path}, {caption text: image index}).
    """
    image_root = root / "images"
    image_root.mkdir(parents=True)
    entries, paths, captions = [], {}, {}
    for i in range(n_images):
        rel = f"sub/img_{i:02d}.jpg"
        path = image_root / rel
        paths[i] = str(path)
        if i not in missing:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = jpeg_bytes(i)
            path.write_bytes(truncated(data) if i in bad else data)
        caps = [f"A photo: number {i}!", f"Second caption of image {i}."] if i % 4 == 0 else [f"Image #{i}."]
        for c in caps:
            captions[c] = i
        entries.append({"image": rel, "caption": caps if len(caps) > 1 else caps[0], "image_id": f"id-{i}"})
    half = n_images // 2
    files = [root / "ann_a.json", root / "ann_b.json"]
    files[0].write_text(json.dumps(entries[:half]))
    # image 0 again in the second file, with an extra caption: must map to the same contiguous id
    extra = {"image": entries[0]["image"], "caption": "Image zero, again.", "image_id": "id-0"}
    captions[extra["caption"]] = 0
    files[1].write_text(json.dumps(entries[half:] + [extra]))
    return files, image_root, paths, captions


def write_shards(
    root: Path,
    prefix: str,
    n_shards: int,
    per_shard: int,
    bad_jpeg: tuple[str, ...] = (),
    no_image: tuple[str, ...] = (),
) -> tuple[list[str], dict[str, str]]:
    """Webdataset shards: sample key ``{prefix}{shard}_{i}``, caption as ``txt`` (even i) or ``json`` (odd i).

    Keys in `bad_jpeg` get truncated JPEG bytes, keys in `no_image` have no image member.
    Returns (shard paths, {key: caption}).
    """
    root.mkdir(parents=True, exist_ok=True)
    urls, captions = [], {}
    for s in range(n_shards):
        url = str(root / f"{prefix}-{s:04d}.tar")
        urls.append(url)
        with wds.TarWriter(url) as sink:
            for i in range(per_shard):
                key = f"{prefix}{s:02d}_{i:02d}"
                caption = f"Caption of {key}."
                captions[key] = caption
                sample = {"__key__": key}
                if key not in no_image:
                    data = jpeg_bytes(zlib.crc32(key.encode()), size=(24, 24))
                    sample["jpg"] = truncated(data) if key in bad_jpeg else data
                if i % 2 == 0:
                    sample["txt"] = caption
                else:
                    sample["json"] = {"caption": caption, "url": "http://example.invalid"}
                sink.write(sample)
    return urls, captions
