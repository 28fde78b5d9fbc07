"""Every benchmark in one command: one table on stdout, every figure in a JSON file.

    python scripts/bench_all.py --device cuda --out bench.json    # paper size (one H100/H200; bf16)
    python scripts/bench_all.py --smoke --out bench.json          # tiny sizes on CPU, seconds (the test runs it)

Sections (each is the named script's function, called with the arguments shown by `--dry-run`):
    qformer        bench_qformer.py: paper Q-Former, queries pass forward and forward+backward vs transformers
    stage1         bench_stage1.py: one stage-1 step, frozen EVA ViT-g + Q-Former, samples/s, peak memory, MFU
    stage2_opt     bench_train.time_steps: one stage-2 step with a random OPT-2.7B-shaped LLM
    stage2_t5      bench_train.time_steps: one stage-2 step with a random FlanT5-XL-shaped LLM
    generate       bench_generate.py: captions and VQA answers/s with OPT-2.7B, ours vs transformers
    retrieval      bench_retrieval.py: ITC + ITM re-rank (k_test 128) on 500 images x 2500 texts, projected
                   linearly to the COCO 5k protocol (5000 images x 25000 texts)
The random LLMs are built from their configs (no download). A section that fails is recorded with its error and
the others still run; the exit code is 1 if any failed. `--only stage1,qformer` runs a subset.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench_*.py scripts

import bench_generate  # noqa: E402
import bench_qformer  # noqa: E402
import bench_retrieval  # noqa: E402
import bench_stage1  # noqa: E402
import bench_train  # noqa: E402

from tasks.throughput import device_name  # noqa: E402

SECTIONS = ("qformer", "stage1", "stage2_opt", "stage2_t5", "generate", "retrieval")
COCO_IMAGES, COCO_TEXTS = 5000, 25000

# LLM shapes (hidden, layers, heads, FFN, vocab rows): the real models' configs, random weights.
OPT_2_7B = dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240, vocab_size=50272)
FLAN_T5_XL = dict(d_model=2048, d_kv=64, num_heads=32, d_ff=5120, num_layers=24, vocab_size=32128)
TINY_OPT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32, vocab_size=64)
TINY_T5 = dict(d_model=16, d_kv=8, num_heads=2, d_ff=32, num_layers=2, vocab_size=64)


def section_args(smoke: bool, device: str) -> dict[str, list[str]]:
    """The command-line arguments each script-backed section runs with."""
    d = ["--device", device]
    if smoke:
        return {
            "qformer": ["--preset", "tiny", "--batch", "2", "--repeats", "2", "--warmup", "1", *d],
            "stage1": ["--preset", "tiny", "--batch", "3", "--text-len", "8", "--steps", "1", "--warmup", "1", *d],
            "generate": ["--size", "tiny", "--batch", "2", "--repeats", "1", "--warmup", "0", "--caption-tokens", "4"]
            + ["--beams", "2", *d],
            "retrieval": ["--preset", "tiny", "--image-tokens", "5", "--images", "4", "--texts", "8", "--k-test", "2"]
            + ["--batch", "8", "--text-len", "6", *d],
        }
    bf16 = ["--dtype", "bf16"]
    return {
        "qformer": ["--preset", "paper", "--batch", "64", "--repeats", "10", "--warmup", "3", *bf16, *d],
        "stage1": ["--preset", "paper", "--batch", "100", "--steps", "5", "--warmup", "2", *bf16, *d],
        "generate": ["--size", "mid", "--llm-size", "2.7b", "--vit", "eva_vit_g", "--batch", "16", "--repeats", "2"]
        + ["--warmup", "1", *bf16, *d],
        "retrieval": ["--images", "500", "--texts", "2500", "--k-test", "128", "--batch", "512", "--skip-reference"]
        + [*bf16, *d],
    }


def stage2_step(kind: str, smoke: bool, device: str) -> dict:
    """One stage-2 training step (bench_train.time_steps) with a random LLM of OPT-2.7B's or FlanT5-XL's shape."""
    from transformers import OPTConfig, OPTForCausalLM, T5Config, T5ForConditionalGeneration

    from qformer.config import LLMConfig
    from qformer.stage2 import Blip2Stage2
    from tasks.config import load_config

    dtype = "fp32" if smoke else "bf16"
    batch = 2 if smoke else 64
    preset = "tiny" if smoke else "paper"
    cfg = load_config(
        None,
        [
            "output_dir=/tmp/bench_all",
            "stage=stage2",
            f"model_preset={preset}",
            f"precision={dtype}",
            f"data.batch_size={batch}",
            f"model.vision.precision={dtype}",
            f"model.llm.dtype={dtype}",
        ],
    )
    shape = (TINY_OPT if kind == "opt" else TINY_T5) if smoke else (OPT_2_7B if kind == "opt" else FLAN_T5_XL)
    rows = shape["vocab_size"]
    tokenizer = bench_generate.word_tokenizer(rows - 7 if rows > 100 else rows - 1)
    common = dict(pad_token_id=0, eos_token_id=1)
    if kind == "opt":
        llm_cfg = OPTConfig(**shape, word_embed_proj_dim=shape["hidden_size"], bos_token_id=1, dropout=0.0, **common)
        llm_cls = OPTForCausalLM
    else:
        llm_cfg = T5Config(
            **shape, feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, **common
        )
        llm_cls = T5ForConditionalGeneration
    torch.manual_seed(0)
    with torch.device(device):  # random weights made where they run: no host copy of billions of parameters
        llm = llm_cls._from_config(llm_cfg, dtype=bench_generate.DTYPES[dtype])
        model_cfg = cfg.model
        model_cfg.llm = LLMConfig(dtype=dtype)
        model = Blip2Stage2(model_cfg, llm=llm, tokenizer=tokenizer)
    result = bench_train.time_steps(
        model, tokenizer, cfg, torch.device(device), 1 if smoke else 5, 1 if smoke else 2, name=f"stage2 {kind}"
    )
    n_llm = sum(p.numel() for p in llm.parameters())
    return {**result, "llm_params_m": n_llm / 1e6}


def run_section(name: str, args_by_section: dict[str, list[str]], smoke: bool, device: str) -> dict:
    if name == "qformer":
        return bench_qformer.main(args_by_section[name])
    if name == "stage1":
        return bench_stage1.main(args_by_section[name])
    if name in ("stage2_opt", "stage2_t5"):
        return stage2_step(name.split("_")[1], smoke, device)
    if name == "generate":
        return bench_generate.main(args_by_section[name])
    if name == "retrieval":
        out = bench_retrieval.main(args_by_section[name])
        if not smoke:  # ITC linear in images + texts, the ITM re-rank in the k_test * (images + texts) pairs
            scale = (COCO_IMAGES + COCO_TEXTS) / (500 + 2500)
            out.update(projected_5k_itc_s=out["itc_s"] * scale, projected_5k_itm_s=out["itm_s"] * scale)
        return out
    raise KeyError(name)


def headline(name: str, result: dict) -> str:
    """The one-line summary of a section for the table."""
    if "error" in result:
        return f"FAILED: {result['error']}"
    if name == "qformer":
        f, t = result["eval"], result["train"]
        return (
            f"fwd {f['ours_ms']:.1f} ms (x{f['ratio']:.2f} vs transformers), "
            f"fwd+bwd {t['ours_ms']:.1f} ms (x{t['ratio']:.2f})"
        )
    if name in ("stage1", "stage2_opt", "stage2_t5"):
        mfu = f", MFU {result['mfu']:.1%}" if result.get("mfu") is not None else ""
        return (
            f"{result['samples_per_s']:.1f} samples/s, {result['tflops_per_s']:.3g} TFLOP/s{mfu}, "
            f"peak {result['peak_gib']:.2f} GiB"
        )
    if name == "generate":
        tasks = {k: v for k, v in result.items() if isinstance(v, dict)}
        return ", ".join(
            f"{k} {v['ours']:.2f} {v['unit']} (x{v['ratio']:.2f} vs transformers)" for k, v in tasks.items()
        )
    if name == "retrieval":
        text = f"ITC {result['itc_s']:.2f} s, ITM re-rank {result['itm_s']:.2f} s"
        if "projected_5k_itm_s" in result:
            text += f"; COCO 5k projected {result['projected_5k_itc_s'] + result['projected_5k_itm_s']:.0f} s"
        return text
    return json.dumps(result)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (overrides --device)")
    p.add_argument("--out", default="bench.json", help="where the JSON goes")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    p.add_argument("--dry-run", action="store_true", help="print each section's arguments and stop")
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else args.device
    chosen = [s for s in args.only.split(",") if s] or list(SECTIONS)
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    by_section = section_args(args.smoke, device)
    if args.dry_run:
        for name in chosen:
            print(name, " ".join(by_section.get(name, ["(built here: bench_train.time_steps)"])))
        return 0
    report = {
        "mode": "smoke" if args.smoke else "paper",
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "sections": {},
    }
    for name in chosen:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            result = run_section(name, by_section, args.smoke, device)
        except Exception as e:  # one broken section must not lose the others' figures
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        result["wall_s"] = time.perf_counter() - t0
        report["sections"][name] = result
    print(f"\n{'section':<12} {'wall s':>7}  result ({report['mode']}, {report['device']})")
    for name, result in report["sections"].items():
        print(f"{name:<12} {result['wall_s']:>7.1f}  {headline(name, result)}")
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 1 if any("error" in r for r in report["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
