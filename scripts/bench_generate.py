"""Benchmark stage-2 generation: captions/s and VQA answers/s, ours vs transformers' `Blip2ForConditionalGeneration`.

Both sides hold the same random weights: our `Blip2Stage2` is exported with `qformer.hf_folders.export_stage2` and
the folder is loaded with `Blip2ForConditionalGeneration.from_pretrained`. Both get the same pixel tensors and the
same settings (captions: 5 beams, 8..30 new tokens; VQA: "Question: {} Short answer:", 5 beams, 1..10 new tokens,
length penalty -1). Timed per batch: ours `generate` / `predict_answers` (tokenize, generate, decode); theirs:
tokenize with the image tokens in front (what `Blip2Processor` builds), `generate`, decode. Medians over repeats.

    python scripts/bench_generate.py --size tiny
    python scripts/bench_generate.py --size mid --batch 4
    python scripts/bench_generate.py --device cuda --dtype bf16 --size mid --llm-size 2.7b --vit eva_vit_g --batch 16
    python scripts/bench_generate.py --stage1 --batch 8   # Q-Former captioning (stage 1), greedy and 5 beams

The LLM is a random OPT: tiny (hidden 16), mid (hidden 512, 6 layers, vocab 50272) or 2.7b (OPT-2.7B's shape:
hidden 2560, 32 layers, 32 heads, FFN 10240, vocab 50272). Its tokenizer is a word-level one of the same size. The
mid image encoder is a small EVA-shaped ViT registered here as "bench_s" (width 384, 6 blocks, 224 px); eva_vit_g is
the paper's. With random weights the end token is rarely drawn, so most outputs run to max_new_tokens on both sides.

--stage1 times `Blip2Stage1.generate` instead (the Q-Former's own LM head, no LLM): a mid Q-Former (hidden 384,
6 layers, 6 heads, FFN 1536, 32 queries, BERT's vocabulary + `[DEC]`) over the "tiny" encoder at 224 px (257 image
tokens, cheap, so the time is the Q-Former's), greedy and beam search, min 8 / max --caption-tokens new tokens.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import Blip2ForConditionalGeneration, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from qformer import vision as qvision
from qformer.caption import GenerationConfig
from qformer.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from qformer.dtypes import DTYPES
from qformer.hf_folders import export_stage2
from qformer.stage2 import CAPTION_GENERATION, VQA_GENERATION, VQA_PROMPT, Blip2Stage2

# A small EVA-shaped encoder for CPU runs (not a built-in arch: registered for this script only).
BENCH_ARCH = qvision.ArchSpec("eva", 384, 6, 6, 6, 1536, 14, 1e-6)
LLM_SIZES = {  # hidden, layers, heads, FFN, vocab rows
    "tiny": (16, 2, 2, 32, 64),
    "mid": (512, 6, 8, 2048, 50272),
    "2.7b": (2560, 32, 32, 10240, 50272),
}
SIZES = {  # image encoder, image size, Q-Former preset, LLM
    "tiny": ("tiny", 28, "tiny", "tiny"),
    "mid": ("bench_s", 224, "paper", "mid"),
}
SPECIALS = ["<pad>", "</s>", "<unk>", "\n"]
PROMPT_WORDS = ["question", "short", "answer", ":", "?", "a", "photo", "of", "what", "is", "the", "how", "many"]


def register_bench_arch() -> None:
    qvision.ARCHS.setdefault("bench_s", BENCH_ARCH)


def word_tokenizer(size: int) -> PreTrainedTokenizerFast:
    """An OPT-style word-level tokenizer (BOS `</s>` first) with `size` entries; `\\n` is one token."""
    words = SPECIALS + PROMPT_WORDS
    words += [f"w{i}" for i in range(size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n|[?:.,]"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r" +"), behavior="removed"),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="</s>", unk_token="<unk>"
    )


def build_ours(args) -> Blip2Stage2:
    vit, image_size, qformer_preset, llm_size = SIZES[args.size]
    vit = args.vit or vit
    llm_size = args.llm_size or llm_size
    if vit == "eva_vit_g":
        image_size = 224
    hidden, layers, heads, ffn, rows = LLM_SIZES[llm_size]
    # The tokenizer leaves the last rows free, as OPT's does (50265 tokens, 50272 rows): <image> fits.
    tokenizer = word_tokenizer(rows - 7 if rows > 100 else rows - 1)
    llm_cfg = OPTConfig(
        vocab_size=rows,
        hidden_size=hidden,
        num_hidden_layers=layers,
        ffn_dim=ffn,
        num_attention_heads=heads,
        max_position_embeddings=2048,
        word_embed_proj_dim=hidden,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        dropout=0.0,
        attention_dropout=0.0,
    )
    torch.manual_seed(0)
    llm = OPTForCausalLM._from_config(llm_cfg, dtype=DTYPES[args.dtype])
    qformer = QFormerConfig.preset(qformer_preset, encoder_width=qvision.ARCHS[vit].width)
    cfg = Blip2Config(
        vision=VisionConfig(arch=vit, image_size=image_size, precision=args.dtype),
        qformer=qformer,
        ln_vision_eps=qvision.ARCHS[vit].norm_eps,  # what the exported folder can express
        llm=LLMConfig(dtype=args.dtype),
    )
    model = Blip2Stage2(cfg, llm=llm, tokenizer=tokenizer)
    with torch.no_grad():  # random, non-trivial weights everywhere (transformers would start query tokens at zero)
        model.qformer.query_tokens.normal_(0.0, 0.5)
        for p in model.visual.parameters():
            p.normal_(0.0, 0.02)
    return model.eval()


def timed_pair(fns, device: str, warmup: int, repeats: int) -> tuple[list[list[float]], list[object]]:
    """Seconds of each run of each function, run interleaved (a, b, a, b, ...) so both see the same machine load."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    outs: list[object] = [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs[i] = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[i].append(time.perf_counter() - t0)
    return times, outs


