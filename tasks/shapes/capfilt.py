"""`qformer demo --capfilt`: CapFilt (BLIP's bootstrapped captions, as BLIP-2's web data was made) in the shapes world,
on the finished demo's parts.

    web       one "web" caption per image, half of them wrong for their image (seeded): a caption of another image,
              or the image's own caption with one object's colour or shape word swapped; for the training images
              (`web_train.json`) and, to measure the filter on images no model trained on, the test images
              (`web_test.json`)
    noisy     stage 1 on the web training captions: the demo's own stage-1 run (`OUT/stage1/config.yaml`: the model,
              steps, batch and optimiser exactly as the demo trained it) with the data swapped
    filter    the noisy model fine-tuned on a small clean subset (`clean_fraction` of the training images with their
              true captions), as BLIP fine-tunes its filter on COCO: its ITC is the ranker
    captioner a stage-2 OPT model (the demo's stage-2 run, `OUT/stage2_opt/config.yaml`, with the data swapped and
              more steps) trained on the same clean subset from the filter's Q-Former; BLIP-2 is itself such a
              captioner. The stage-1 Q-Former's own LM was tried first and was far worse (see below)
    capfilt   `qformer capfilt` (tasks.capfilt, configs/shapes/capfilt.yaml) over the web sets: N nucleus-sampled
              captions per image, ranked with the web caption by ITC, the top 2 kept
    filtered  stage 1 again, on the kept training captions (a step samples one of an image's two), same budget
    evaluate  on the held-out test images: the fraction of kept captions that are correct (`world.caption_correct`)
              against the web captions' (50%), and retrieval R@1 of the noisy and the filtered stage 1

Writes `OUT/capfilt/results.json` and `OUT/capfilt/report.md`; prints `[capfilt] name: value` lines. Finished runs
under `OUT/capfilt` are reused. `retrain=False` stops after the test set's CapFilt (no training-set CapFilt, no
filtered run, no retrieval): the CI test's path.

Why a caption counts as correct only when the grammar makes it for exactly that scene: see `caption_correct`.

Measured (seed 0, the full demo; kept-caption correctness minus the web captions' 50%, on the test images):
-11.8 points (38.2% of kept captions exactly right; the training images: 34.1%); retrieval R@1 (text, image) of stage
1 trained on the web captions 15.0 / 12.9, on the kept ones 87.0 / 84.6 (+72.0, +71.7). The filter works (it keeps
44% of the correct web captions and 8% of the wrong ones). That is the run of 2026-12-01 (2 Intel Xeon cores, CPU
dropout masks from 16-bit draws: `qformer.dropout`); the two runs before, with other dropout draws, gave -6.2 (43.8%,
R@1 34.5 / 26.4 -> 70.5 / 67.7) and -9.2 (40.8%, R@1 13.5 / 7.9 -> 79.0 / 72.6, 2 AMD EPYC cores), and the figures
below came from the code of those runs. The fast demo: -9.5
points, R@1 52.0 / 41.8 -> 83.0 / 70.6 (the variant 127 s). In both, the captioner is what holds correctness
below the bar of +30: its samples are exactly right for one-object scenes but seldom for three (test images, 10
nucleus samples each:
67.9% of one-object, 3.7% of two-object, 0% of three-object samples right; greedy 100% / 5.3% / 0%), so for most
multi-object images the kept pair holds a wrong synthetic caption. With the stage-1 Q-Former's LM as the captioner
(this variant's first form) kept-caption correctness was 12.8% (-37.2) and the filtered run's R@1 26.0 / 23.8. What
the captioner lacks, measured with stage-2 OPT captioners trained on all 4000 clean training images: after 2500
steps greedy captions are right for 100% / 5.3% / 0% of one- / two- / three-object test images; after 8500 steps
with captions written in reading order (one template), 100% / 98.2% / 11.4%: a captioner that writes three-object
scenes needs far more training than this demo's budget.

The ranker is not what is missing (test images, 10 samples + the web caption each, top 2; seed 0): kept captions
right with this variant's captioner 41.5% by the filter's ITC, 43.2% by its ITM head, 56.8% by an oracle; with the
8500-step reading-order captioner above 50.8%, 52.0%, 71.5%. Its samples of three-object scenes are 1.3% right, and
those are a third of the images. Writing the captions in reading order with the position first ("at the top left a
big red circle and ..."), or sampling at temperature 0.5-0.7, did not help either (greedy two-object captions 28%
right against 40% in reading order with the position last; the oracle within 1.5 points).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from tasks.evals.common import write_json, write_text
from tasks.shapes.demo import CONFIGS, RETRIEVAL_SCORES, Laps, _eval, _stage
from tasks.shapes.world import COLOURS, SHAPES, caption_correct, load_scenes, load_world, scene_captions

logger = logging.getLogger(__name__)

# Bumped when what the variant trains or runs after the noisy stage 1 changes, so that parts made by older code are
# not reused (the noisy stage 1 depends only on the demo's stage 1 and stays). 2: the captioner is a stage-2 OPT.
RUNS = 2
DOWNSTREAM = ("filter", "captioner", "filter_test", "filter_train", "filtered", "eval")
FIGURES = ("web_correct", "kept_correct", "wrong_web_kept", "correct_web_kept")  # printed, per CapFilt'd split
NOISE = ("other_image", "colour", "shape")  # half of the wrong captions are another image's, a quarter each swap


@dataclass(frozen=True)
class CapfiltPreset:
    wrong: float  # fraction of web captions that are wrong for their image
    clean_fraction: float  # training images the filter and captioner are trained on, with their true captions
    filter_steps: int  # the noisy stage 1 fine-tuned on the clean subset: the ITC ranker
    filter_lr: float
    filter_warmup: int
    captioner_steps: int  # the demo's stage-2 OPT recipe on the clean subset, from the filter's Q-Former


PRESETS = {
    "full": CapfiltPreset(
        wrong=0.5, clean_fraction=0.15, filter_steps=300, filter_lr=5e-4, filter_warmup=20, captioner_steps=3000
    ),
    "fast": CapfiltPreset(
        wrong=0.5, clean_fraction=0.15, filter_steps=150, filter_lr=1e-3, filter_warmup=10, captioner_steps=1000
    ),
}


# ------------------------------------------------------------------------------------------------------ data


def web_captions(scenes: list[dict], wrong: float, rng: random.Random) -> list[dict]:
    """One web caption per scene, in the training format plus `noise` ("none" or one of `NOISE`); exactly
    round(wrong * n) of them are wrong for their image, checked with `caption_correct`."""
    wrong_ids = set(rng.sample(range(len(scenes)), round(wrong * len(scenes))))
    entries = []
    for i, scene in enumerate(scenes):
        objects = scene["objects"]
        kind = "none"
        if i not in wrong_ids:
            caption = rng.choice(scene["captions"])
        else:
            kind = rng.choice(NOISE[:1] * 2 + NOISE[1:])
            if kind == "other_image":
                while caption_correct(caption := rng.choice(rng.choice(scenes)["captions"]), objects):
                    pass
            else:
                k = rng.randrange(len(objects))
                old = getattr(objects[k], kind)
                new = rng.choice([v for v in (COLOURS if kind == "colour" else SHAPES) if v != old])
                changed = objects[:k] + [replace(objects[k], **{kind: new})] + objects[k + 1 :]
                caption = scene_captions(changed, rng, 1)[0]
            if caption_correct(caption, objects):  # cannot happen: a swap changes a word of one object
                raise RuntimeError(f"web caption {caption!r} meant to be wrong is right for {scene['image']}")
        entries.append({"image": scene["image"], "caption": caption, "image_id": scene["image_id"], "noise": kind})
    return entries


def clean_subset(scenes: list[dict], fraction: float, rng: random.Random) -> list[dict]:
    """`fraction` of the scenes with all their true captions, one entry per caption (the world's train.json format)."""
    chosen = sorted(rng.sample(range(len(scenes)), round(fraction * len(scenes))))
    return [
        {"image": scenes[i]["image"], "caption": c, "image_id": scenes[i]["image_id"]}
        for i in chosen
        for c in scenes[i]["captions"]
    ]


def _datasets(ann_path: Path | str, image_root: str) -> str:
    return f"data.datasets=[{{ann_paths: [{ann_path}], image_root: {image_root}}}]"


# ------------------------------------------------------------------------------------------------------ measures


def kept_correctness(captions_json: Path | str, scenes_by_id: dict[int, dict]) -> dict[str, float]:
    """From a CapFilt captions.json: the fraction (points) of web captions and of kept captions that are correct for
    their image, the same for the kept captions by source, and how often a correct / wrong web caption was kept."""
    records = json.loads(Path(captions_json).read_text())
    web_ok, kept_ok, by_source = [], [], {"web": [], "synthetic": []}
    web_kept = {True: [], False: []}
    for r in records:
        objects = scenes_by_id[r["image_id"]]["objects"]
        web = r["capfilt"]["web_caption"][0]
        ok = caption_correct(web, objects)
        web_ok.append(ok)
        web_kept[ok].append(web in r["caption"])
        for caption, source in zip(r["caption"], r["capfilt"]["sources"], strict=True):
            kept_ok.append(caption_correct(caption, objects))
            by_source[source].append(kept_ok[-1])
    pct = lambda xs: 100.0 * sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {
        "images": len(records),
        "web_correct": pct(web_ok),
        "kept_correct": pct(kept_ok),
        "margin": pct(kept_ok) - pct(web_ok),
        "kept_synthetic_share": pct([s == "synthetic" for r in records for s in r["capfilt"]["sources"]]),
        "kept_synthetic_correct": pct(by_source["synthetic"]),
        "kept_web_correct": pct(by_source["web"]),
        "correct_web_kept": pct(web_kept[True]),
        "wrong_web_kept": pct(web_kept[False]),
    }


# ------------------------------------------------------------------------------------------------------ run


def run_capfilt(out: str | Path, fast: bool = False, seed: int = 0, retrain: bool = True) -> dict:
    """The CapFilt variant on the finished demo in `out` (see the module docstring); returns the results dict."""
    from tasks.capfilt.config import load_capfilt_config
    from tasks.capfilt.pipeline import capfilt

    preset = PRESETS["fast" if fast else "full"]
    out = Path(out)
    dest = out / "capfilt"
    dest.mkdir(parents=True, exist_ok=True)
    marker = dest / "capfilt.json"
    runs = json.loads(marker.read_text()).get("runs") if marker.is_file() else 1
    if runs != RUNS:
        for part in DOWNSTREAM:
            shutil.rmtree(dest / part, ignore_errors=True)
        write_json(marker, {"runs": RUNS})
    world = load_world(out / "stage0" / "world")
    image_root = world["image_root"]
    train_scenes, test_scenes = load_scenes(world, "train"), load_scenes(world, "test")
    scenes_by_id = {s["image_id"]: s for s in train_scenes + test_scenes}
    lap = Laps("capfilt")
    timings = lap.timings

    rng = random.Random(f"capfilt-{seed}")
    web = {"train": web_captions(train_scenes, preset.wrong, rng), "test": web_captions(test_scenes, preset.wrong, rng)}
    noise = {split: {k: sum(e["noise"] == k for e in rows) for k in ("none", *NOISE)} for split, rows in web.items()}
    files = {}
    # The pipeline reads the web captions without their noise labels.
    for name, rows in (
        ("web_train", [{k: v for k, v in e.items() if k != "noise"} for e in web["train"]]),
        ("web_test", [{k: v for k, v in e.items() if k != "noise"} for e in web["test"]]),
        ("clean", clean_subset(train_scenes, preset.clean_fraction, rng)),
    ):
        files[name] = dest / f"{name}.json"
        write_json(files[name], rows, indent=None)

    # The demo's stage-1 run as it ran (its saved config): only the data and where it writes change.
    stage1 = str(out / "stage1" / "config.yaml")
    noisy = _stage(
        "capfilt noisy stage 1", stage1, [_datasets(files["web_train"], image_root), f"output_dir={dest / 'noisy'}"]
    )
    lap("stage 1 on web captions")
    ranker = _stage(
        "capfilt filter",
        stage1,
        [
            _datasets(files["clean"], image_root),
            f"init_from={noisy}",
            f"optim.total_steps={preset.filter_steps}",
            f"save_every={preset.filter_steps}",
            f"optim.lr={preset.filter_lr}",
            f"optim.warmup_steps={preset.filter_warmup}",
            f"output_dir={dest / 'filter'}",
        ],
    )
    lap("filter (stage 1 fine-tuned on the clean subset)")
    # The demo's stage-2 OPT run as it ran, on the clean subset and from the filter's Q-Former, for longer.
    captioner = _stage(
        "capfilt captioner",
        str(out / "stage2_opt" / "config.yaml"),
        [
            _datasets(files["clean"], image_root),
            f"init_from={ranker}",
            f"optim.total_steps={preset.captioner_steps}",
            f"save_every={preset.captioner_steps}",
            f"output_dir={dest / 'captioner'}",
        ],
    )
    lap("captioner (stage-2 OPT on the clean subset)")

    def run_filter(split: str) -> Path:
        cfg = load_capfilt_config(
            str(CONFIGS / "capfilt.yaml"),
            [
                f"ann_paths=[{files[f'web_{split}']}]",
                f"image_root={image_root}",
                f"output_dir={dest / f'filter_{split}'}",
                f"captioner={captioner}",
                f"ranker_checkpoint={ranker}",
                f"seed={seed}",
            ],
        )
        return capfilt(cfg)

    results: dict = {"timings": timings, "preset": preset.__dict__, "web_noise": noise}
    results["test"] = kept_correctness(run_filter("test"), scenes_by_id)
    lap("capfilt (test images)")
    if retrain:
        results["train"] = kept_correctness(filtered_json := run_filter("train"), scenes_by_id)
        lap("capfilt (training images)")
        filtered = _stage(
            "capfilt filtered stage 1",
            stage1,
            [_datasets(filtered_json, image_root), f"output_dir={dest / 'filtered'}"],
        )
        lap("stage 1 on kept captions")
        for name, checkpoint in (("noisy", noisy), ("filtered", filtered)):
            results[f"retrieval_{name}"] = _eval(
                "eval_retrieval.yaml",
                [
                    f"checkpoint={checkpoint}",
                    f"ann_path={world['test_retrieval']}",
                    f"image_root={image_root}",
                    f"output_dir={dest / 'eval' / name}",
                    f"score={RETRIEVAL_SCORES['retrieval']}",
                ],
            )
        lap("retrieval")
    results["checks"] = margins(results)
    write_text(dest / "results.json", json.dumps(results, indent=1, default=str))
    write_report(dest, results, scenes_by_id)
    figures = {f"{split}_{k}": results[split][k] for split in ("test", "train") if split in results for k in FIGURES}
    for name in ("noisy", "filtered"):
        if f"retrieval_{name}" in results:
            figures |= {f"{name}_{k}": results[f"retrieval_{name}"][k] for k in ("txt_r1", "img_r1")}
    for name, value in figures.items():
        print(f"[capfilt] {name}: {value:.1f}")
    for name, value in results["checks"].items():
        print(f"[capfilt] {name}: {value:+.1f}")
    print(f"[capfilt] report: {dest / 'report.md'}")
    return results


def margins(results: dict) -> dict[str, float]:
    """The acceptance figures (points): kept-caption correctness over the web captions' on the test images, and the
    filtered run's retrieval R@1 over the noisy run's."""
    checks = {"test_kept_correct_over_web": results["test"]["margin"]}
    if "train" in results:
        checks["train_kept_correct_over_web"] = results["train"]["margin"]
    if "retrieval_filtered" in results:
        f, n = results["retrieval_filtered"], results["retrieval_noisy"]
        checks["text_r1_filtered_over_noisy"] = f["txt_r1"] - n["txt_r1"]
        checks["image_r1_filtered_over_noisy"] = f["img_r1"] - n["img_r1"]
    return checks


# ------------------------------------------------------------------------------------------------------ report


def write_report(dest: Path, results: dict, scenes_by_id: dict[int, dict], samples: int = 6) -> Path:
    """`dest/report.md`: the correctness and retrieval table, and a few test images with their web caption and the
    captions CapFilt kept (score, source, correct or not)."""
    f = lambda x: f"{x:.1f}"  # noqa: E731
    lines = ["# CapFilt in the shapes world", ""]
    lines += ["Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings"].items()), ""]
    lines += [
        "A caption is correct when the world's grammar makes it for exactly that image (`caption_correct`).",
        "",
        "| images | web captions correct | kept captions correct | margin | kept: synthetic share | wrong web caption "
        "kept | correct web caption kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for split in ("test", "train"):
        if split in results:
            r = results[split]
            lines.append(
                f"| {split} ({r['images']}) | {f(r['web_correct'])} | {f(r['kept_correct'])} | {r['margin']:+.1f} | "
                f"{f(r['kept_synthetic_share'])} | {f(r['wrong_web_kept'])} | {f(r['correct_web_kept'])} |"
            )
    if "retrieval_filtered" in results:
        lines += [
            "",
            "## Retrieval on the held-out test images (stage 1, same steps and batch)",
            "",
            "| trained on | text R@1 | image R@1 | text R@5 | image R@5 |",
            "|---|---|---|---|---|",
        ]
        for name, label in (("noisy", "web captions (half wrong)"), ("filtered", "CapFilt's kept captions")):
            m = results[f"retrieval_{name}"]
            lines.append(f"| {label} | {f(m['txt_r1'])} | {f(m['img_r1'])} | {f(m['txt_r5'])} | {f(m['img_r5'])} |")
    lines += ["", "## Checks (points)", ""] + [f"- {k}: {v:+.1f}" for k, v in results["checks"].items()]
    records = json.loads((dest / "filter_test" / "captions.json").read_text())[:samples]
    lines += ["", "## Test images: web caption and kept captions", ""]
    for r in records:
        objects = scenes_by_id[r["image_id"]]["objects"]
        mark = lambda c, objects=objects: "right" if caption_correct(c, objects) else "WRONG"  # noqa: E731
        web = r["capfilt"]["web_caption"][0]
        lines += [f"![{r['image']}](../stage0/world/images/{r['image']})", ""]
        lines += [f"- web: {web} ({mark(web)}, score {r['capfilt']['web_scores'][0]:.3f})"]
        for c, score, source in zip(r["caption"], r["capfilt"]["scores"], r["capfilt"]["sources"], strict=True):
            lines += [f"- kept, {source}: {c} ({mark(c)}, score {score:.3f})"]
        lines.append("")
    path = dest / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path
