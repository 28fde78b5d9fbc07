"""What every evaluator needs: reading inputs, the image dataset, precision, result files, merging by id.

read_json / write_json / write_text     inputs named in errors (tasks.data's reader); outputs whole or not at all
ImageFiles / image_batches              evaluation images in order; an unreadable or too large one stops the run
autocast / storage_dtype                the config's precision on a GPU (CPUs run fp32), via qformer.dtypes
generate_sharded / results_by_id        strided split across ranks, merged by id, checked complete, sorted
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from qformer.caption import GenerationConfig
from qformer.dist import get_rank, get_world_size
from qformer.dtypes import autocast_dtype, to_dtype
from tasks.data.captions import ImageTooLarge, load_image, read_json
from tasks.data.transforms import eval_transform
from tasks.dist import run_sharded, shard
from tasks.evals.config import EvalConfig

logger = logging.getLogger(__name__)

__all__ = [
    "METRICS_NAME",
    "REPORT_NAME",
    "RESULTS_NAME",
    "ImageFiles",
    "ImageReadError",
    "autocast",
    "generate_sharded",
    "generation_config",
    "image_batches",
    "read_json",
    "results_by_id",
    "sort_key",
    "storage_dtype",
    "warn_if_autocast_recasts_llm",
    "write_json",
    "write_text",
]

T = TypeVar("T")
V = TypeVar("V")
RESULTS_NAME = "results.json"
METRICS_NAME = "metrics.json"
REPORT_NAME = "report.html"


# -- files ----------------------------------------------------------------------------------------------------------


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` through a temporary file and `os.replace`, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """Write `obj` as JSON, atomically (see `write_text`)."""
    return write_text(path, json.dumps(obj, indent=indent))


# -- images ---------------------------------------------------------------------------------------------------------


class ImageReadError(OSError, ValueError):
    """An evaluation image is missing or cannot be decoded; the message names the file. A ValueError too, so
    the command line reports it as bad input."""


class ImageFiles(Dataset):
    """`(index, [3, S, S] eval-transformed image)` for each path; an unreadable file raises `ImageReadError`
    (evaluation never skips: a missing image would silently change the benchmark)."""

    def __init__(self, paths: Sequence[str], size: int) -> None:
        self.paths = list(paths)
        self.transform = eval_transform(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Tensor]:
        path = self.paths[index]
        try:
            image = load_image(path)
        except ImageTooLarge as e:  # its message names the image
            raise ImageReadError(f"evaluation image {e}") from e
        except FileNotFoundError as e:
            raise ImageReadError(f"evaluation image not found: {path}") from e
        except Exception as e:
            raise ImageReadError(f"cannot read evaluation image {path}: {type(e).__name__}: {e}") from e
        return index, self.transform(image)


def image_batches(
    paths: Sequence[str], size: int, batch_size: int, num_workers: int, device: torch.device, desc: str
) -> Iterator[tuple[list[int], Tensor]]:
    """Batches `(indices into paths, images [B, 3, size, size] on device)` in order, with a rank-0 progress bar."""
    loader = DataLoader(
        ImageFiles(paths, size),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    for indices, images in tqdm(loader, desc=desc, unit="batch", disable=get_rank() != 0):
        yield indices.tolist(), images.to(device, non_blocking=True)


# -- precision ------------------------------------------------------------------------------------------------------


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to `precision` (bf16 / fp16) on a GPU; CPUs (and fp32) run in full precision."""
    dtype = autocast_dtype(precision)
    if device.type != "cuda" or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def storage_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The dtype to keep large activations in: the precision's on a GPU, fp32 on a CPU (where compute is fp32)."""
    dtype = to_dtype(precision)
    return dtype if device.type == "cuda" else torch.float32


def warn_if_autocast_recasts_llm(model: torch.nn.Module, precision: str, device: torch.device) -> None:
    """Autocast also runs the frozen LLM's matmuls in its dtype: say so when that is not the LLM's own half
    precision (LAVIS autocasts OPT in fp16 and Flan-T5 in bf16)."""
    dtype = autocast_dtype(precision)
    llm_dtype = getattr(model, "llm_dtype", None)
    if (
        device.type == "cuda"
        and dtype is not None
        and llm_dtype in (torch.float16, torch.bfloat16)
        and llm_dtype != dtype
    ):
        logger.warning(
            "precision=%s autocasts the frozen LLM (%s weights) to %s; set precision to match the LLM",
            precision,
            llm_dtype,
            dtype,
        )


def generation_config(cfg: EvalConfig) -> GenerationConfig:
    """The decoding settings of a generation evaluation (VQA, captioning)."""
    return GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=cfg.min_new_tokens,
        num_beams=cfg.num_beams,
        length_penalty=cfg.length_penalty,
        repetition_penalty=cfg.repetition_penalty,
        do_sample=cfg.do_sample,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        temperature=cfg.temperature,
    )


# -- results --------------------------------------------------------------------------------------------------------


def sort_key(key: Hashable) -> tuple:
    """Order ids numerically when they are numbers (or digit strings, as GQA's), then as strings."""
    if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
        return (0, int(key), str(key))
    return (1, 0, str(key))


def generate_sharded(
    items: Sequence[T], work: Callable[[Sequence[T]], dict[Hashable, V]], what: str
) -> dict[Hashable, V]:
    """id -> result for every item: each rank runs `work` on its share (`tasks.dist.shard`), the ranks' results
    are merged by id (an id from two ranks is an error) and must cover every item. Call it on every rank."""
    mine = shard(items)
    logger.info("%s: rank %d of %d takes %d of %d items", what, get_rank(), get_world_size(), len(mine), len(items))
    merged = run_sharded(lambda: work(mine), what)
    if len(merged) != len(items):
        raise RuntimeError(f"{what}: {len(merged)} results for {len(items)} items after merging the ranks")
    return merged


def results_by_id(results: Mapping[Hashable, Any], id_key: str, value_key: str) -> list[dict[str, Any]]:
    """`[{id_key: id, value_key: result}]` sorted by id (`sort_key`): the official results files' format."""
    return [{id_key: i, value_key: results[i]} for i in sorted(results, key=sort_key)]
