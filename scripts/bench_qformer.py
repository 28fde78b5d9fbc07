"""Benchmark: our Q-Former vs transformers' `Blip2QFormerModel`, identical weights, queries-only pass.

Measures the stage-1/stage-2 image path (32 queries cross-attending to 257 x 1408 ViT-g features) in eval
mode (forward) and train mode (forward + backward), prints median times and the ratio theirs / ours
(> 1 means ours is faster), with the quartiles of the ratios of the interleaved pairs (the machine's noise).

    python scripts/bench_qformer.py                       # paper size, batch 8, CPU
    python scripts/bench_qformer.py --device cuda --dtype bf16 --batch 64
    python scripts/bench_qformer.py --preset tiny --repeats 3   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from qformer import QFormer, QFormerConfig
from qformer.convert import qformer_state_dict, split_transformers_qformer
from qformer.dtypes import DTYPES
from tasks.throughput import device_name


def build_pair(cfg: QFormerConfig, attn: str) -> tuple[QFormer, Blip2QFormerModel, torch.Tensor]:
    ours = QFormer(cfg)
    hf_cfg = Blip2QFormerConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        layer_norm_eps=cfg.layer_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        cross_attention_frequency=cfg.cross_attention_freq,
        encoder_hidden_size=cfg.encoder_width,
        use_qformer_text_input=True,  # both sides carry the stage-1 text FFNs (unused by this pass)
    )
    hf_cfg._attn_implementation = attn
    theirs = Blip2QFormerModel(hf_cfg)
    inner, rest = split_transformers_qformer(qformer_state_dict(ours, "transformers"))
    theirs.load_state_dict(inner, strict=True)
    return ours, theirs, rest["query_tokens"]


def timed(fn, repeats: int, warmup: int, device: str) -> list[float]:
    times = []
    for i in range(warmup + repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartiles (both the value itself for a single one)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper", help="Q-Former preset (paper: 768 wide, 12 layers, 32 queries)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-tokens", type=int, default=257)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="autocast dtype (weights stay fp32)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="transformers' attention backend")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p


def run(args: argparse.Namespace) -> dict:
    """Prints the table; returns {phase: {ours_ms, theirs_ms, ratio}} (+ peak_gib on CUDA)."""
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    cfg = QFormerConfig.preset(args.preset)
    ours, theirs, query_tokens = build_pair(cfg, args.attn)
    ours.to(args.device)
    theirs.to(args.device)
    image = torch.randn(args.batch, args.image_tokens, cfg.encoder_width, device=args.device)
    queries = query_tokens.to(args.device).expand(args.batch, -1, -1)
    dtype = DTYPES[args.dtype]
    autocast = torch.autocast(args.device, dtype=dtype, enabled=dtype != torch.float32)

    def fwd_ours():
        with torch.no_grad(), autocast:
            ours(image_embeds=image)

    def fwd_theirs():
        with torch.no_grad(), autocast:
            theirs(query_embeds=queries, encoder_hidden_states=image)

    def train_ours():
        with autocast:
            out = ours(image_embeds=image).hidden
        out.float().square().mean().backward()

    def train_theirs():
        with autocast:
            out = theirs(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
        out.float().square().mean().backward()

    params = sum(p.numel() for p in ours.parameters())
    print(
        f"Q-Former {args.preset}: {params / 1e6:.1f}M params (with text path), batch {args.batch}, "
        f"image tokens {args.image_tokens}x{cfg.encoder_width}, device {args.device} ({device_name(args.device)}), "
        f"{args.dtype}, "
        f"threads {torch.get_num_threads()}, transformers attention {args.attn}"
    )
    print(f"{'phase':<22}{'ours ms':>10}{'theirs ms':>11}{'ratio':>8}   pairs' ratios, quartiles")
    results: dict = {}
    for phase, mode, a, b in (
        ("forward (eval)", "eval", fwd_ours, fwd_theirs),
        ("forward+backward", "train", train_ours, train_theirs),
    ):
        for m in (ours, theirs):
            m.train(mode == "train")
        # Interleave the two so drift in machine load hits both alike.
        t_a, t_b = [], []
        for _ in range(args.repeats):
            t_a += timed(a, 1, args.warmup if not t_a else 0, args.device)
            t_b += timed(b, 1, args.warmup if not t_b else 0, args.device)
        ma, mb = statistics.median(t_a) * 1e3, statistics.median(t_b) * 1e3
        # Each repeat's two timings ran back to back: the spread of their ratios shows the machine's noise.
        pairs = [b / a for a, b in zip(t_a, t_b, strict=True)]
        low, high = _quartiles(pairs)
        print(f"{phase:<22}{ma:>10.1f}{mb:>11.1f}{mb / ma:>8.3f}   {low:.3f}-{high:.3f}")  # 3 places: 1.146 is no 1.15
        results[mode] = {"ours_ms": ma, "theirs_ms": mb, "ratio": mb / ma, "pair_ratio_quartiles": (low, high)}
    if args.device == "cuda":
        results["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"peak GPU memory: {results['peak_gib']:.2f} GiB")
    return results


def main(argv: list[str] | None = None) -> dict:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
