"""`qformer demo --instruct`: instruction tuning (InstructBLIP) in the shapes world, on the finished demo's parts.

    data      question/answer pairs of the TRAINING images (`sample_questions`, several draws per image) for three of
              the four question types, in the VQAv2 files the `kind: vqa` loader reads; the fourth type is held out
    tune      the demo's stage-2 OPT model with the instruction-aware Q-Former (`model.llm.qformer_instruction`): the
              prompted question goes to the Q-Former as well as to the frozen LM, the LM loss is on the answer only.
              Initialised from `OUT/stage2_opt/final` (queries, cross-attention, query FFN, projection) and
              `OUT/stage1/final` (the Q-Former's text side, which a plain stage-2 checkpoint does not hold), through
              `tasks.train.train` with the stage-2 run's own config (`OUT/stage2_opt/config.yaml`: the model exactly
              as the demo trained it) and the overrides below
    evaluate  on the held-out TEST images: (a) held-in VQA accuracy, tuned vs the zero-shot BLIP-2 model (the demo's
              stage-2 OPT, `OUT/results.json` `vqa`) vs the blind LM; (b) the held-out type, the same three; (c) the
              query outputs of one image under different instructions: they differ for the tuned model, and are
              identical for plain BLIP-2, whose Q-Former never reads text

Writes `OUT/instruct/results.json` and `OUT/instruct/report.md`; prints `[instruct] name: value` lines.

Choices. The held-out type is "exists" ("is there a red square?" -> yes/no): it asks for the colour and the shape of
an object together, both of which the held-in types teach the Q-Former to extract ("what colour is the circle?",
"what shape is on the left?"), in a new wording with a new answer set: InstructBLIP's claim, instruction tuning helps
unseen tasks, in miniature. It is also the one type with ten times more questions per image than the others in
`scene_questions` (twenty colour-shape pairs), so holding it out keeps the training mixture balanced. The LM is the
demo's OPT: its zero-shot answers are the steadier of the two (T5 needs five times the stage-2 steps to read the soft
prompt at all; README, "The shapes demo"), and OPT-style decoder-only LLMs are what most InstructBLIP models use
(Vicuna). The instruction is the zero-shot prompt of `configs/shapes/eval_vqa.yaml` ("Question: {} Short answer:",
the format the stage-0 LMs were trained on), so tuned and zero-shot models are asked the same way.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tasks.evals.common import write_json, write_text
from tasks.shapes.demo import CONFIGS, Laps, _eval, _stage
from tasks.shapes.world import ANSWER_TYPES, QUESTION_TYPES, load_scenes, load_world, sample_questions

logger = logging.getLogger(__name__)

HELD_OUT = "exists"
LLM = "opt"
MAX_INSTRUCTION = 32  # Q-Former tokens; a prompted question is ~12, and the shapes Q-Former has 64 positions


@dataclass(frozen=True)
class InstructPreset:
    steps: int
    batch_size: int
    lr: float
    warmup: int
    draws: int  # `sample_questions` draws per training image (repeats dropped): about this many questions per type
    feature_images: int  # test images for the instruction-awareness check (c)


PRESETS = {
    # Seed 0, training images neither cropped nor flipped (the demo's data settings): held-in +36.9 points over
    # zero-shot (99.2 against 62.3), the held-out type -3.0; 161 s of tuning on 2 cores (2026-12-01, Intel Xeon, CPU
    # dropout masks from 16-bit draws). The two runs before, with other dropout draws: +39.2 and +37.1 held-in, +13.5
    # and +15.5 held out: the held-out transfer swings with the draws, the held-in gain does not. Measured when the
    # demo still cropped and flipped (one shared core): +15.6 after 600 steps, +21.5 after 1500, +24.9 after 2000
    # (lr 2e-3: +18.4 after 1500); -29.2 with the answers shuffled within each type.
    "full": InstructPreset(steps=2000, batch_size=32, lr=1e-3, warmup=30, draws=3, feature_images=64),
    # The fast demo's stage 2 at its own peak (2e-3): held-in +42.2 after 450 steps (20 s on 2 cores; +21.8 with the
    # old cropped and flipped images), the CI test's margin (tests/test_demo_instruct.py).
    "fast": InstructPreset(steps=450, batch_size=24, lr=2e-3, warmup=15, draws=3, feature_images=32),
}


def world_paths(out: Path) -> dict[str, str]:
    """The world's paths under `out/stage0/world`, wherever it was written (a demo folder copied elsewhere keeps the
    old absolute paths in its world.json)."""
    root = out / "stage0" / "world"
    paths = load_world(root)
    old = Path(paths["root"])
    return {k: (v if k == "image_pattern" else str(root / Path(v).relative_to(old))) for k, v in paths.items()}


def vqa_prompt() -> str:
    """The zero-shot VQA prompt of the shapes eval config: the tuned model's instruction too."""
    from omegaconf import OmegaConf

    return str(OmegaConf.load(CONFIGS / "eval_vqa.yaml")["prompt"])


