"""`qformer demo`: the whole BLIP-2 recipe on a laptop CPU, in the shapes world, with nothing downloaded.

    stage 0   frozen parts trained first, like the real ones: a tiny ViT on the images, a tokenizer, a tiny OPT
              and a tiny T5 on text only (captions followed by questions and answers), a tiny BERT
    stage 1   Q-Former with ITC + ITM + ITG against the frozen ViT          (configs/shapes/stage1.yaml)
    stage 2   the query outputs as a soft prompt to the frozen OPT and T5    (configs/shapes/stage2_*.yaml)
    evaluate  retrieval, captioning, and zero-shot VQA (the Q-Former never sees a question: answers come from
              the frozen LM reading the soft prompt), next to baselines: the same LM with no image (blind), and
              with the soft prompt of a random other image

Everything runs through the real entry points, configs, loaders and evaluators. Writes `OUT/report.md` with the
metrics, loss curves (PNG) and a gallery of test images with their captions and answers (`tasks.shapes.report`).

    python -m tasks.shapes.demo [--fast] [--out runs/shapes] [--seed 0] [--clean] [--instruct] [--capfilt]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tasks import command
from tasks.evals.common import write_json, write_text
from tasks.shapes.report import write_report

logger = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "shapes"
# Bumped when what stages 1 and 2 train changes (stage 0 has its own `RECIPE`), so that finished runs made by older
# code are not reused. 2: training images no longer cropped or flipped (captions name positions and counts).
RUNS = 2


@dataclass
class DemoPreset:
    stage1_steps: int
    stage2_steps: int  # OPT
    stage2_t5_steps: int  # T5 learns to read the soft prompt several times slower than OPT (README, "The shapes demo")
    batch_size: int
    stage0: str  # the tasks.shapes.stage0 preset
    stage1_lr: float = 1e-3
    stage1_warmup: int = 50
    stage2_lr: float | None = None  # None: the stage-2 configs' own (1e-3)
    num_workers: int = 2  # training data loader processes
    dropout: float | None = None  # the Q-Former's hidden and attention dropout; None: the configs' (BLIP-2's 0.1)


PRESETS = {
    # The world's size comes with the stage-0 preset of the same name (tasks.shapes.stage0.PRESETS).
    "full": DemoPreset(stage1_steps=1000, stage2_steps=500, stage2_t5_steps=2500, batch_size=32, stage0="full"),
    # ITC sits at chance (log B) for its first 100-200 steps before it falls; a higher peak and a short warmup get the
    # fast run's 450 steps past that. Stage 2 at twice the full run's peak: in 400 steps both LMs learn to answer
    # colour and shape questions from the image (the tests assert the colour margins; README, "The shapes demo").
    # On 2 cores, loading the small batches in the training process and leaving out dropout make a step 11% and 9%
    # faster; a few hundred steps are too few to overfit.
    "fast": DemoPreset(
        stage1_steps=450,
        stage2_steps=400,
        stage2_t5_steps=400,
        batch_size=24,
        stage0="fast",
        stage1_lr=2e-3,
        stage1_warmup=20,
        stage2_lr=2e-3,
        num_workers=0,
        dropout=0.0,
    ),
}


class Laps:
    """Wall-clock laps of a run's parts: `lap(name)` records the time since the previous lap in `timings` and prints
    `[prefix] name: N s`."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = now - self._clock
        self._clock = now
        print(f"[{self.prefix}] {name}: {self.timings[name]:.0f} s", flush=True)


def _stage(name: str, config: str, overrides: list[str]) -> Path:
    from tasks.config import load_config
    from tasks.train import train

    t0 = time.perf_counter()
    cfg = load_config(CONFIGS / config, overrides)
    final = train(cfg)
    logger.info("%s done in %.0f s", name, time.perf_counter() - t0)
    return final


def _eval(config: str, overrides: list[str]) -> dict:
    from tasks.evals.config import load_eval_config
    from tasks.evaluate import evaluate

    return evaluate(load_eval_config(str(CONFIGS / config), overrides))


