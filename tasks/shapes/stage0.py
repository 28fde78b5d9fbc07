"""Stage 0 of the shapes world: the frozen components, trained first, as the real ones were.

BLIP-2 starts from a pretrained image encoder (EVA-CLIP ViT-g), pretrained language models (OPT, Flan-T5) and a
pretrained BERT. In the shapes world (`tasks.shapes.world`) we make small ones ourselves, on a CPU, from nothing:

    train_vit        a tiny EVA-style ViT (`qformer.vision`, arch "tiny" with overrides: 96 px, patch 16, so each cell
                     of the scene's 3x3 grid is 2x2 patches), trained with dense supervision: each object's patch
                     tokens, pooled, predict its shape, colour, size and cell; every patch token the same for the object
                     under it (or background) and which pixels around it are covered; the class token the object count
                     and which (colour, shape) pairs are present. Saved as a timm state dict:
                     `VisionConfig(..., weights=path, weights_format="timm")` (see `vit_config`).
    train_tokenizer  a word-level tokenizer trained with `tokenizers` on the corpus ("\\n" is a token: OPT's end of
                     text), saved OPT-style (BOS "</s>" first) and T5-style ("</s>" last).
    train_lm         a tiny OPTForCausalLM ("opt") or T5ForConditionalGeneration ("t5": gated-gelu, unscaled outputs,
                     as Flan-T5) trained from scratch on text only: captions, then question/answer pairs about them.
                     They learn that answers follow from the scene described before the question, including when
                     that description comes before OPT's BOS (where stage 2 puts the soft prompt) or before T5's
                     encoder text. Saved with `save_pretrained` for `qformer.stage2.load_llm`.
    bert_folder      a randomly initialised BERT with a WordPiece vocabulary of the world's words, for the Q-Former's
                     text side (`qformer.bert.init_from_bert` + `load_tokenizer`).
    build_stage0     all of the above, with a "fast" (tests, ~1 min) and a "full" (~5 min) preset.

Each trainer writes its held-out evaluation next to what it saves (`<vit>.json`, `<folder>/shapes_eval.json`).

    python -m tasks.shapes.stage0 runs/shapes [--fast]
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tasks.log import setup_logging
from tasks.shapes.lm import answer_prior, evaluate_lm, lm_tokenizer, train_lm, train_tokenizer
from tasks.shapes.vit import evaluate_vit, init_std, normalize_images, train_vit, vit_config
from tasks.shapes.world import load_world, vocabulary, write_world

logger = logging.getLogger(__name__)

__all__ = [
    "PRESETS",
    "Stage0Preset",
    "answer_prior",
    "bert_folder",
    "build_stage0",
    "evaluate_lm",
    "evaluate_vit",
    "lm_tokenizer",
    "normalize_images",
    "qformer_config",
    "train_lm",
    "train_tokenizer",
    "train_vit",
    "vit_config",
]


# ------------------------------------------------------------------------------------------------------ BERT

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def bert_folder(
    out_dir: str | Path,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 64,
    seed: int = 0,
) -> Path:
    """A randomly initialised BERT (BertForMaskedLM: encoder and MLM head) with a WordPiece vocabulary of the world's
    words, for the Q-Former's text side. Its Q-Former needs `vocab_size = len(vocab) + 1` (the added [DEC]), which
    `qformer_config` gives with the matching shape. (Pretraining it by masked language modelling on the corpus's
    captions, 300 steps, did not speed up stage 1's ITC: the text side is not what holds it back.)"""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    words = sorted({w.lower() for w in vocabulary()} | set("0123456789"))
    vocab = BERT_SPECIALS + words
    (out_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast.from_pretrained(str(out_dir)).save_pretrained(out_dir)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=max_positions,
        initializer_range=init_std(hidden),
    )
    torch.manual_seed(seed)
    BertForMaskedLM(cfg).save_pretrained(out_dir)
    return out_dir


def qformer_config(bert_dir: str | Path, encoder_width: int, num_query_tokens: int = 8) -> dict:
    """`QFormerConfig` fields that fit the BERT folder (shape, vocabulary + [DEC]) and the ViT's token width."""
    cfg = json.loads((Path(bert_dir) / "config.json").read_text())
    return {
        "hidden_size": cfg["hidden_size"],
        "num_layers": cfg["num_hidden_layers"],
        "num_heads": cfg["num_attention_heads"],
        "intermediate_size": cfg["intermediate_size"],
        "layer_norm_eps": cfg["layer_norm_eps"],
        "vocab_size": cfg["vocab_size"] + 1,
        "max_position_embeddings": cfg["max_position_embeddings"],
        "encoder_width": encoder_width,
        "num_query_tokens": num_query_tokens,
        "cross_attention_freq": 1,
        # The BERT folder's own scale, for the parts drawn fresh (queries, cross-attention, the query FFN's copy is
        # BERT's): at 0.02 the tiny Q-Former's ITC stayed at chance (log B) for the first 250 steps, at this scale
        # it falls from step ~100.
        "initializer_range": cfg.get("initializer_range", 0.02),
    }


# ------------------------------------------------------------------------------------------------------ everything


# Bumped when what stage 0 trains changes, so that a build made by older code is not reused.
RECIPE = 3


@dataclass(frozen=True)
class Stage0Preset:
    """Sizes and steps of one stage-0 build (the world's sizes too, used when the world is written here)."""

    n_train: int
    n_val: int
    n_test: int
    n_corpus: int
    vit_width: int
    vit_depth: int
    vit_steps: int
    lm_hidden: int
    lm_layers: int
    opt_steps: int
    t5_steps: int
    bert_hidden: int
    bert_layers: int
    # T5 reads the soft prompt through its encoder before its decoder sees it: with 3 layers each, stage 2 learned
    # the image too slowly to help its answers; with 2 it does (README, "The shapes demo").
    t5_layers: int = 2
    vit_batch: int = 64
    lm_batch: int = 32
    vit_lr: float = 2e-3
    opt_lr: float = 3e-3
    t5_lr: float = 3e-3


PRESETS = {
    # About 80 s on two cores: the tests' build. The ViT learns every attribute; OPT and T5 answer seven to eight
    # questions in ten from the caption (with 450 steps OPT had not yet found the colour and shape lookups). T5 gets
    # the full build's 1500 steps: after 400 its zero-shot colour answers ranged from +13.5 to +41.7 points over the
    # blind T5 across seeds 0-2, after 1500 from +23.2 to +52.1 (issue 11's closing note).
    "fast": Stage0Preset(
        n_train=1000,
        n_val=100,
        n_test=100,
        n_corpus=3000,
        vit_width=96,
        vit_depth=4,
        vit_steps=250,
        lm_hidden=64,
        lm_layers=2,
        opt_steps=900,
        t5_steps=1500,
        bert_hidden=64,
        bert_layers=2,
    ),
    # About five minutes on two cores: the demo's build.
    "full": Stage0Preset(
        n_train=4000,
        n_val=200,
        n_test=200,
        n_corpus=20000,
        vit_width=96,
        vit_depth=4,
        vit_steps=500,
        lm_hidden=96,
        lm_layers=3,
        opt_steps=900,
        t5_steps=1500,
        bert_hidden=128,
        bert_layers=2,
        opt_lr=2e-3,
    ),
}


def build_stage0(
    root: str | Path, fast: bool = False, seed: int = 0, threads: int | None = 2, world=None, reuse: bool = True
) -> dict:
    """Write the world (unless `world` is given, or `root/world` holds one of the same sizes and seed), then train
    the ViT, the tokenizer, OPT and T5, and write the BERT folder, all under `root`. Returns (and writes to
    `root/stage0.json`):

        world            the world's paths (`write_world`'s dict)
        vit              ViT weights (timm state dict); vit_config: the `VisionConfig` fields to load it frozen
        vit_metrics      its held-out accuracies (validation images)
        tokenizer        the trained tokenizer's folder
        opt, t5          language model folders (`qformer.stage2.load_llm(path, "fp32")`)
        opt_metrics, t5_metrics   their held-out text-only question answering, with and without the caption
        bert             BERT folder for the Q-Former; qformer_config: `QFormerConfig` fields that fit it
        seconds          wall time of each part and in all; preset, seed

    With `reuse`, a finished build of the same preset, seed and `RECIPE` under `root` (its stage0.json and every file it
    names) is returned as it is: an interrupted demo restarts where it stopped.
    """
    t_start = time.time()
    if threads:
        torch.set_num_threads(threads)
    name = "fast" if fast else "full"
    preset = PRESETS[name]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    done = root / "stage0.json"
    if reuse and world is None and done.is_file():
        previous = json.loads(done.read_text())
        files = [previous["vit"], previous["tokenizer"], previous["opt"], previous["t5"], previous["bert"]]
        same = (previous["preset"], previous["seed"], previous.get("recipe")) == (name, seed, RECIPE)
        if same and all(Path(f).exists() for f in files):
            logger.info("stage 0: reusing %s", done)
            return previous
    seconds: dict[str, float] = {}

    def timed(part: str, fn, *args, **kwargs):
        t = time.time()
        result = fn(*args, **kwargs)
        seconds[part] = round(time.time() - t, 2)
        logger.info("stage 0 %s: %.1f s", part, seconds[part])
        return result

    if world is None:
        wanted = dict(n_train=preset.n_train, n_val=preset.n_val, n_test=preset.n_test, seed=seed)
        manifest = root / "world" / "world.json"
        params = json.loads(manifest.read_text())["params"] if manifest.is_file() else {}
        if params and all(params.get(k) == v for k, v in wanted.items()) and params["n_corpus"] == preset.n_corpus:
            world = load_world(root / "world")
        else:
            world = timed(
                "world",
                write_world,
                root / "world",
                preset.n_train,
                preset.n_val,
                preset.n_test,
                seed,
                n_corpus=preset.n_corpus,
            )
    world = load_world(world)
    vit = timed(
        "vit",
        train_vit,
        world,
        root / "vit.pth",
        preset.vit_steps,
        seed,
        width=preset.vit_width,
        depth=preset.vit_depth,
        batch_size=preset.vit_batch,
        lr=preset.vit_lr,
    )
    tokenizer = timed("tokenizer", train_tokenizer, world["corpus"], root / "tokenizer")
    lms = {}
    for kind, steps, lr, layers in (
        ("opt", preset.opt_steps, preset.opt_lr, preset.lm_layers),
        ("t5", preset.t5_steps, preset.t5_lr, preset.t5_layers),
    ):
        lms[kind] = timed(
            kind, train_lm, kind, world["corpus"], tokenizer, root / kind, steps, seed, hidden=preset.lm_hidden,
            layers=layers, batch_size=preset.lm_batch, lr=lr, eval_corpus=world["corpus_val"],
        )  # fmt: skip
    opt, t5 = lms["opt"], lms["t5"]
    bert = timed("bert", bert_folder, root / "bert", preset.bert_hidden, preset.bert_layers, seed=seed)
    seconds["total"] = round(time.time() - t_start, 2)
    cfg = vit_config(preset.vit_width, preset.vit_depth, weights=vit)
    result = {
        "preset": name,
        "seed": seed,
        "recipe": RECIPE,
        "world": world,
        "vit": str(vit),
        "vit_config": asdict(cfg),
        "vit_metrics": json.loads(vit.with_suffix(".json").read_text()),
        "tokenizer": str(tokenizer),
        "opt": str(opt),
        "opt_metrics": json.loads((opt / "shapes_eval.json").read_text()),
        "t5": str(t5),
        "t5_metrics": json.loads((t5 / "shapes_eval.json").read_text()),
        "bert": str(bert),
        "qformer_config": qformer_config(bert, preset.vit_width),
        "seconds": seconds,
    }
    (root / "stage0.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Stage 0 of the shapes world: the world, a ViT, OPT, T5 and BERT.")
    parser.add_argument("root")
    parser.add_argument("--fast", action="store_true", help="the tests' preset (~1 min) instead of the full (~5 min)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    setup_logging(logging.INFO)
    result = build_stage0(args.root, fast=args.fast, seed=args.seed, threads=args.threads)
    summary = {
        "vit_object_accuracy": result["vit_metrics"]["object_all"],
        "opt_qa": {k: result["opt_metrics"][k] for k in ("qa_caption", "qa_caption_before_bos", "qa_no_caption")},
        "t5_qa": {k: result["t5_metrics"][k] for k in ("qa_caption", "qa_no_caption")},
        "seconds": result["seconds"],
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