def write_training_qa(world: dict, dest: Path, held_out: str, draws: int, seed: int) -> dict[str, object]:
    """VQAv2 questions and annotations files (the world's own format, `write_world`) of the training images, every
    type but `held_out`; returns their paths and counts."""
    rng = random.Random(f"instruct-{seed}")
    questions, annotations = [], []
    for scene in load_scenes(world, "train"):
        seen: set[str] = set()
        for _ in range(draws):
            for qtype, question, answer in sample_questions(scene["objects"], rng):
                if qtype == held_out or question in seen:
                    continue
                seen.add(question)
                qid = scene["image_id"] * 100 + len(seen)
                questions.append({"image_id": scene["image_id"], "question": question, "question_id": qid})
                annotations.append(
                    {
                        "question_id": qid,
                        "image_id": scene["image_id"],
                        "question_type": qtype,
                        "answer_type": ANSWER_TYPES[qtype],
                        "multiple_choice_answer": answer,
                        "answers": [
                            {"answer": answer, "answer_confidence": "yes", "answer_id": i} for i in range(1, 11)
                        ],
                    }
                )
    dest.mkdir(parents=True, exist_ok=True)
    q_path, a_path = dest / "train_questions.json", dest / "train_annotations.json"
    write_json(q_path, {"questions": questions}, indent=None)
    write_json(a_path, {"annotations": annotations}, indent=None)
    per_type = {t: sum(a["question_type"] == t for a in annotations) for t in QUESTION_TYPES if t != held_out}
    return {"questions": str(q_path), "annotations": str(a_path), "num_questions": len(questions), "per_type": per_type}


def tune(out: Path, preset: InstructPreset, data: dict, world: dict, seed: int) -> Path:
    """Instruction-tune the demo's stage-2 OPT model; returns the final checkpoint folder (a finished run is reused)."""
    stage0, stage2 = out / "stage0", out / f"stage2_{LLM}"
    dataset = (
        f"{{kind: vqa, questions: ['{data['questions']}'], ann_paths: ['{data['annotations']}'], "
        f"image_root: '{world['image_root']}', image_pattern: '{world['image_pattern']}', "
        f"instructions: ['{vqa_prompt()}']}}"
    )
    overrides = [
        # The frozen parts from this demo folder (the stage-2 config names them where that run was written).
        f"model.vision.weights={stage0 / 'vit.pth'}",
        f"model.llm.path={stage0 / LLM}",
        "model.llm.qformer_instruction=true",
        f"model.llm.max_instruction_length={MAX_INSTRUCTION}",
        f"bert={stage0 / 'bert'}",
        f"init_from={stage2 / 'final'}",
        f"init_text_from={out / 'stage1' / 'final'}",
        f"data.datasets=[{dataset}]",
        f"data.batch_size={preset.batch_size}",
        "data.num_workers=0",  # small batches of 96 px images: loading in the training process is faster on 2 cores
        f"optim.total_steps={preset.steps}",
        f"optim.warmup_steps={preset.warmup}",
        f"optim.lr={preset.lr}",
        f"save_every={preset.steps}",
        "deterministic=true",
        f"seed={seed}",
        f"output_dir={out / 'instruct' / 'tuned'}",
    ]
    return _stage("instruct", str(stage2 / "config.yaml"), overrides)