def bench_stage1(args) -> None:
    """Captions/s of the stage-1 model (`Blip2Stage1.generate`), greedy and with --beams (default 5)."""
    from qformer.blip2 import Blip2Stage1

    torch.manual_seed(0)
    vision = VisionConfig(arch="tiny", image_size=224, precision="fp32")
    qformer = QFormerConfig(
        hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536, encoder_width=qvision.ARCHS["tiny"].width
    )
    model = Blip2Stage1(Blip2Config(vision=vision, qformer=qformer, embed_dim=256)).eval().to(args.device)
    images = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(args.device)
    ids = dict(bos_token_id=qformer.vocab_size - 1, eos_token_id=102, pad_token_id=0)
    n_q = sum(p.numel() for p in model.qformer.parameters())
    print(
        f"stage 1: Q-Former {n_q / 1e6:.1f}M ({qformer.num_query_tokens} queries, hidden {qformer.hidden_size}, "
        f"{qformer.num_layers} layers), tiny ViT @ 224 px; batch {args.batch}, {args.device}, "
        f"threads {torch.get_num_threads()}"
    )
    for beams in (1, args.beams or CAPTION_GENERATION.num_beams):
        cfg = GenerationConfig(
            max_new_tokens=args.caption_tokens, min_new_tokens=min(8, args.caption_tokens), num_beams=beams
        )
        (times,), (out,) = timed_pair(
            (lambda cfg=cfg: model.generate(images, **ids, cfg=cfg),), args.device, args.warmup, args.repeats
        )
        t = statistics.median(times)
        print(
            f"captions (beams {beams}, {cfg.min_new_tokens}..{cfg.max_new_tokens} new): "
            f"{args.batch / t:.2f} captions/s "
            f"(median {t * 1e3:.0f} ms, min {min(times) * 1e3:.0f} ms per batch over {len(times)} runs; "
            f"output {tuple(out.shape)})"
        )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=sorted(SIZES), help="encoder + Q-Former + LLM shapes")
    p.add_argument("--llm-size", choices=sorted(LLM_SIZES), help="override the LLM shape (2.7b: OPT-2.7B)")
    p.add_argument("--vit", choices=["tiny", "bench_s", "eva_vit_g"], help="override the image encoder")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--beams", type=int, help="beams for both tasks (default: 5, the paper's)")
    p.add_argument("--caption-tokens", type=int, default=30, help="max new tokens for captions (min stays 8)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="frozen ViT and LLM precision")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--stage1", action="store_true", help="time the stage-1 model's captioning instead (no LLM)")
    return p


def run(args: argparse.Namespace) -> dict:
    """Prints the table; returns {task: {unit, ours, transformers, ratio, same}} (per second; --stage1: {} )."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stage1:
        bench_stage1(args)
        return {}
    register_bench_arch()

    ours = build_ours(args)
    q = ours.cfg.qformer.num_query_tokens
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        result = export_stage2(ours, folder)
        theirs = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=DTYPES[args.dtype]).eval()
        export_s = time.perf_counter() - t0
    ours.to(args.device)
    theirs.to(args.device)
    tokenizer = ours.tokenizer
    image_id = result.image_token_index

    size = ours.cfg.vision.image_size
    images = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(args.device)
    g = torch.Generator().manual_seed(1)
    words = [f"w{i}" for i in range(min(len(tokenizer) - 20, 5000))]
    questions = [
        "what is the " + " ".join(words[j] for j in torch.randint(0, len(words), (int(n),), generator=g)) + " ?"
        for n in torch.randint(2, 9, (args.batch,), generator=g)
    ]
    caption_cfg = GenerationConfig(
        max_new_tokens=args.caption_tokens,
        min_new_tokens=min(CAPTION_GENERATION.min_new_tokens, args.caption_tokens),
        num_beams=args.beams or CAPTION_GENERATION.num_beams,
    )
    vqa_cfg = GenerationConfig(
        max_new_tokens=VQA_GENERATION.max_new_tokens,
        min_new_tokens=VQA_GENERATION.min_new_tokens,
        num_beams=args.beams or VQA_GENERATION.num_beams,
        length_penalty=VQA_GENERATION.length_penalty,
    )

    def hf_generate(prompts: list[str], cfg: GenerationConfig) -> list[str]:
        enc = tokenizer(prompts, padding="longest", padding_side="left", return_tensors="pt")
        ids = torch.cat([torch.full((len(prompts), q), image_id), enc.input_ids], 1).to(args.device)
        mask = torch.cat([torch.ones(len(prompts), q, dtype=torch.long), enc.attention_mask], 1).to(args.device)
        with torch.no_grad():
            out = theirs.generate(
                pixel_values=images.to(theirs.dtype),
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=cfg.max_new_tokens,
                min_new_tokens=cfg.min_new_tokens,
                num_beams=cfg.num_beams,
                length_penalty=cfg.length_penalty,
                do_sample=False,
            )
        return [t.strip() for t in tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)]

    n_llm = sum(p.numel() for p in ours.llm.parameters())
    n_vit = sum(p.numel() for p in ours.visual.parameters())
    n_q = sum(p.numel() for p in ours.qformer.parameters())
    print(
        f"{ours.cfg.vision.arch} ViT {n_vit / 1e6:.1f}M @ {size}px, Q-Former {n_q / 1e6:.1f}M ({q} queries), "
        f"OPT {n_llm / 1e6:.1f}M; batch {args.batch}, {args.device}, {args.dtype}, threads {torch.get_num_threads()}; "
        f"export + from_pretrained {export_s:.1f} s"
    )
    tasks = {
        f"captions (beams {caption_cfg.num_beams}, {caption_cfg.min_new_tokens}..{caption_cfg.max_new_tokens} new)": (
            lambda: ours.generate("", images=images, cfg=caption_cfg),
            lambda: hf_generate([""] * args.batch, caption_cfg),
            "captions/s",
        ),
        f"VQA (beams {vqa_cfg.num_beams}, 1..10 new, lp -1)": (
            lambda: ours.predict_answers(questions, images=images, cfg=vqa_cfg),
            lambda: hf_generate([VQA_PROMPT.format(x) for x in questions], vqa_cfg),
            "answers/s",
        ),
    }
    print(f"{'task':<40} {'unit':<11} {'ours':>8} {'transformers':>13} {'ours/theirs':>12}  same text")
    results: dict = {}
    for name, (ours_fn, hf_fn, unit) in tasks.items():
        (ours_t, hf_t), (out_ours, out_hf) = timed_pair((ours_fn, hf_fn), args.device, args.warmup, args.repeats)
        t_ours, t_hf = statistics.median(ours_t), statistics.median(hf_t)
        same = sum(a == b for a, b in zip(out_ours, out_hf, strict=True))
        print(
            f"{name:<40} {unit:<11} {args.batch / t_ours:>8.2f} {args.batch / t_hf:>13.2f} {t_hf / t_ours:>11.2f}x  "
            f"{same}/{args.batch}"
        )
        print(
            f"{'':<40} per batch: median {t_ours * 1e3:.0f} vs {t_hf * 1e3:.0f} ms, "
            f"min {min(ours_t) * 1e3:.0f} vs {min(hf_t) * 1e3:.0f} ms ({len(ours_t)} runs each)"
        )
        key = "captions" if name.startswith("captions") else "vqa"
        results[key] = {
            "unit": unit,
            "ours": args.batch / t_ours,
            "transformers": args.batch / t_hf,
            "ratio": t_hf / t_ours,
            "same_text": f"{same}/{args.batch}",
        }
    return results


def main(argv: list[str] | None = None) -> dict:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
