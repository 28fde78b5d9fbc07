"""The one reader of tensors from a weights file or folder; every loader in `qformer` reads through it.

    x.safetensors                   read lazily: headers first, then only the tensors asked for
    x.safetensors.index.json        a sharded safetensors checkpoint; its shards lie beside it
    anything else (.pth, .pt, .bin) torch.load(weights_only=True); LAVIS's {"model": ...} and timm's
                                    {"state_dict": ...} wrappers are unwrapped
    a folder                        the first of WEIGHT_FILES it holds (the transformers layout)

What the caller does with the names (prefixes, renaming, strict checks) stays with the caller. Every failure is one
line naming the file: FileNotFoundError for what is not there, `CheckpointError` for what cannot be read.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from qformer.convert import CheckpointError

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin")
INDEX_SUFFIX = ".safetensors.index.json"
_WRAPPERS = ("model", "state_dict")  # LAVIS checkpoints, timm training checkpoints


def _first_line(err: BaseException) -> str:
    # torch's and safetensors' messages can run to many lines (weights_only advice): one line is enough to act on.
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


class TensorFile:
    """The tensors of one weights file or folder: their names without reading them, then the ones wanted.

    safetensors (single or sharded) are read lazily; a torch pickle has to be read whole when opened.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = _resolve(Path(path))
        self._state: dict[str, Tensor] | None = None  # torch files: read whole
        self._shards: dict[Path, list[str]] = {}  # safetensors: file -> the keys it holds
        if self.path.name.endswith(INDEX_SUFFIX):
            self._shards = _index_shards(self.path)
        elif self.path.suffix == ".safetensors":
            self._shards = {self.path: _safetensors_keys(self.path)}
        else:
            self._state = _read_torch(self.path)

    def keys(self) -> list[str]:
        if self._state is not None:
            return list(self._state)
        return [k for keys in self._shards.values() for k in keys]

    def read(self, want: Callable[[str], bool] | None = None) -> dict[str, Tensor]:
        """Every tensor, or those whose name `want` accepts (only those are read from safetensors)."""
        if self._state is not None:
            return {k: v for k, v in self._state.items() if want is None or want(k)}
        from safetensors import safe_open

        out: dict[str, Tensor] = {}
        for file, keys in self._shards.items():
            wanted = [k for k in keys if want is None or want(k)]
            if not wanted:
                continue
            try:
                with safe_open(file, framework="pt") as f:
                    out.update({k: f.get_tensor(k) for k in wanted})
            except Exception as err:  # safetensors raises its own error types for damaged data
                raise _unreadable_safetensors(file, err) from err
        return out


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a weights file or folder (see the module docstring for the formats)."""
    return TensorFile(path).read()


def _resolve(path: Path) -> Path:
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: no weights ({' / '.join(WEIGHT_FILES)}) in this folder")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file or folder")
    return path


def _unreadable_safetensors(path: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(f"{path}: cannot read it as safetensors ({_first_line(err)}); truncated or corrupt")


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except Exception as err:  # bad headers and short files: several error types
        raise _unreadable_safetensors(path, err) from err


def _index_shards(index: Path) -> dict[Path, list[str]]:
    """The shards of a safetensors index and their keys; a shard lacking a key the index puts there is an error."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        by_shard: dict[str, set[str]] = {}
        for key, shard in weight_map.items():
            by_shard.setdefault(shard, set()).add(key)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map'): {_first_line(err)}") from err
    shards: dict[Path, list[str]] = {}
    for shard in sorted(by_shard):
        path = index.parent / shard
        keys = _safetensors_keys(path)
        absent = sorted(by_shard[shard] - set(keys))
        if absent:
            raise CheckpointError(f"{path}: lacks {len(absent)} key(s) {index.name} puts there: {', '.join(absent)}")
        shards[path] = keys
    return shards


def _read_torch(path: Path) -> dict[str, Tensor]:
    try:
        # Memory-mapped where the format allows (zip files): a multi-GB encoder file is not copied into memory.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # truncated zip, bad pickle, a pickle of more than tensors: many failure types
        lines = str(err).splitlines()
        if lines and lines[0].startswith("Weights only load failed"):
            # The one line that names what the pickle holds besides tensors (e.g. an argparse.Namespace).
            detail = next((x.strip() for x in lines if "WeightsUnpickler error" in x), lines[0])
            raise CheckpointError(
                f"{path}: holds more than tensors, which weights-only loading refuses ({detail})"
            ) from err
        raise CheckpointError(
            f"{path}: cannot read it as a torch checkpoint ({_first_line(err)}); truncated or corrupt"
        ) from err
    for wrapper in _WRAPPERS:
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors (nor {{'model': ...}} / {{'state_dict': ...}})")
    return dict(obj)


__all__ = ["INDEX_SUFFIX", "WEIGHT_FILES", "TensorFile", "read_state_dict"]