# -- (c): instruction-aware features ---------------------------------------------------------------------------------


@torch.no_grad()
def query_outputs(model, images: torch.Tensor, instructions: list[str]) -> torch.Tensor:
    """The Q-Former's query outputs `[B, Q, D]` (before the projection into the LM); a plain BLIP-2 model's
    Q-Former has no text input, so it is given none."""
    from qformer.instruct import instruction_queries

    embeds = model.ln_vision(model.visual(images).float())
    if model.instruct:
        ids, mask = model.instruction_inputs(instructions)
        return instruction_queries(model.qformer, embeds, ids, mask)
    return model.qformer(image_embeds=embeds).hidden


def feature_differences(checkpoint: Path, world: dict, n_images: int) -> dict[str, float]:
    """Relative L2 distance between one image's query outputs under its test questions' instructions (one per type),
    ||a - b|| / mean(||a||, ||b||) over every pair, averaged over pairs and the first `n_images` test images."""
    from qformer.checkpoint import load_pretrained
    from tasks.data.captions import load_image
    from tasks.data.transforms import eval_transform

    model = load_pretrained(checkpoint).eval()
    transform = eval_transform(model.cfg.vision.image_size)
    prompt = vqa_prompt()
    by_image: dict[int, list[str]] = {}
    for q in json.loads(Path(world["test_questions"]).read_text())["questions"]:
        by_image.setdefault(q["image_id"], []).append(prompt.format(q["question"]))
    distances = []
    for image_id in sorted(by_image)[:n_images]:
        instructions = by_image[image_id]
        image = transform(load_image(Path(world["image_root"]) / world["image_pattern"].format(image_id=image_id)))
        feats = query_outputs(model, image[None].expand(len(instructions), -1, -1, -1), instructions).flatten(1)
        norms = feats.norm(dim=1)
        for i in range(len(feats)):
            for j in range(i + 1, len(feats)):
                distances.append(float((feats[i] - feats[j]).norm() / ((norms[i] + norms[j]) / 2)))
    return {
        "mean_relative_l2": sum(distances) / len(distances),
        "max_relative_l2": max(distances),
        "min_relative_l2": min(distances),
        "images": min(n_images, len(by_image)),
        "pairs": len(distances),
    }


# -- the variant -----------------------------------------------------------------------------------------------------


def _mean(per_type: dict[str, float], types: list[str]) -> float:
    return sum(per_type[t] for t in types) / len(types)


