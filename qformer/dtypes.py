"""The precision names configs use ("fp32", "fp16", "bf16") and their torch dtypes: the one map every part reads."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def to_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a precision name (a torch dtype passes through); a one-line error names the choices."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name}")
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: str | torch.dtype) -> str:
    """The precision name of a dtype or name ("fp16" for torch.float16)."""
    return {v: k for k, v in DTYPES.items()}[to_dtype(dtype)]


def autocast_dtype(name: str) -> torch.dtype | None:
    """The dtype to autocast to for a precision, None for fp32 (no autocast)."""
    dtype = to_dtype(name)
    return None if dtype == torch.float32 else dtype
