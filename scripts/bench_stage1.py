"""Benchmark one stage-1 training step (frozen ViT + Q-Former, ITC + ITM + ITG, backward, AdamW) at paper size.

Prints images/s, peak memory (GPU: allocator peak; CPU: process peak RSS) and, on a GPU, model-FLOPs
utilisation against the card's dense bf16 peak. Also prints the ITM negative-image traffic per rank of the
reference (every rank's full token maps, all-gathered with gradient) and of ours (only the drawn rows).

    python scripts/bench_stage1.py --batch 2 --steps 2                 # CPU here (fp32, random weights)
    python scripts/bench_stage1.py --device cuda --batch 100 --dtype bf16 --peak-tflops 989
    python scripts/bench_stage1.py --no-vit --batch 8 --steps 5      # the trainable step alone (fixed image tokens)
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import time

import torch

from qformer.blip2 import Blip2Stage1
from qformer.config import Blip2Config
from qformer.cpu_malloc import keep_freed_memory
from qformer.dtypes import DTYPES
from qformer.flops import stage1_train_flops, vision_tokens
from tasks.stage1 import stage1_losses


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper", help="BLIP-2 preset: paper (EVA ViT-g), paper_vitl, tiny")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="autocast dtype and frozen ViT precision")
    p.add_argument(
        "--peak-tflops", type=float, default=0.0, help="the device's dense peak, for MFU (0: tasks.throughput's table)"
    )
    p.add_argument(
        "--no-vit",
        action="store_true",
        help="leave the frozen ViT out: fixed random image tokens into ln_vision (the trainable step alone)",
    )
    p.add_argument("--world", type=int, default=16, help="world size for the ITM traffic estimate")
    p.add_argument("--world-batch", type=int, default=100, help="per-GPU batch for the ITM traffic estimate")
    return p


def run(args: argparse.Namespace) -> dict:
    """Prints the report; returns step_ms, samples_per_s, tflops_per_s, mfu (None without a peak), peak_gib."""
    from tasks.throughput import device_peak_tflops

    if args.device == "cpu":
        keep_freed_memory()  # as the trainer does on a CPU (qformer.cpu_malloc)
    cfg = Blip2Config.preset(args.preset)
    vision = dataclasses.replace(cfg.vision, precision=args.dtype if args.device != "cpu" else "fp32")
    cfg = dataclasses.replace(cfg, vision=vision)
    torch.manual_seed(0)
    model = Blip2Stage1(cfg, build_visual=not args.no_vit).to(args.device)
    model.train()
    n_tokens = vision_tokens(cfg.vision)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.98), weight_decay=0.05)
    vocab = cfg.qformer.vocab_size
    if args.no_vit:
        inputs = {"image_tokens": torch.randn(args.batch, n_tokens, cfg.qformer.encoder_width, device=args.device)}
    else:
        size = cfg.vision.image_size
        inputs = {"images": torch.randn(args.batch, 3, size, size, device=args.device)}
    ids = torch.randint(1000 % vocab, vocab - 1, (args.batch, args.text_len), device=args.device)
    mask = torch.ones_like(ids)
    dtype = DTYPES[args.dtype]
    autocast = torch.autocast(args.device, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> dict:
        with autocast:
            losses = stage1_losses(model, ids, mask, **inputs, bos_token_id=vocab - 1)
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return losses

    times = []
    for i in range(args.warmup + args.steps):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses = step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    median = sorted(times)[len(times) // 2]
    n_trainable = sum(p.numel() for p in trainable)
    n_frozen = 0 if args.no_vit else sum(p.numel() for p in model.visual.parameters())
    vit = "no ViT (fixed image tokens)" if args.no_vit else f"ViT {n_frozen / 1e6:.0f}M frozen"
    print(
        f"stage 1, {args.preset}: {vit} + {n_trainable / 1e6:.1f}M trainable, "
        f"batch {args.batch}, text {args.text_len}, {args.device}, {args.dtype}, threads {torch.get_num_threads()}"
    )
    print(f"step {median * 1e3:.0f} ms (median of {len(times)}), {args.batch / median:.2f} images/s")
    print("losses: " + ", ".join(f"{k} {v.item():.3f}" for k, v in losses.items()))
    step_flops = stage1_train_flops(cfg, args.text_len, global_batch=args.batch)  # qformer.flops
    flops = (step_flops.total - (step_flops.parts["vit"] if args.no_vit else 0)) * args.batch
    tflops = flops / median / 1e12
    peak = device_peak_tflops(torch.device(args.device), args.peak_tflops or None)
    result = {"step_ms": median * 1e3, "samples_per_s": args.batch / median, "tflops_per_s": tflops}
    result["mfu"] = tflops / peak if peak else None
    print(f"model FLOPs/step {flops / 1e12:.3g} T, achieved {tflops:.3g} TFLOP/s", end="")
    print(f", MFU {result['mfu']:.1%}" if peak else "")
    if args.device == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"peak GPU memory: {result['peak_gib']:.2f} GiB")
    else:
        result["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"peak process memory (RSS): {result['peak_gib']:.2f} GiB")

    # ITM negative images: what one rank receives per step (fp32 ln_vision outputs, as in the reference).
    w, b = args.world, args.world_batch
    row = n_tokens * cfg.qformer.encoder_width * 4
    print(
        f"ITM negative-image traffic per rank at world {w} x batch {b}: reference all-gather "
        f"{(w - 1) * b * row / 2**30:.2f} GiB (+ the same again in backward); ours about "
        f"{b * (w - 1) / w * row / 2**30:.3f} GiB (only the {b} drawn rows, most from other ranks)"
    )
    return result


def main(argv: list[str] | None = None) -> dict:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