def run_instruct(out: str | Path, fast: bool = False, seed: int = 0) -> dict:
    """Instruction-tune the finished demo in `out` on three question types and evaluate (module docstring)."""
    out = Path(out)
    preset = PRESETS["fast" if fast else "full"]
    demo = json.loads((out / "results.json").read_text())
    world = world_paths(out)
    folder = out / "instruct"
    torch.set_num_threads(min(2, torch.get_num_threads()))
    lap = Laps("instruct")
    timings = lap.timings

    held_in = [t for t in QUESTION_TYPES if t != HELD_OUT]
    data = write_training_qa(world, folder / "data", HELD_OUT, preset.draws, seed)
    tuned = tune(out, preset, data, world, seed)
    lap("instruction tuning")
    common = [f"annotations={world['test_annotations']}", f"image_root={world['image_root']}"]
    tuned_vqa = _eval(
        "eval_vqa.yaml",
        [f"checkpoint={tuned}", f"questions={world['test_questions']}", *common, f"output_dir={folder / 'eval'}"],
    )
    lap("VQA")
    models = {
        "tuned": tuned_vqa,
        "zero_shot": demo["vqa"][LLM]["image"],
        "blind": demo["vqa"][LLM]["blind"],
    }
    vqa = {
        name: {
            "per_type": dict(m["per_question_type"]),
            "held_in": _mean(m["per_question_type"], held_in),
            "held_out": m["per_question_type"][HELD_OUT],
        }
        for name, m in models.items()
    }
    features = {
        "tuned": feature_differences(tuned, world, preset.feature_images),
        "plain": feature_differences(out / f"stage2_{LLM}" / "final", world, preset.feature_images),
    }
    lap("features")
    checks = {
        "held_in_over_zero_shot": vqa["tuned"]["held_in"] - vqa["zero_shot"]["held_in"],
        "held_in_over_blind": vqa["tuned"]["held_in"] - vqa["blind"]["held_in"],
        "held_out_over_zero_shot": vqa["tuned"]["held_out"] - vqa["zero_shot"]["held_out"],
        "held_out_over_blind": vqa["tuned"]["held_out"] - vqa["blind"]["held_out"],
    }
    results = {
        "llm": LLM,
        "held_in": held_in,
        "held_out": HELD_OUT,
        "preset": asdict(preset),
        "seed": seed,
        "train_data": data,
        "checkpoint": str(tuned),
        "vqa": vqa,
        "features": features,
        "checks": checks,
        "timings": timings,
    }
    write_json(folder / "results.json", results)
    write_text(folder / "report.md", report(results))
    for name, value in checks.items():
        print(f"[instruct] {name}: {value:+.1f}")
    for name, f in features.items():
        print(f"[instruct] query outputs across instructions, {name}: {f['mean_relative_l2']:.4f} (relative L2)")
    print(f"[instruct] report: {folder / 'report.md'}")
    return results


def report(results: dict) -> str:
    """`OUT/instruct/report.md`: the accuracy table and the feature differences."""
    vqa, held_in, held_out = results["vqa"], results["held_in"], results["held_out"]
    p = results["preset"]
    lines = [
        "# Instruction tuning in the shapes world (InstructBLIP's recipe on the demo's BLIP-2)",
        "",
        f"The demo's stage-2 {results['llm'].upper()} model, instruction-tuned with the instruction-aware Q-Former "
        f"(the prompted question goes to the Q-Former and to the frozen LM; LM loss on the answer only) on "
        f"{results['train_data']['num_questions']} question/answer pairs of the training images, types "
        f"{', '.join(held_in)} ({p['steps']} steps of {p['batch_size']}, lr {p['lr']}); **{held_out}** held out. "
        "Test images, VQAv2 accuracy:",
        "",
        "| model | " + " | ".join(held_in) + " | held-in mean | " + f"held out: {held_out} |",
        "|---" * (len(held_in) + 3) + "|",
    ]
    names = {
        "tuned": "instruction-tuned",
        "zero_shot": "zero-shot BLIP-2 (the demo's stage 2)",
        "blind": "blind LM (no image)",
    }
    for key, name in names.items():
        m = vqa[key]
        cells = " | ".join(f"{m['per_type'][t]:.1f}" for t in held_in)
        lines += [f"| {name} | {cells} | {m['held_in']:.1f} | {m['held_out']:.1f} |"]
    lines += ["", "| check | margin (points) |", "|---|---|"]
    lines += [f"| {name} | {value:+.1f} |" for name, value in results["checks"].items()]
    f = results["features"]
    lines += [
        "",
        "## Instruction-aware features",
        "",
        "Q-Former query outputs of one test image under the instructions of its test questions (one per type), "
        f"relative L2 distance ||a - b|| / mean(||a||, ||b||) over every pair ({f['tuned']['images']} images, "
        f"{f['tuned']['pairs']} pairs):",
        "",
        "| model | mean | min | max |",
        "|---|---|---|---|",
    ]
    for key, name in (("tuned", "instruction-tuned"), ("plain", "plain BLIP-2 (its Q-Former never reads text)")):
        d = f[key]
        lines += [f"| {name} | {d['mean_relative_l2']:.4f} | {d['min_relative_l2']:.4f} | {d['max_relative_l2']:.4f} |"]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings"].items()), ""]
    return "\n".join(lines)
