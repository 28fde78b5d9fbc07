"""The CapFilt run: the input cut into shards, each shard captioned, ranked and written on its own.

Shards: caption JSON entries (the files of `ann_paths` concatenated, in order) are cut into shards of `shard_size`;
webdataset input keeps its own tar shards. Rank r of W takes shards r, r + W, ... (`tasks.dist.shard_indices`). A
finished shard is `shards/NNNNN.json` (its records, skipped images and scores), written atomically
(`tasks.evals.common.write_json`) after the shard's output tar (webdataset input: `shards/NNNNN.tar`, written to a
temporary name, then renamed; members dated 0, so a re-run writes the same bytes). A restart skips every shard whose
json exists, so no image is done twice or lost; a shard written with other settings is an error, not a silent mix.
Shard s samples from torch seeded with `seed_int(seed, s)` right before its first batch, so its captions do not
depend on which rank, which run or what came before it. When every rank is done, rank 0 merges the shards
(`tasks.capfilt.report`).

`QFORMER_TEST_CAPFILT_CRASH_AFTER_SHARDS=N` (tests only) SIGKILLs the process after it has written N shards.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm
from webdataset import tariterators

from qformer.dist import get_rank, get_world_size
from tasks.capfilt.config import CapfiltConfig
from tasks.capfilt.ranking import ItcRanker, Ranker, build_ranker, keep_top_k
from tasks.data.captions import decode_image, load_image, read_json, set_max_image_pixels
from tasks.data.text import clean_caption, has_words
from tasks.data.webdata import IMAGE_EXTENSIONS, _is_truncated_local_tar, expand_shards, seed_int
from tasks.dist import on_rank0, run_sharded, setup_distributed, shard_indices, teardown_distributed
from tasks.evals.common import autocast, write_json

logger = logging.getLogger(__name__)

__all__ = ["CRASH_AFTER_SHARDS_ENV", "SHARDS_DIR", "capfilt", "read_entries", "settings", "shard_path"]

CRASH_AFTER_SHARDS_ENV = "QFORMER_TEST_CAPFILT_CRASH_AFTER_SHARDS"
SHARDS_DIR = "shards"
# The config keys that change what a shard file holds; a shard written under other values is refused on restart.
_OUTPUT_KEYS = (
    "ann_paths image_root shard_size shards caption_from captioner prompt num_captions top_p top_k temperature "
    "max_new_tokens min_new_tokens ranker ranker_checkpoint open_clip_model keep max_words batch_size precision "
    "max_image_pixels seed"
).split()


def settings(cfg: CapfiltConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if k in _OUTPUT_KEYS}


def shard_path(output_dir: str | os.PathLike, index: int, suffix: str = ".json") -> Path:
    return Path(output_dir) / SHARDS_DIR / f"{index:05d}{suffix}"


@dataclass
class _Item:
    """One input image: the entry its output starts from, its name in lists, its web caption(s), how to read it."""

    record: dict[str, Any]  # JSON input: the entry; webdataset input: the json member (or {}) and "key"
    name: str  # the image path under image_root, or url#key
    web: list[str]
    load: Callable[[], Image.Image] | None  # None: unusable, see reason
    reason: str = ""
    member: tuple[str, bytes] | None = None  # webdataset input: (extension, image bytes) for the output tar


def _json_items(cfg: CapfiltConfig, entries: list[dict]) -> list[_Item]:
    items = []
    for e in entries:
        web = [e["caption"]] if isinstance(e["caption"], str) else list(e["caption"])
        items.append(_Item(dict(e), e["image"], web, partial(load_image, os.path.join(cfg.image_root, e["image"]))))
    return items


def _web_captions(raw: dict[str, Any], meta: dict[str, Any], caption_from: list[str]) -> list[str]:
    """The web caption(s) of a tar sample, from the first of `caption_from` present (the training loader's rule)."""
    for source in caption_from:
        if source == "txt" and "txt" in raw:
            return [raw["txt"].decode("utf-8")]
        value = meta.get(source[len("json:") :]) if source.startswith("json:") else None
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    return []


def _web_items(cfg: CapfiltConfig, url: str) -> list[_Item]:
    """Every sample of one tar shard; what cannot be read is an unusable item naming url#key (or the url)."""
    errors: list[BaseException] = []
    items = []
    for raw in tariterators.tarfile_samples(iter([{"url": url}]), handler=lambda exn: errors.append(exn) or True):
        key = raw["__key__"]
        name = f"{url}#{key}"
        try:
            meta = json.loads(raw["json"]) if "json" in raw else {}
            meta = meta if isinstance(meta, dict) else {}
        except ValueError as e:
            items.append(_Item({"key": key}, name, [], None, f"json member is not valid JSON: {e}"))
            continue
        record, web = {**meta, "key": key}, _web_captions(raw, meta, cfg.caption_from)
        ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if ext is None:
            items.append(
                _Item(record, name, web, None, f"no image member (has {sorted(k for k in raw if k[0] != '_')})")
            )
        else:
            items.append(_Item(record, name, web, partial(decode_image, raw[ext], name), member=(ext, raw[ext])))
    for exn in errors:
        items.append(
            _Item({}, url, [], None, f"shard read error: {type(exn).__name__}: {exn.args[0] if exn.args else ''}")
        )
    if _is_truncated_local_tar(url):
        items.append(
            _Item({}, url, [], None, "shard is truncated (no end-of-archive blocks): samples after the cut are lost")
        )
    return items


def read_entries(ann_paths: list[str]) -> list[dict[str, Any]]:
    """Every entry of the caption JSON files, in order; an entry without an image path or a caption (a string or a
    list of strings) is an error naming `file[i]` (the training loader's rule)."""
    entries = []
    for path in ann_paths:
        data = read_json(path, "caption annotation file")
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of annotations, got {type(data).__name__}")
        for i, ann in enumerate(data):
            caption = ann.get("caption") if isinstance(ann, dict) else None
            captions = [caption] if isinstance(caption, str) else caption
            if not (isinstance(ann, dict) and isinstance(ann.get("image"), str) and ann["image"]) or not (
                isinstance(captions, list) and all(isinstance(c, str) for c in captions)
            ):
                raise ValueError(f"{path}[{i}]: need 'image' (a path) and 'caption' (a string or a list of strings)")
            entries.append(ann)
    return entries


class _ShardImages(Dataset):
    """`(position, [one tensor per transform] or None, reason)`: an image that cannot be read is reported, not
    raised, so that it is skipped and listed."""

    def __init__(self, items: list[_Item], transforms: list) -> None:
        self.loads, self.reasons, self.transforms = [i.load for i in items], [i.reason for i in items], transforms

    def __len__(self) -> int:
        return len(self.loads)

    def __getitem__(self, i: int) -> tuple[int, list[torch.Tensor] | None, str]:
        if self.loads[i] is None:
            return i, None, self.reasons[i]
        try:
            image = self.loads[i]()
            return i, [t(image) for t in self.transforms], ""
        except Exception as e:  # missing, truncated, corrupt, too large: skipped and listed
            return i, None, f"{type(e).__name__}: {e}"


class _Captioner:
    """N sampled captions per image from one of our checkpoints (stage 1: the Q-Former's LM; stage 2: the LLM)."""

    def __init__(self, cfg: CapfiltConfig, device: torch.device) -> None:
        from qformer.blip2 import Blip2Stage1
        from qformer.caption import GenerationConfig
        from qformer.checkpoint import load_pretrained, load_tokenizer_from
        from tasks.data.transforms import eval_transform

        self.model = load_pretrained(cfg.captioner).to(device).eval()
        self.stage1 = isinstance(self.model, Blip2Stage1)
        self.tokenizer = load_tokenizer_from(cfg.captioner) if self.stage1 else None
        if self.stage1 and self.tokenizer is None:
            raise ValueError(f"{cfg.captioner} has no tokenizer/ folder: convert it with --bert BERT_FOLDER")
        self.gen = GenerationConfig(
            do_sample=True,
            num_beams=1,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens,
            min_new_tokens=min(cfg.min_new_tokens, cfg.max_new_tokens),
            num_return_sequences=cfg.num_captions,
        )
        self.prompt, self.device, self.precision = cfg.prompt, device, cfg.precision
        self.image_size = self.model.cfg.vision.image_size
        self.transform = eval_transform(self.image_size)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[str]:
        """`B * N` captions; rows b*N ... b*N+N-1 are image b's."""
        images = images.to(self.device)
        with autocast(self.device, self.precision):
            if self.stage1:
                return self.model.caption(images, self.tokenizer, self.gen)
            return self.model.generate(self.prompt, images=images, cfg=self.gen)


def _process_shard(
    cfg: CapfiltConfig, index: int, items: list[_Item], captioner: _Captioner, ranker: Ranker, bar: tqdm
) -> tuple[dict[str, Any], list[_Item]]:
    """(the shard's json: records, skipped, all synthetic scores; the items kept, in the records' order)."""
    same = isinstance(ranker, ItcRanker) and ranker.model.cfg.vision.image_size == captioner.image_size
    transforms = [captioner.transform] if same else [captioner.transform, ranker.transform]
    loader = DataLoader(
        _ShardImages(items, transforms),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=list,
        generator=torch.Generator(),  # the loader leaves torch's global generator (the sampling's) alone
    )
    batches = iter(loader)
    torch.manual_seed(seed_int(cfg.seed, index))
    records, kept_items, skipped, synthetic_scores = [], [], [], []
    n = cfg.num_captions
    for batch in batches:
        good = [(items[i], tensors) for i, tensors, _ in batch if tensors is not None]
        skipped += [{"image": items[i].name, "reason": reason} for i, tensors, reason in batch if tensors is None]
        bar.update(len(batch))
        if not good:
            continue
        synthetic = captioner(torch.stack([t[0] for _, t in good]))
        texts, owners, sources, counts = [], [], [], []
        for b, (item, _) in enumerate(good):
            # Cleaned as training cleans them; a caption with no words left (an empty sample) is no candidate.
            web = [clean_caption(c, cfg.max_words) for c in item.web if has_words(c)]
            syn = [clean_caption(c, cfg.max_words) for c in synthetic[b * n : (b + 1) * n] if has_words(c)]
            texts += web + syn
            owners += [b] * (len(web) + len(syn))
            sources += ["web"] * len(web) + ["synthetic"] * len(syn)
            counts.append((len(web), len(syn)))
        scores = ranker.scores(torch.stack([t[-1] for _, t in good]), texts, owners) if texts else []
        start = 0
        for (item, _), (n_web, n_syn) in zip(good, counts, strict=True):
            end = start + n_web + n_syn
            sc, tx, so = scores[start:end], texts[start:end], sources[start:end]
            start = end
            if not tx:
                skipped.append({"image": item.name, "reason": "no caption with words: no web caption, none generated"})
                continue
            kept = keep_top_k(sc, tx, so, cfg.keep)
            synthetic_scores.append(sc[n_web:])  # one list per record
            record = dict(item.record)
            record["caption"] = [k.caption for k in kept]
            if item.member is None:  # caption JSON: the training loader draws one of them per step
                record["sample_caption"] = True
            record["capfilt"] = {
                "scores": [k.score for k in kept],
                "sources": [k.source for k in kept],
                "web_caption": tx[:n_web],
                "web_scores": sc[:n_web],
            }
            records.append(record)
            kept_items.append(item)
    part = {"shard": index, "settings": settings(cfg), "images": len(items), "records": records, "skipped": skipped}
    return part | {"synthetic_scores": synthetic_scores}, kept_items


def _write_tar(path: Path, records: list[dict[str, Any]], items: list[_Item]) -> None:
    """The output shard of webdataset input: per image its bytes and a json member (the record less its key),
    written to a temporary name and renamed; members dated 0, so that the same records give the same bytes."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f, wds.TarWriter(f, mtime=0, encoder=False) as sink:
        for record, item in zip(records, items, strict=True):
            ext, data = item.member
            meta = {k: v for k, v in record.items() if k != "key"}
            sink.write({"__key__": record["key"], ext: data, "json": json.dumps(meta).encode("utf-8")})
    os.replace(tmp, path)


def _finished(cfg: CapfiltConfig, index: int) -> bool:
    path = shard_path(cfg.output_dir, index)
    if not path.is_file():
        return False
    written = read_json(path, "capfilt shard file").get("settings")
    if written != settings(cfg):
        differ = sorted(k for k in settings(cfg) if (written or {}).get(k) != settings(cfg)[k])
        raise ValueError(
            f"{path} was written with other settings ({', '.join(differ)}): use a new output_dir, or delete "
            f"{path.parent} to start over"
        )
    return True


def capfilt(cfg: CapfiltConfig) -> Path:
    """Run CapFilt on this rank's shards, then merge on rank 0; returns the merged output's path (caption JSON
    input: captions.json; webdataset input: the brace spec of the output shards)."""
    from tasks.capfilt.report import merge

    set_max_image_pixels(cfg.max_image_pixels)
    # Bad input stops every rank here, before any model loads.
    entries = read_entries(cfg.ann_paths) if cfg.ann_paths else []
    urls = expand_shards(cfg.shards) if cfg.shards else []
    for url in urls:
        if ":" not in url.split("/")[0] and not Path(url).is_file():
            raise FileNotFoundError(f"webdataset shard not found: {url}")
    num_shards = len(urls) if urls else -(-len(entries) // cfg.shard_size)

    def shard_items(s: int) -> list[_Item]:
        if urls:
            return _web_items(cfg, urls[s])
        return _json_items(cfg, entries[s * cfg.shard_size : (s + 1) * cfg.shard_size])

    device = setup_distributed()
    try:
        mine = [s for s in shard_indices(num_shards) if not _finished(cfg, s)]
        done = len(shard_indices(num_shards)) - len(mine)
        logger.info(
            "capfilt: %d shards; rank %d of %d: %d to do, %d already done",
            num_shards,
            get_rank(),
            get_world_size(),
            len(mine),
            done,
        )

        def work() -> dict[int, int]:
            if not mine:
                return {}
            captioner = _Captioner(cfg, device)
            ranker = build_ranker(cfg, captioner.model, device)
            crash_after = int(os.environ.get(CRASH_AFTER_SHARDS_ENV, "0"))
            total = None if urls else sum(min(cfg.shard_size, len(entries) - s * cfg.shard_size) for s in mine)
            written = {}
            with tqdm(total=total, desc="capfilt", unit="img", disable=get_rank() != 0) as bar:
                for s in mine:
                    items = shard_items(s)
                    part, kept = _process_shard(cfg, s, items, captioner, ranker, bar)
                    if urls:
                        _write_tar(shard_path(cfg.output_dir, s, ".tar"), part["records"], kept)
                    write_json(shard_path(cfg.output_dir, s), part)  # last: the shard is done once this exists
                    written[s] = len(items)
                    if crash_after and len(written) >= crash_after:
                        os.kill(os.getpid(), signal.SIGKILL)
            return written

        run_sharded(work, "capfilt")  # also the barrier: every shard is on disk after it
        out = on_rank0(lambda: merge(cfg, num_shards), "capfilt merge", share=True)
    finally:
        teardown_distributed()
    return Path(out)
