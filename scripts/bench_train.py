"""Benchmark the real training step of a run config: samples/s and peak memory, on synthetic batches.

    python scripts/bench_train.py configs/tiny/stage1_vitg.yaml        # CPU here (QFORMER_TINY=... assets)
    python scripts/bench_train.py configs/stage1_vitg.yaml --device cuda data.batch_size=100
    python scripts/bench_train.py configs/stage2_opt2.7b.yaml --device cuda init_from=''

Builds the model exactly as `tasks.train` does (frozen parts, DDP-less TrainStep, AdamW groups, autocast) and
times `--steps` optimizer steps after `--warmup`, on random images and captions drawn from the data's words.
"""

from __future__ import annotations

import argparse
import random
import resource
import time

import torch

from qformer.dtypes import to_dtype
from tasks.config import load_config
from tasks.optim import param_groups
from tasks.train import TrainStep, build_model, build_objective, freeze_redundant

WORDS = "a photo of the red green blue square bar on black background".split()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    return p


def run(args: argparse.Namespace) -> dict:
    """Prints the report; returns what `time_steps` does."""
    cfg = load_config(args.config, ["output_dir=/tmp/bench_train", *args.overrides])
    torch.manual_seed(0)
    model, tokenizer = build_model(cfg)
    return time_steps(model, tokenizer, cfg, torch.device(args.device), args.steps, args.warmup, name=args.config)


def time_steps(model, tokenizer, cfg, device: torch.device, steps: int, warmup: int, name: str = "") -> dict:
    """Time `steps` optimizer steps of `model` (built as tasks.train builds it, for the TrainConfig `cfg`) after
    `warmup`; prints and returns step_ms, samples_per_s, tflops_per_s, mfu (None without a known peak), peak_gib."""
    from tasks.throughput import device_peak_tflops, train_flops_per_sample

    model.to(device).train()
    freeze_redundant(model)
    if cfg.vit_grad_checkpointing and model.visual is not None and not cfg.model.vision.frozen:
        model.visual.model.set_grad_checkpointing(True)
    step = TrainStep(model, build_objective(cfg, model, tokenizer))
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=1e-5, betas=(cfg.optim.beta1, cfg.optim.beta2))
    dtype = to_dtype(cfg.precision)
    b, size = cfg.data.batch_size, cfg.model.vision.image_size
    rng = random.Random(0)

    def batch() -> dict:
        return {
            "image": torch.randn(b, 3, size, size, device=device),
            "text_input": [" ".join(rng.choices(WORDS, k=rng.randint(4, 12))) for _ in range(b)],
            "image_id": torch.arange(b),
        }

    times = []
    for i in range(warmup + steps):
        data = batch()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = step(data)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    median = sorted(times)[len(times) // 2]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    print(
        f"{name}: {cfg.stage}, {trainable / 1e6:.1f}M trainable + {frozen / 1e6:.1f}M frozen, batch {b}, "
        f"{size} px, {cfg.precision}, {device}"
    )
    print(f"step {median * 1e3:.1f} ms (median of {len(times)}), {b / median:.1f} samples/s, loss {loss.item():.3f}")
    flops = train_flops_per_sample(cfg, model)
    peak = device_peak_tflops(device, cfg.peak_tflops)
    tflops = flops.total * b / median / 1e12
    result = {"step_ms": median * 1e3, "samples_per_s": b / median, "tflops_per_s": tflops}
    result["mfu"] = tflops / peak if peak else None
    print(f"model FLOPs per sample: {flops.describe()}; {tflops:.3g} TFLOP/s", end="")
    print(f", MFU {result['mfu']:.1%}" if peak else "")
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"peak GPU memory {result['peak_gib']:.2f} GiB")
    else:
        result["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"peak process memory (RSS) {result['peak_gib']:.2f} GiB")
    return result


def main(argv: list[str] | None = None) -> dict:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