def run_demo(out: str | Path, fast: bool = False, seed: int = 0) -> dict:
    from tasks.shapes.stage0 import RECIPE, build_stage0

    name = "fast" if fast else "full"
    preset = PRESETS[name]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Finished parts are reused on a second run; parts of another preset or seed would not fit.
    marker = out / "demo.json"
    if marker.is_file():
        previous = json.loads(marker.read_text())
        recipe = (previous.get("recipe", 1), previous.get("runs", 1))
        if (previous["preset"], previous["seed"], recipe) != (name, seed, (RECIPE, RUNS)):
            raise SystemExit(
                f"{out} holds a demo run with preset {previous['preset']!r}, seed {previous['seed']}, recipe "
                f"{recipe} (this code's: {(RECIPE, RUNS)}): pass --clean to start over, or another --out"
            )
    marker.write_text(json.dumps({"preset": name, "seed": seed, "recipe": RECIPE, "runs": RUNS}))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    lap = Laps("demo")
    timings = lap.timings

    stage0 = build_stage0(out / "stage0", fast=fast, seed=seed)
    world = stage0["world"]
    lap("stage 0 (world, ViT, tokenizer, OPT, T5, BERT)")

    # The stage-0 components' shapes, as overrides of the shapes configs (same keys a user would write in YAML).
    model = [f"model.vision.{k}={v}" for k, v in stage0["vit_config"].items() if v is not None and k != "frozen"]
    model += [f"model.qformer.{k}={v}" for k, v in stage0["qformer_config"].items() if v is not None]
    model += [f"model.vision.weights={stage0['vit']}"]
    if preset.dropout is not None:
        model += [f"model.qformer.{k}={preset.dropout}" for k in ("hidden_dropout", "attention_dropout")]
    data = [
        f"data.datasets=[{{ann_paths: [{world['train_captions']}], image_root: {world['image_root']}}}]",
        f"data.batch_size={preset.batch_size}",
        f"data.num_workers={preset.num_workers}",
    ]
    # Bitwise-repeatable figures for a seed: on 2 CPU threads stage 1 otherwise drifts (README, "Resume").
    steps = lambda n: [f"optim.total_steps={n}", f"save_every={n}", "deterministic=true"]  # noqa: E731
    stage1 = _stage(
        "stage 1",
        "stage1.yaml",
        [
            *model,
            *data,
            *steps(preset.stage1_steps),
            f"optim.lr={preset.stage1_lr}",
            f"optim.warmup_steps={preset.stage1_warmup}",
            f"bert={stage0['bert']}",
            f"output_dir={out / 'stage1'}",
        ],
    )
    lap("stage 1 (ITC + ITM + ITG)")
    stage2 = {}
    for llm in ("opt", "t5"):
        stage2[llm] = _stage(
            f"stage 2 {llm}",
            f"stage2_{llm}.yaml",
            [
                *model,
                *data,
                *steps(preset.stage2_steps if llm == "opt" else preset.stage2_t5_steps),
                *([f"optim.lr={preset.stage2_lr}"] if preset.stage2_lr else []),
                f"model.llm.path={stage0[llm]}",
                f"init_from={stage1}",
                f"output_dir={out / f'stage2_{llm}'}",
            ],
        )
        lap(f"stage 2 ({llm})")

    results = {"timings": timings, "world": world}
    results["stage0"] = {k: stage0[k] for k in ("vit_metrics", "opt_metrics", "t5_metrics")}
    for key, score in RETRIEVAL_SCORES.items():
        results[key] = _eval(
            "eval_retrieval.yaml",
            [
                f"checkpoint={stage1}",
                f"ann_path={world['test_retrieval']}",
                f"image_root={world['image_root']}",
                f"output_dir={out / 'eval' / key}",
                f"score={score}",
            ],
        )
    results["retrieval_chance"] = _retrieval_chance(world["test_retrieval"])
    lap("retrieval")
    results["caption"] = _eval(
        "eval_caption.yaml",
        [
            f"checkpoint={stage2['opt']}",
            f"ann_path={world['test_retrieval']}",
            f"image_root={world['image_root']}",
            f"annotations={world['test_coco_gt']}",
            f"output_dir={out / 'eval' / 'caption'}",
        ],
    )
    results["caption_baseline"] = _most_common_caption_baseline(world)
    results["caption_random_image"] = _caption_random_image(out / "eval" / "caption" / "results.json", world, seed)
    lap("captioning")
    results["vqa"] = {}
    for llm in ("opt", "t5"):
        common = [
            f"checkpoint={stage2[llm]}",
            f"annotations={world['test_annotations']}",
            f"image_root={world['image_root']}",
        ]
        with_image = _eval(
            "eval_vqa.yaml",
            [*common, f"questions={world['test_questions']}", f"output_dir={out / 'eval' / f'vqa_{llm}'}"],
        )
        shuffled = _shuffled_questions(world["test_questions"], out / "eval" / "shuffled_questions.json", seed)
        random_image = _eval(
            "eval_vqa.yaml",
            [*common, f"questions={shuffled}", f"output_dir={out / 'eval' / f'vqa_{llm}_random_image'}"],
        )
        blind = _blind_vqa(stage2[llm], world, out / "eval" / f"vqa_{llm}_blind")
        results["vqa"][llm] = {"image": with_image, "random_image": random_image, "blind": blind}
    lap("zero-shot VQA")
    results["checks"] = learned_margins(results)
    write_text(out / "results.json", json.dumps(results, indent=1, default=str))
    write_report(out, results, world, stage2)
    lap("report")
    for name, value in results["checks"].items():
        print(f"[demo] {name}: {value:+.1f}")
    print(f"[demo] report: {out / 'report.md'}")
    return results


