"""The demo's report: `OUT/report.md` with the metrics next to their baselines, the learned-or-not margins, loss curves
(PNG) and a gallery of test images with their captions and answers."""

from __future__ import annotations

import json
from pathlib import Path


def _plot_losses(out: Path, runs: dict[str, Path]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for title, run in runs.items():
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
        fig, ax = plt.subplots(figsize=(5, 3))
        for key in ("loss", "loss_itc", "loss_itm", "loss_itg"):
            if key in log[0]:
                ax.plot([r["step"] for r in log], [r[key] for r in log], label=key)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        name = f"loss_{run.name}.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        names.append(name)
    return names


def _pct(x) -> str:
    return f"{x:.1f}" if isinstance(x, (int, float)) else str(x)


def write_report(out: Path, results: dict, world: dict, stage2: dict) -> Path:
    """Write `out/report.md`, its loss plots and gallery images from the demo's results; returns its path."""
    chance = results["retrieval_chance"]
    lines = ["# The shapes world: BLIP-2 end to end on a CPU", ""]
    lines += ["Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings"].items()), ""]
    if results.get("stage0"):
        lines += _stage0_lines(results["stage0"])
    lines += [
        "## Retrieval (held-out test images: ITC, then ITM re-ranks the top k)",
        "",
        "Re-rank score: ITM logit + ITC logit (similarity / temperature); the reference's ITM logit + ITC cosine "
        "leaves the order to ITM alone.",
        "",
        "| | R@1 | R@5 | R@10 |",
        "|---|---|---|---|",
    ]
    rows = (
        ("", results["retrieval"]),
        (", reference score (ITM + cosine)", results["retrieval_reference"]),
        (", ITC only", results["retrieval_itc"]),
        (", chance", chance),
    )
    for direction, prefix in (("text", "txt"), ("image", "img")):
        for suffix, m in rows:
            cells = " | ".join(_pct(m[f"{prefix}_r{k}"]) for k in (1, 5, 10))
            lines += [f"| {direction} retrieval{suffix} | {cells} |"]
    lines += [""]
    c, base = results["caption"], results["caption_baseline"]
    lines += ["## Captioning (OPT)", "", "| | BLEU-4 | ROUGE-L | CIDEr |", "|---|---|---|---|"]
    rand = results["caption_random_image"]
    for name, m in (
        ("BLIP-2 (ours)", c),
        ("baseline: our captions, scored against a random other image", rand),
        (f'baseline: always "{base["caption"]}"', base),
    ):
        lines += [f"| {name} | {_pct(100 * m['Bleu_4'])} | {_pct(100 * m['ROUGE_L'])} | {_pct(100 * m['CIDEr'])} |"]
    lines += [""]
    lines += ["## Zero-shot VQA (the Q-Former never saw a question; VQAv2 accuracy)", ""]
    types = sorted(results["vqa"]["opt"]["image"]["per_question_type"])
    lines += ["| LM | input | overall | " + " | ".join(types) + " |", "|---" * (3 + len(types)) + "|"]
    for llm, runs in results["vqa"].items():
        for name, m in (
            ("image", runs["image"]),
            ("blind (no image)", runs["blind"]),
            ("random image", runs["random_image"]),
        ):
            per = m["per_question_type"]
            lines += [
                f"| {llm} | {name} | {_pct(m['overall'])} | " + " | ".join(_pct(per.get(t, "-")) for t in types) + " |"
            ]
    lines += [""]
    lines += _margin_lines(results["checks"])
    plots = _plot_losses(
        out, {"stage 1": out / "stage1", "stage 2 (OPT)": out / "stage2_opt", "stage 2 (T5)": out / "stage2_t5"}
    )
    lines += ["## Training", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += _gallery(out, world)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _stage0_lines(stage0: dict) -> list[str]:
    v = stage0["vit_metrics"]
    lines = [
        "## Stage 0: the frozen components (trained first, held-out validation scenes)",
        "",
        f"ViT (attribute read-outs of its tokens, used only to train it): an object fully right (shape, colour, size "
        f"and cell) {100 * v['object_all']:.1f}% (chance {100 * v['chance_object_all']:.2f}%): shape "
        f"{100 * v['object_shape']:.1f}, colour {100 * v['object_colour']:.1f}, size {100 * v['object_size']:.1f}, "
        f"cell {100 * v['object_cell']:.1f}; object count {100 * v['count']:.1f}.",
        "",
        "Language models, text only (exact-match answers): the scene's caption before the question, no caption, and "
        "the training corpus's most common answer to the question's wording:",
        "",
        "| LM | caption + question | question only | most common answer |",
        "|---|---|---|---|",
    ]
    for llm in ("opt", "t5"):
        m = stage0[f"{llm}_metrics"]
        lines += [
            f"| {llm} | {100 * m['qa_caption']:.1f} | {100 * m['qa_no_caption']:.1f} | {100 * m['qa_prior']:.1f} |"
        ]
    return lines + [""]


def _margin_lines(checks: dict) -> list[str]:
    lines = ["## Learned, or not? (points above each baseline: chance, blind, random image, ITC alone)", ""]
    lines += ["| check | margin |", "|---|---|"]
    lines += [f"| {name} | {value:+.1f} |" for name, value in checks.items()]
    return lines + [""]


def _gallery(out: Path, world: dict, n: int = 8) -> list[str]:
    from PIL import Image

    captions = {x["image_id"]: x["caption"] for x in json.loads((out / "eval/caption/results.json").read_text())}
    questions = json.loads(Path(world["test_questions"]).read_text())["questions"]
    answers = {}
    for llm in ("opt", "t5"):
        for x in json.loads((out / f"eval/vqa_{llm}/results.json").read_text()):
            answers.setdefault(x["question_id"], {})[llm] = x["answer"]
    truth = {
        a["question_id"]: a["multiple_choice_answer"]
        for a in json.loads(Path(world["test_annotations"]).read_text())["annotations"]
    }
    gallery = out / "gallery"
    gallery.mkdir(exist_ok=True)
    lines = ["## Gallery (test images)", "", "| image | caption (OPT) | questions: truth / OPT / T5 |", "|---|---|---|"]
    for image_id in sorted(captions)[:n]:
        source = Path(world["image_root"]) / world["image_pattern"].format(image_id=image_id)
        target = gallery / f"{image_id}.png"
        Image.open(source).resize((128, 128), Image.NEAREST).save(target)
        qa = [
            f"{q['question']} **{truth[q['question_id']]}** / {answers[q['question_id']].get('opt', '-')} / "
            f"{answers[q['question_id']].get('t5', '-')}"
            for q in questions
            if q["image_id"] == image_id
        ][:3]
        lines += [f"| ![]({target.relative_to(out)}) | {captions[image_id]} | {'<br>'.join(qa)} |"]
    return lines + [""]
