"""Throughput figures of a training run: samples/s per rank and in total, model TFLOP/s per rank, and MFU.

The model FLOPs per sample come from `qformer.flops` for the run's config (training convention there: trainable
parts 3x forward, frozen ViT 1x, frozen stage-2 LLM 2x), with texts assumed `max_text_length` tokens long (batches
pad to their longest caption, so this is an upper bound when captions are shorter). MFU is TFLOP/s per rank over
the accelerator's dense bf16 peak: from `peak_tflops` in the run config when set (any device, CPU included), else
from `PEAK_BF16_TFLOPS` by the CUDA device's name; without a peak the record has no `mfu`.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import torch
from torch import nn

from qformer.flops import StepFlops, llm_shape, stage1_train_flops, stage2_train_flops

logger = logging.getLogger(__name__)

# Dense bf16 TFLOP/s (no sparsity), matched in this order as a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
)


def device_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The peak MFU is measured against: `override` if set, else the table's entry for a CUDA device (None for an
    unknown GPU, with a warning, and for any other device)."""
    if override is not None:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return peak
    logger.warning("no dense bf16 peak known for %r: set peak_tflops in the run config to log mfu", name)
    return None


def device_name(device: torch.device | str) -> str:
    """What a benchmark ran on: the CUDA device's name, or the CPU's model name (from /proc/cpuinfo on Linux, where
    `platform.processor()` is empty or only the architecture)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or device.type


def train_flops_per_sample(cfg, model: nn.Module, world: int = 1) -> StepFlops:
    """Training FLOPs per sample of the run `cfg` (a `tasks.config.TrainConfig`) with its built `model` (stage 2
    reads the LLM's shape from `model.llm.config`)."""
    m = cfg.model
    if cfg.stage == "stage1":
        return stage1_train_flops(m, m.max_text_length, global_batch=cfg.data.batch_size * world, world_size=world)
    llm = llm_shape(model.llm.config)
    text = m.llm.max_text_length
    instruction = m.llm.max_instruction_length if m.llm.qformer_instruction else 0
    return stage2_train_flops(m, llm, text, decoder_text=text if llm.is_encoder_decoder else 0, instruction=instruction)


def throughput_fields(
    samples: int, seconds: float, world: int, flops_per_sample: float, peak_tflops: float | None
) -> dict[str, float]:
    """The log fields of a window in which this rank trained `samples` samples in `seconds`."""
    per_rank = samples / max(seconds, 1e-9)
    tflops = flops_per_sample * per_rank / 1e12
    fields = {"samples_per_s": per_rank, "samples_per_s_total": per_rank * world, "tflops_per_s": tflops}
    if peak_tflops:
        fields["mfu"] = tflops / peak_tflops
    return fields
