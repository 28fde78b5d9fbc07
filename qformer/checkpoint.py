"""Our own checkpoints: a folder of `config.json` + `model.safetensors` (read with `qformer.tensor_files`).

The frozen LLM is never copied into a checkpoint: the config names its folder and loading rebuilds it from
there. The frozen image encoder is copied only when the config names no weights file to rebuild it from.

The paths a checkpoint's config names (`vision.weights`, `llm.path`) still resolve when things move. A path given
relative (to the folder training ran in) is stored relative to the checkpoint folder; an absolute one stays absolute.
Both forms of each are kept beside the config (`PATHS_KEY`: {field: {"relative": ..., "absolute": ...}}), and loading
tries, in order: the path relative to the checkpoint folder (a run folder moved or copied whole, the weights inside
it), the absolute path (a checkpoint moved away from weights that stayed put), the path as written (checkpoints
written before, whose relative paths were relative to the folder training ran in).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from qformer.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from qformer.convert import CheckpointError, check_state_dict
from qformer.tensor_files import read_state_dict

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
LLM_DIR = "llm"  # relative paths in a checkpoint's config resolve against the checkpoint folder
PATHS_KEY = "paths"  # config.json: where each local path of the config was at save time (see the module docstring)


def config_to_dict(cfg: Blip2Config) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(values: dict) -> Blip2Config:
    """Rebuild a `Blip2Config`; an unknown key anywhere is an error naming it."""
    parts = {"vision": VisionConfig, "qformer": QFormerConfig, "llm": LLMConfig}
    top = {f.name for f in dataclasses.fields(Blip2Config)}
    unknown = sorted(set(values) - top)
    if unknown:
        raise ValueError(f"unknown Blip2Config key(s): {', '.join(unknown)}")
    kwargs = dict(values)
    if isinstance(kwargs.get("llm"), dict) and "t5_dense_act_fn" not in kwargs["llm"]:
        # Written before the field existed: that model ran its LLM with the folder's own activation, so keep it
        # (the field's default, "gelu", would change a T5 checkpoint's outputs).
        kwargs["llm"] = {**kwargs["llm"], "t5_dense_act_fn": None}
    for name, cls in parts.items():
        if name in kwargs:
            fields = {f.name for f in dataclasses.fields(cls)}
            bad = sorted(set(kwargs[name]) - fields)
            if bad:
                raise ValueError(f"unknown {cls.__name__} key(s) under {name!r}: {', '.join(bad)}")
            kwargs[name] = cls(**kwargs[name])
    return Blip2Config(**kwargs)


def save_pretrained(model: nn.Module, folder: str | Path, *, tokenizer=None) -> Path:
    """Write `model` (Blip2Stage1 or Blip2Stage2) to `folder`; a tokenizer (the BERT one, for stage-1 captioning)
    may travel in `folder/tokenizer`. Written to a temporary name first, so a crash never leaves half a file."""
    from qformer.blip2 import Blip2Stage1

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stage = "stage1" if isinstance(model, Blip2Stage1) else "stage2"
    cfg, paths = _portable_paths(model.cfg, folder)
    skip = ["llm."]
    if model.visual is not None and cfg.vision.frozen and cfg.vision.weights:
        skip.append("visual.")  # rebuilt from cfg.vision.weights
    if stage == "stage2" and not cfg.llm.path:
        # The LLM came out of another checkpoint (e.g. a transformers BLIP-2 folder): give it a folder of its own.
        model.llm.save_pretrained(folder / LLM_DIR)
        model.tokenizer.save_pretrained(folder / LLM_DIR)
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, path=LLM_DIR))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith(tuple(skip))}
    tmp = folder / (WEIGHTS_NAME + ".tmp")
    save_file(state, tmp, metadata={"format": "pt", "stage": stage})
    tmp.replace(folder / WEIGHTS_NAME)
    meta = {"stage": stage, "config": config_to_dict(cfg), PATHS_KEY: paths}
    (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "qformer_tokenizer", None)  # instruct stage 2
    if tokenizer is not None:
        tokenizer.save_pretrained(folder / TOKENIZER_DIR)
    logger.info("saved %s (%d tensors; left out: %s) to %s", stage, len(state), ", ".join(skip), folder)
    return folder


def load_pretrained(folder: str | Path, **llm_overrides) -> nn.Module:
    """A Blip2Stage1 or Blip2Stage2 from a folder written by `save_pretrained`, loaded strictly.

    llm_overrides: LLMConfig fields to change (e.g. path= when the LLM folder has moved).
    """
    from qformer.blip2 import Blip2Stage1
    from qformer.stage2 import Blip2Stage2

    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in checkpoint folder {folder}")
    try:
        meta = json.loads(config_path.read_text())
        stage, cfg = meta["stage"], config_from_dict(meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{config_path}: not a qformer checkpoint config ({e})") from e
    paths = meta.get(PATHS_KEY) or {}
    if not isinstance(paths, dict) or not all(isinstance(v, dict) for v in paths.values()):
        raise CheckpointError(f"{config_path}: {PATHS_KEY} must map fields to their paths, got {paths!r}")
    if "path" in llm_overrides:
        paths = {k: v for k, v in paths.items() if k != "llm.path"}  # the stored path no longer applies
    if llm_overrides:
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, **llm_overrides))
    cfg = _resolve_paths(cfg, folder, paths, config_path)
    state = read_state_dict(folder / WEIGHTS_NAME)
    if stage == "stage1":
        model = Blip2Stage1(cfg)
    elif stage == "stage2":
        model = Blip2Stage2(cfg, qformer_tokenizer=load_tokenizer_from(folder) if cfg.llm.qformer_instruction else None)
    else:
        raise CheckpointError(f"{config_path}: unknown stage {stage!r}")
    # The frozen LLM, and the image encoder when its own weights file rebuilds it, are not in the file.
    may_lack = ("llm.", "visual.") if cfg.vision.weights else ("llm.",)
    check_state_dict(model, state, source=str(folder / WEIGHTS_NAME), allowed_missing=may_lack)
    model.load_state_dict(state, strict=False)  # strictness checked above; frozen parts came from their files
    return model.eval()


def _portable_paths(cfg: Blip2Config, folder: Path) -> tuple[Blip2Config, dict[str, dict[str, str]]]:
    """`cfg` with its relative local paths rewritten relative to `folder` (absolute ones normalised), and both forms
    of each by field. Paths that name nothing on disk (a hub name for the LLM) stay as written."""
    home = os.path.abspath(folder)
    stored, paths = {}, {}
    for field, value in (("vision.weights", cfg.vision.weights), ("llm.path", cfg.llm.path)):
        if not value or not Path(value).exists():
            continue
        absolute = os.path.abspath(value)  # abspath, not resolve: a symlinked cache keeps its own name
        try:
            relative = os.path.relpath(absolute, home)
        except ValueError:  # another drive (Windows): only the absolute path can name it
            relative = absolute
        paths[field] = {"relative": relative, "absolute": absolute}
        stored[field] = absolute if Path(value).is_absolute() else relative
    return _with_paths(cfg, stored), paths


def _resolve_paths(cfg: Blip2Config, folder: Path, paths: dict[str, dict], config_path: Path) -> Blip2Config:
    """`cfg` with `vision.weights` and `llm.path` turned into paths that exist from here (see the module docstring).

    A path that was local at save time and is found nowhere now is an error naming what was tried; any other path
    (a hub name for the LLM) is left as written.
    """
    resolved = {}
    for field, value in (("vision.weights", cfg.vision.weights), ("llm.path", cfg.llm.path)):
        if not value:
            continue
        saved = paths.get(field, {})
        relative = saved.get("relative") or (None if Path(value).is_absolute() else value)
        tried = [folder / relative] if relative else []
        tried += [Path(p) for p in (saved.get("absolute"), value) if p]
        found = next((p for p in tried if p.exists()), None)
        if found is not None:
            resolved[field] = str(found)
        elif saved:
            looked = ", ".join(dict.fromkeys(str(p) for p in tried))
            raise FileNotFoundError(
                f"{config_path}: {field} {value!r} is not there any more (looked at {looked}); move it back, or "
                f"edit {field} in {config_path}"
            )
    return _with_paths(cfg, resolved)


def _with_paths(cfg: Blip2Config, paths: dict[str, str]) -> Blip2Config:
    vision, llm = cfg.vision, cfg.llm
    if "vision.weights" in paths:
        vision = dataclasses.replace(vision, weights=paths["vision.weights"])
    if "llm.path" in paths:
        llm = dataclasses.replace(llm, path=paths["llm.path"])
    return dataclasses.replace(cfg, vision=vision, llm=llm)


def load_tokenizer_from(folder: str | Path):
    """The tokenizer saved beside a stage-1 checkpoint (with `[DEC]`), or None."""
    path = Path(folder) / TOKENIZER_DIR
    if not path.is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
