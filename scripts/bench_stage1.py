"""Benchmark one stage-1 training step (frozen ViT + Q-Former, ITC + ITM + ITG, backward, AdamW) at paper size.

Prints images/s, peak memory (GPU: allocator peak; CPU: process peak RSS) and, on a GPU, model-FLOPs
utilisation against the card's dense bf16 peak. Also prints the ITM negative-image traffic per rank of the
reference (every rank's full token maps, all-gathered with gradient) and of ours (only the drawn rows).

    python scripts/bench_stage1.py --batch 2 --steps 2                 # CPU here (fp32, random weights)
    python scripts/bench_stage1.py --device cuda --batch 100 --dtype bf16 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import time

import torch

from qformer.blip2 import Blip2Stage1
from qformer.config import Blip2Config
from qformer.dtypes import DTYPES
from tasks.stage1 import stage1_losses


def stage1_flops(model: Blip2Stage1, batch: int, text_len: int) -> float:
    """Model FLOPs of one step: 2*params*tokens forward (x3 with backward for trainable parts).

    The ViT is frozen: forward only. Q-Former passes: queries (ITC), text (ITC), joint 3B (ITM), text decode
    (ITG); cross-attention reads the N image tokens in the query and ITM passes.
    """
    cfg = model.cfg
    vit = sum(p.numel() for p in model.visual.parameters())
    n_img = model.visual.num_tokens()
    q = cfg.qformer.num_query_tokens
    layer = 12 * cfg.qformer.hidden_size**2  # self-attention + FFN per token, multiply-adds x 2 below
    cross = 2 * cfg.qformer.encoder_width * cfg.qformer.hidden_size  # image K/V per image token and cross layer
    n_cross = sum(cfg.qformer.has_cross_attention(i) for i in range(cfg.qformer.num_layers))
    tokens = batch * q + batch * text_len + 3 * batch * (q + text_len) + batch * text_len
    qformer = 2 * tokens * layer * cfg.qformer.num_layers + 2 * 4 * batch * n_img * cross * n_cross
    return 2 * vit * batch * n_img + 3 * qformer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper", help="BLIP-2 preset: paper (EVA ViT-g), paper_vitl, tiny")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="autocast dtype and frozen ViT precision")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the device's dense peak, for MFU (GPU)")
    p.add_argument("--world", type=int, default=16, help="world size for the ITM traffic estimate")
    p.add_argument("--world-batch", type=int, default=100, help="per-GPU batch for the ITM traffic estimate")
    args = p.parse_args()

    cfg = Blip2Config.preset(args.preset)
    vision = dataclasses.replace(cfg.vision, precision=args.dtype if args.device != "cpu" else "fp32")
    cfg = dataclasses.replace(cfg, vision=vision)
    torch.manual_seed(0)
    model = Blip2Stage1(cfg).to(args.device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.98), weight_decay=0.05)
    vocab = cfg.qformer.vocab_size
    images = torch.randn(args.batch, 3, cfg.vision.image_size, cfg.vision.image_size, device=args.device)
    ids = torch.randint(1000 % vocab, vocab - 1, (args.batch, args.text_len), device=args.device)
    mask = torch.ones_like(ids)
    dtype = DTYPES[args.dtype]
    autocast = torch.autocast(args.device, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> dict:
        with autocast:
            losses = stage1_losses(model, ids, mask, images=images, bos_token_id=vocab - 1)
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
    n_frozen = sum(p.numel() for p in model.visual.parameters())
    print(
        f"stage 1, {args.preset}: ViT {n_frozen / 1e6:.0f}M frozen + {n_trainable / 1e6:.1f}M trainable, "
        f"batch {args.batch}, text {args.text_len}, {args.device}, {args.dtype}, threads {torch.get_num_threads()}"
    )
    print(f"step {median * 1e3:.0f} ms (median of {len(times)}), {args.batch / median:.2f} images/s")
    print("losses: " + ", ".join(f"{k} {v.item():.3f}" for k, v in losses.items()))
    if args.device == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        flops = stage1_flops(model, args.batch, args.text_len)
        print(f"model FLOPs/step {flops / 1e12:.2f} T, achieved {flops / median / 1e12:.1f} TFLOP/s", end="")
        print(f", MFU {flops / median / 1e12 / args.peak_tflops:.1%}" if args.peak_tflops else "")
    else:
        print(f"peak process memory (RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")

    # ITM negative images: what one rank receives per step (fp32 ln_vision outputs, as in the reference).
    w, b = args.world, args.world_batch
    row = model.visual.num_tokens() * cfg.qformer.encoder_width * 4
    print(
        f"ITM negative-image traffic per rank at world {w} x batch {b}: reference all-gather "
        f"{(w - 1) * b * row / 2**30:.2f} GiB (+ the same again in backward); ours about "
        f"{b * (w - 1) / w * row / 2**30:.3f} GiB (only the {b} drawn rows, most from other ranks)"
    )


if __name__ == "__main__":
    main()
