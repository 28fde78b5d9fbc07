"""Benchmark the retrieval protocol after the image encoder: ITC for all pairs, ITM re-rank of the top k_test both
ways. Ours (pairs deduplicated, grouped by image, image keys/values formed once, large batches) against the
reference's style (one query at a time: its k candidates in one batch, the image token map repeated k times).

The frozen ViT is left out: both spend the same time there (random `[n_img, 257, 1408]` token maps stand in).

    python scripts/bench_retrieval.py --images 100 --texts 500 --k-test 16            # scaled down, CPU
    python scripts/bench_retrieval.py --device cuda --dtype bf16 --images 5000 --texts 25000 --k-test 128
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from qformer.blip2 import Blip2Stage1
from qformer.config import Blip2Config
from qformer.dtypes import DTYPES
from tasks.evals.retrieval import itc_similarity, itm_pair_scores, rerank_pairs


@torch.no_grad()
def reference_style(model, embeds, ids, mask, sim, k):
    """The reference's loop: per image its top-k texts, per text its top-k images, one query per ITM call (fp32)."""
    q = model.cfg.qformer.num_query_tokens
    n_img, n_txt = sim.shape
    i2t = torch.full_like(sim, -100.0)
    t2i = torch.full((n_txt, n_img), -100.0, device=sim.device)
    for i in range(n_img):
        top = sim[i].topk(k)
        hidden = model.qformer(ids[top.indices], mask[top.indices], image_embeds=embeds[i].float().repeat(k, 1, 1))
        i2t[i, top.indices] = model.itm_head(hidden.hidden[:, :q]).mean(1)[:, 1] + top.values
    for j in range(n_txt):
        top = sim[:, j].topk(k)
        hidden = model.qformer(ids[j].repeat(k, 1), mask[j].repeat(k, 1), image_embeds=embeds[top.indices].float())
        t2i[j, top.indices] = model.itm_head(hidden.hidden[:, :q]).mean(1)[:, 1] + top.values
    return i2t, t2i


@torch.no_grad()
def ours(model, embeds, ids, mask, sim, k, batch, autocast):
    n_img, n_txt = sim.shape
    i2t_topk, t2i_topk = sim.topk(k, dim=1).indices, sim.t().topk(k, dim=1).indices
    img, txt = rerank_pairs(i2t_topk, t2i_topk, n_txt, 0, 1)  # rank 0 of world 1: every image
    itm = itm_pair_scores(model, embeds, img, ids[txt], mask[txt], batch, autocast)
    full = torch.full_like(sim, float("nan"))
    full[img, txt] = itm
    i2t = torch.full_like(sim, -100.0).scatter_(1, i2t_topk, (full + sim).gather(1, i2t_topk))
    t2i = torch.full((n_txt, n_img), -100.0, device=sim.device)
    t2i.scatter_(1, t2i_topk, (full + sim).t().gather(1, t2i_topk))
    return i2t, t2i, img.numel()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper", help="BLIP-2 preset of the Q-Former (tiny for a smoke run)")
    p.add_argument("--image-tokens", type=int, default=257)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--texts", type=int, default=500)
    p.add_argument("--k-test", type=int, default=16)
    p.add_argument("--text-len", type=int, default=35)
    p.add_argument("--batch", type=int, default=128, help="ITM pairs per batch (ours)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--skip-reference", action="store_true", help="time ours only (the reference takes hours at 5k)")
    return p


def run(args: argparse.Namespace) -> dict:
    """Prints the report; returns itc_s, itm_s, pairs, and (unless skipped) reference_s and speedup."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = Blip2Stage1(Blip2Config.preset(args.preset), build_visual=False).to(device).eval()
    cfg = model.cfg.qformer
    dtype = DTYPES[args.dtype]
    store = dtype if device.type == "cuda" else torch.float32
    embeds = torch.randn(args.images, args.image_tokens, cfg.encoder_width, device=device).to(store)
    vocab = cfg.vocab_size  # BERT's ids at paper size; a tiny preset's own range
    ids = torch.randint(min(1000, vocab // 2), min(30000, vocab - 1), (args.texts, args.text_len), device=device)
    ids[:, 0] = 101 if vocab > 101 else 1  # [CLS]
    mask = torch.ones_like(ids)
    autocast = torch.autocast("cuda", dtype=dtype) if device.type == "cuda" and dtype != torch.float32 else None
    autocast = autocast or contextlib.nullcontext()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad(), autocast:
        t0 = time.perf_counter()
        feats = torch.cat(
            [
                model.image_features(embeds[s : s + 256].float(), use_cache=False).feats.float()
                for s in range(0, args.images, 256)
            ]
        )
        tfeat = torch.cat(
            [model.text_features(ids[s : s + 512], mask[s : s + 512]).feat.float() for s in range(0, args.texts, 512)]
        )
        sim = itc_similarity(feats, tfeat)
        sync()
        t_itc = time.perf_counter() - t0
    t0 = time.perf_counter()
    i2t, t2i, pairs = ours(model, embeds, ids, mask, sim, args.k_test, args.batch, autocast)
    sync()
    t_ours = time.perf_counter() - t0
    print(
        f"{args.images} images x {args.texts} texts, k_test {args.k_test}, {args.preset} Q-Former, {device}, "
        f"{args.dtype}, "
        f"threads {torch.get_num_threads()}"
    )
    print(f"ITC (all pairs): {t_itc:.2f} s")
    listed = args.k_test * (args.images + args.texts)
    print(f"ITM re-rank, ours: {t_ours:.2f} s for {pairs} distinct pairs ({listed} in the two top-k lists)")
    result = {"itc_s": t_itc, "itm_s": t_ours, "pairs": pairs, "listed_pairs": listed}
    if args.skip_reference:
        return result
    t0 = time.perf_counter()
    ref_i2t, ref_t2i = reference_style(model, embeds, ids, mask, sim, args.k_test)
    sync()
    t_ref = time.perf_counter() - t0
    err = max((i2t - ref_i2t).abs().max().item(), (t2i - ref_t2i).abs().max().item())
    print(f"ITM re-rank, reference style (per query, fp32): {t_ref:.2f} s")
    print(f"speed-up {t_ref / t_ours:.2f}x; max score difference {err:.2e}")
    return {**result, "reference_s": t_ref, "speedup": t_ref / t_ours, "max_score_difference": err}


def main(argv: list[str] | None = None) -> dict:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
