"""CapFilt's outputs, written by rank 0 once every shard is on disk:

captions.json     (caption JSON input) the kept captions, one entry per image in input order, in the training
                  format: the input entry with "caption" = the kept captions (best first), "sample_caption": true
                  (training draws one of them per step) and "capfilt" = {"scores", "sources" ("web" | "synthetic"),
                  "web_caption", "web_scores"}
shards/NNNNN.tar  (webdataset input) per image its bytes and a json member: the input's json fields with "caption" =
                  the kept captions (the training loader draws one per sample) and "capfilt" as above
summary.json      images in / out, the skipped images with their reasons, how often a web caption survived,
                  quantiles of the web, synthetic and kept scores, the settings
report.html       sample images with their web caption and the kept captions, with scores and sources
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from webdataset import tariterators

from tasks.capfilt.config import CapfiltConfig
from tasks.capfilt.pipeline import SHARDS_DIR, settings, shard_path
from tasks.data.captions import read_json
from tasks.data.webdata import IMAGE_EXTENSIONS
from tasks.evals.common import write_json
from tasks.evals.report import _esc, _fmt, _image_html, _write_page, sample_indices

__all__ = ["CAPTIONS_NAME", "REPORT_NAME", "SUMMARY_NAME", "merge", "quantiles"]

CAPTIONS_NAME = "captions.json"
SUMMARY_NAME = "summary.json"
REPORT_NAME = "report.html"
REPORT_IMAGES = "report_images"  # webdataset input: the report's images, copied out of the output tars
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def quantiles(values: list[float]) -> dict[str, float] | None:
    """{"q0": min, "q10": ..., "q100": max, "mean"} of `values` (None when empty), rounded to 6 digits."""
    if not values:
        return None
    values_at = np.quantile(np.asarray(values), QUANTILES)
    out = {f"q{round(q * 100)}": float(v) for q, v in zip(QUANTILES, values_at, strict=True)}
    out["mean"] = float(np.mean(values))
    return {k: round(v, 6) for k, v in out.items()}


def _report_image(cfg: CapfiltConfig, record: dict[str, Any], shard: int) -> tuple[str, str]:
    """(a file of the record's image: under image_root, or (webdataset output) copied out of its output tar; the name
    the report shows for it)."""
    if "key" not in record:
        path = os.path.join(cfg.image_root, record["image"])
        return path, path
    name = f"{SHARDS_DIR}/{shard:05d}.tar#{record['key']}"
    folder = Path(cfg.output_dir) / REPORT_IMAGES
    folder.mkdir(parents=True, exist_ok=True)
    tar = shard_path(cfg.output_dir, shard, ".tar")
    for raw in tariterators.tarfile_samples(iter([{"url": str(tar)}])):
        if raw["__key__"] == record["key"]:
            ext = next(e for e in IMAGE_EXTENSIONS if e in raw)
            path = folder / f"{shard:05d}_{Path(record['key']).name}.{ext}"
            path.write_bytes(raw[ext])
            return str(path), name
    return name, name  # shown as unreadable


def _report(path: Path, cfg: CapfiltConfig, records: list[dict], shards: list[int], summary: dict[str, Any]) -> Path:
    cards = []
    for i in sample_indices(len(records), cfg.report_samples):
        r = records[i]
        meta = r["capfilt"]
        web = "".join(
            f"<li>{_esc(c)} <span class='file'>{_fmt(s)}</span></li>"
            for c, s in zip(meta["web_caption"], meta["web_scores"], strict=True)
        )
        kept = "".join(
            f"<li class='{'hit' if src == 'web' else ''}'>{_esc(c)} "
            f"<span class='file'>{_fmt(s)} ({_esc(src)})</span></li>"
            for c, s, src in zip(r["caption"], meta["scores"], meta["sources"], strict=True)
        )
        body = (
            f"<div><span class='label'>Web:</span><ul>{web or '<li><i>none</i></li>'}</ul></div>"
            f"<div><span class='label'>Kept:</span><ol>{kept}</ol></div>"
        )
        image, name = _report_image(cfg, r, shards[i])
        cards.append(f'<div class="card">{_image_html(image)}<div class="file">{_esc(name)}</div>{body}</div>')
    metrics = {k: v for k, v in summary.items() if k not in ("skipped", "settings")}
    return _write_page(path, "CapFilt", metrics, cards)


def merge(cfg: CapfiltConfig, num_shards: int) -> str:
    """Read every shard file, write captions.json (caption JSON input), summary.json and report.html; returns the
    output's path (webdataset input: the brace spec of the output tars)."""
    records, shards, skipped, synthetic, images_in = [], [], [], [], 0
    for s in range(num_shards):
        part = read_json(shard_path(cfg.output_dir, s), "capfilt shard file")
        records += part["records"]
        shards += [s] * len(part["records"])
        skipped += part["skipped"]
        synthetic += [x for scores in part["synthetic_scores"] for x in scores]
        images_in += part["images"]
    out = Path(cfg.output_dir)
    if cfg.shards:
        output = str(out / SHARDS_DIR / f"{{{0:05d}..{num_shards - 1:05d}}}.tar")
    else:
        output = str(write_json(out / CAPTIONS_NAME, records))
    web_kept = sum("web" in r["capfilt"]["sources"] for r in records)
    kept_sources = [s for r in records for s in r["capfilt"]["sources"]]
    summary = {
        "images_in": images_in,
        "images_out": len(records),
        "images_skipped": len(skipped),
        "web_caption_kept": web_kept,
        "web_caption_kept_fraction": round(web_kept / len(records), 6) if records else None,
        "kept_from": {src: kept_sources.count(src) for src in ("web", "synthetic")},
        "scores": {
            "web": quantiles([s for r in records for s in r["capfilt"]["web_scores"]]),
            "synthetic": quantiles(synthetic),
            "kept": quantiles([s for r in records for s in r["capfilt"]["scores"]]),
        },
        "output": os.path.relpath(output, out),
        "image_root": cfg.image_root,
        "skipped": skipped,
        "settings": settings(cfg),
    }
    write_json(out / SUMMARY_NAME, summary)
    _report(out / REPORT_NAME, cfg, records, shards, summary)
    return output