# The demo's re-rank adds ITM's and ITC's logits; the reference adds ITM's logit to ITC's cosine, which leaves the
# re-rank to ITM alone (README, "The shapes demo"). Both are reported.
RETRIEVAL_SCORES = {"retrieval": "itm+itc_logit", "retrieval_reference": "itm+itc", "retrieval_itc": "itc"}


def learned_margins(results: dict) -> dict[str, float]:
    """How far each learned figure is above what a pipeline that learned nothing from the images would score
    (points; positive = above). A soft prompt the LM ignores gives the same captions and answers for every image, so
    the random-image baselines equal the model (margin 0); an ITC that cannot move the image features leaves the
    ITC-only recall near chance."""
    r, itc, chance = results["retrieval"], results["retrieval_itc"], results["retrieval_chance"]
    ref = results["retrieval_reference"]
    margins = {
        "text_r1_over_chance": r["txt_r1"] - chance["txt_r1"],
        "image_r1_over_chance": r["img_r1"] - chance["img_r1"],
        "itc_r_mean_over_chance": itc["r_mean"] - chance["r_mean"],
        "rerank_text_r1_over_itc": r["txt_r1"] - itc["txt_r1"],
        "rerank_image_r1_over_itc": r["img_r1"] - itc["img_r1"],
        "reference_rerank_text_r1_over_itc": ref["txt_r1"] - itc["txt_r1"],
        "reference_rerank_image_r1_over_itc": ref["img_r1"] - itc["img_r1"],
        "cider_over_most_common_caption": 100 * (results["caption"]["CIDEr"] - results["caption_baseline"]["CIDEr"]),
        "cider_over_random_image": 100 * (results["caption"]["CIDEr"] - results["caption_random_image"]["CIDEr"]),
    }
    for llm, runs in results["vqa"].items():
        image, blind = runs["image"], runs["blind"]
        margins[f"vqa_{llm}_over_blind"] = image["overall"] - blind["overall"]
        margins[f"vqa_{llm}_over_random_image"] = image["overall"] - runs["random_image"]["overall"]
        for qtype in sorted(image["per_question_type"]):
            per = image["per_question_type"][qtype] - blind["per_question_type"][qtype]
            margins[f"vqa_{llm}_{qtype}_over_blind"] = per
    return margins


# -- baselines ------------------------------------------------------------------------------------------------------


def _retrieval_chance(ann_path: str) -> dict:
    """Expected recall of a random ranking (points): text retrieval hits when any of an image's c captions is in the
    top K of all T texts, image retrieval when its one image is in the top K of I."""
    from math import comb

    entries = json.loads(Path(ann_path).read_text())
    n_img = len(entries)
    per_image = [len(e["caption"]) if isinstance(e["caption"], list) else 1 for e in entries]
    n_txt = sum(per_image)
    out = {}
    for k in (1, 5, 10):
        out[f"txt_r{k}"] = 100 * sum(1 - comb(n_txt - c, k) / comb(n_txt, k) for c in per_image) / n_img
        out[f"img_r{k}"] = 100 * min(k, n_img) / n_img
    out["r_mean"] = sum(out.values()) / 6
    return out


def _most_common_caption_baseline(world: dict) -> dict:
    """Caption every test image with the train set's most common caption (the 'most common scene')."""
    from collections import Counter

    from tasks.evals.caption import caption_scores

    train = json.loads(Path(world["train_captions"]).read_text())
    caption = Counter(e["caption"] for e in train).most_common(1)[0][0]
    gt = json.loads(Path(world["test_coco_gt"]).read_text())
    gts: dict[int, list[str]] = {}
    for ann in gt["annotations"]:
        gts.setdefault(ann["image_id"], []).append(ann["caption"])
    scores = caption_scores(gts, {i: caption for i in gts}, scorers=("BLEU", "ROUGE_L", "CIDEr"))
    return {"caption": caption, **scores.metrics}


def _caption_random_image(results_path: Path, world: dict, seed: int) -> dict:
    """The model's own captions scored against the references of another (random) test image: what captions that
    ignore the image (fluent, but about no image in particular) would score."""
    from tasks.evals.caption import caption_scores

    captions = {x["image_id"]: x["caption"] for x in json.loads(Path(results_path).read_text())}
    gts: dict[int, list[str]] = {}
    for ann in json.loads(Path(world["test_coco_gt"]).read_text())["annotations"]:
        gts.setdefault(ann["image_id"], []).append(ann["caption"])
    ids = sorted(gts)
    mapping = _derangement(ids, seed)
    scores = caption_scores(gts, {i: captions[mapping[i]] for i in ids}, scorers=("BLEU", "ROUGE_L", "CIDEr"))
    return dict(scores.metrics)


def _derangement(ids: list[int], seed: int) -> dict[int, int]:
    """A random mapping of each id to a different one."""
    rng = random.Random(seed)
    moved = ids[:]
    while len(ids) > 1 and any(a == b for a, b in zip(ids, moved, strict=True)):
        rng.shuffle(moved)
    return dict(zip(ids, moved, strict=True))


def _shuffled_questions(path: str, out: Path, seed: int) -> Path:
    """The same questions asked about another (random) test image: a pipeline that ignores the image scores the same."""
    data = json.loads(Path(path).read_text())
    mapping = _derangement(sorted({q["image_id"] for q in data["questions"]}), seed)
    for q in data["questions"]:
        q["image_id"] = mapping[q["image_id"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data))
    return out


@torch.no_grad()
def _blind_vqa(checkpoint: Path, world: dict, out: Path) -> dict:
    """The same frozen LM, the same prompt and decoding, no image at all."""
    from qformer.checkpoint import load_pretrained
    from tasks.data.text import clean_question
    from tasks.evals.common import generation_config
    from tasks.evals.config import load_eval_config
    from tasks.evals.metrics import vqa_metrics

    cfg = load_eval_config(str(CONFIGS / "eval_vqa.yaml"), [f"checkpoint={checkpoint}", f"output_dir={out}"])
    model = load_pretrained(checkpoint)
    questions = json.loads(Path(world["test_questions"]).read_text())["questions"]
    annotations = json.loads(Path(world["test_annotations"]).read_text())["annotations"]
    tok = model.tokenizer
    side = "right" if model.is_encoder_decoder else "left"
    decoding, end = generation_config(cfg), model.end_token_id  # the settings the image-conditioned answers use
    answers = {}
    for start in range(0, len(questions), cfg.batch_size):
        batch = questions[start : start + cfg.batch_size]
        prompts = [cfg.prompt.format(clean_question(q["question"])) for q in batch]
        enc = tok(prompts, padding="longest", return_tensors="pt", padding_side=side)
        ids = model.llm.generate(**enc, **decoding.generate_kwargs(eos_token_id=end, pad_token_id=tok.pad_token_id))
        if not model.is_encoder_decoder:
            ids = ids[:, enc.input_ids.shape[1] :]
        for q, text in zip(batch, tok.batch_decode(ids, skip_special_tokens=True), strict=True):
            answers[q["question_id"]] = text.strip()
    metrics = vqa_metrics(answers, annotations, version=cfg.vqa_eval_version)
    write_json(out / "metrics.json", {k: v for k, v in metrics.items() if k != "per_question"})
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `qformer demo` and `python -m tasks.shapes.demo`."""
    parser.add_argument(
        "--out", default="runs/shapes", help="the folder for everything the demo writes (parts, runs, report.md)"
    )
    parser.add_argument("--fast", action="store_true", help="a smaller world and fewer steps (CI: a few minutes)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the world, its stage-0 parts and the baselines' shuffles"
    )
    parser.add_argument(
        "--clean", action="store_true", help="delete OUT first (otherwise finished parts of a run there are reused)"
    )
    parser.add_argument(
        "--instruct",
        action="store_true",
        help="then instruction-tune the stage-2 model on three question types, hold the fourth out (OUT/instruct)",
    )
    parser.add_argument(
        "--capfilt",
        action="store_true",
        help="then CapFilt a noisy web caption set and retrain stage 1 on what it keeps (OUT/capfilt)",
    )
    parser.set_defaults(log_level=logging.WARNING)


def run(args: argparse.Namespace) -> int:
    if args.clean:
        shutil.rmtree(args.out, ignore_errors=True)
    run_demo(args.out, fast=args.fast, seed=args.seed)
    # The variants reuse the demo's finished parts (world, stage 0, stage 1, stage 2) and write beside them.
    if args.instruct:
        from tasks.shapes.instruct import run_instruct

        run_instruct(args.out, fast=args.fast, seed=args.seed)
    if args.capfilt:
        from tasks.shapes.capfilt import run_capfilt

        run_capfilt(args.out, fast=args.fast, seed=args.seed)
    return 0


def main(argv: list[str] | None = None) -> int:
    return command.main("demo", add_arguments, run, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
