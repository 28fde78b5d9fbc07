"""The VQA, GQA and captioning evaluators end to end, on tiny data written here in the real formats.

A tiny stage-2 model (the tiny OPT of tasks.tiny_assets) is saved with `save_pretrained` and loaded back as the
evaluators' caller would. Every check compares with numbers made independently here: the model's own answers and
captions (one image at a time), the VQA leave-one-out accuracy from a separate implementation, and pycocoevalcap's
scorers called directly. Two processes (gloo on CPU, file rendezvous) must write exactly what one process writes.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from qformer.caption import GenerationConfig
from qformer.checkpoint import load_pretrained, save_pretrained
from qformer.config import Blip2Config, LLMConfig
from qformer.stage2 import Blip2Stage2
from tasks.data.text import clean_question
from tasks.data.transforms import eval_transform
from tasks.dist import teardown_distributed
from tasks.evals import caption as caption_module
from tasks.evals.caption import caption_scores, evaluate_caption, image_id_from_name, spice_unavailable_reason
from tasks.evals.common import ImageReadError
from tasks.evals.config import EvalConfig, load_eval_config
from tasks.evals.metrics import normalize_answer, normalize_gqa_prediction
from tasks.evals.report import retrieval_report
from tasks.evals.vqa import evaluate_vqa
from tasks.tiny_assets import tiny_opt_folder

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "eval"
IMAGE_SIZE = 28  # the tiny preset's
VQA_DECODING = dict(num_beams=3, max_new_tokens=5, min_new_tokens=1, length_penalty=-1.0)
CAPTION_DECODING = dict(prompt="a photo of", num_beams=2, max_new_tokens=6, min_new_tokens=2, length_penalty=1.0)
FAST_SCORERS = ("BLEU", "CIDEr")  # METEOR's JVM takes ~20 s to start: only the full caption test pays for it

# VQAv2 questions in file order (ids deliberately unsorted): (question_id, image_id, question, answer_type,
# how many of the 10 annotators give the model's own answer).
VQA_QUESTIONS = [
    (301, 42, "what colour is the cat ?", "other", 10),
    (102, 42, "how many dogs are there ?", "number", 4),
    (203, 7, "Is the SKY blue (or green)?", "yes/no", 3),
    (104, 7, "what is on the <b>table</b> ?", "other", 2),
    (505, 1234, "what is the bird sitting on ?", "other", 1),
    (406, 1234, "how many cat are in the picture ?", "number", 0),
    (107, 99, "what colour is the sky ?", "other", 5),
]
# GQA: question id (a string, as in GQA's files) -> (imageId, question, whether the annotated answer is the model's).
GQA_QUESTIONS = {
    "2010": ("n501", "what colour is the bird ?", True),
    "301": ("n502", "is the dog big ?", False),
    "20": ("n501", "what is under the table ?", True),
    "4": ("n503", "How many BIRD are there?", False),
    "55": ("n503", "what is the cat sitting on ?", True),
}
CAPTION_IMAGES = [42, 7, 1234, 99]  # COCO val2014 images captioned; 42 and 7 are "in-domain", the rest "out-domain"
DOMAINS = {42: "in-domain", 7: "in-domain", 1234: "out-domain", 99: "out-domain"}


def coco_name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


def write_jpeg(path: Path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


def tiny_stage2(llm_path: Path) -> Blip2Stage2:
    """A tiny stage-2 model whose output depends on the image: zero query tokens (so the queries carry only what
    cross-attention reads from the image), every other Q-Former weight and the ViT re-randomised."""
    cfg = Blip2Config.preset("tiny")
    cfg = dataclasses.replace(
        cfg,
        qformer=cfg.qformer.replace(hidden_dropout=0.0, attention_dropout=0.0),
        llm=LLMConfig(path=str(llm_path), dtype="fp32"),
    )
    torch.manual_seed(0)
    model = Blip2Stage2(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("visual."):
                p.normal_(0.0, 0.3)
            elif name == "qformer.query_tokens":
                p.zero_()
            elif not name.startswith("llm."):
                p.normal_(0.0, 1.0)
    return model.eval()


def load_for_test(path: Path) -> torch.Tensor:
    """`[1, 3, S, S]`: the image read with PIL directly and the eval transform."""
    with Image.open(path) as img:
        return eval_transform(IMAGE_SIZE)(img.convert("RGB"))[None]


def leave_one_out_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy written out plainly: mean over the 10 leave-one-out subsets of min(1, matches / 3)."""
    per_subset = []
    for left_out in range(len(answers)):
        others = answers[:left_out] + answers[left_out + 1 :]
        per_subset.append(min(1.0, sum(a == prediction for a in others) / 3))
    return sum(per_subset) / len(per_subset)


def vqa_gt_answers(own: str, matches: int) -> list[str]:
    return [own] * matches + ["zebra"] * (10 - matches)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """Checkpoint folder, COCO-style and GQA-style images, VQA and GQA questions files."""
    root = tmp_path_factory.mktemp("eval_assets")
    save_pretrained(tiny_stage2(tiny_opt_folder(root / "opt")), root / "ckpt")
    coco = root / "coco" / "val2014"
    for n, image_id in enumerate(sorted({q[1] for q in VQA_QUESTIONS} | set(CAPTION_IMAGES))):
        write_jpeg(coco / coco_name(image_id), seed=n)
    gqa = root / "gqa" / "images"
    for n, image_id in enumerate(sorted({v[0] for v in GQA_QUESTIONS.values()})):
        write_jpeg(gqa / f"{image_id}.jpg", seed=100 + n)
    questions = {
        "info": {"description": "tiny"},
        "questions": [{"image_id": i, "question": q, "question_id": qid} for qid, i, q, _, _ in VQA_QUESTIONS],
    }
    (root / "vqa_questions.json").write_text(json.dumps(questions))
    return {"root": root, "ckpt": root / "ckpt", "coco": coco, "gqa": gqa, "questions": root / "vqa_questions.json"}


@pytest.fixture(scope="module")
def model(assets) -> Blip2Stage2:
    return load_pretrained(assets["ckpt"])


@pytest.fixture(scope="module")
def own_answers(model, assets) -> dict[int, str]:
    """The model's answer to each VQA question, one question at a time, cleaned as LAVIS's question processor does
    (lower-case, . ! " ( ) * # : ; ~ deleted)."""
    gen = GenerationConfig(**VQA_DECODING)
    prompt = EvalConfig.prompt
    answers = {}
    for qid, image_id, question, _, _ in VQA_QUESTIONS:
        image = load_for_test(assets["coco"] / coco_name(image_id))
        answers[qid] = model.predict_answers([clean_question(question)], images=image, prompt=prompt, cfg=gen)[0]
    assert len({normalize_answer(a) for a in answers.values()}) >= 4, answers  # the images/questions steer it
    return answers


@pytest.fixture(scope="module")
def vqa_annotations(assets, own_answers) -> Path:
    """Official-format annotations whose 10 answers contain the model's own (normalized) answer 0-10 times."""
    anns = []
    for qid, image_id, question, answer_type, matches in VQA_QUESTIONS:
        answers = vqa_gt_answers(normalize_answer(own_answers[qid]), matches)
        anns.append(
            {
                "question_id": qid,
                "image_id": image_id,
                "question_type": " ".join(question.split()[:2]),
                "answer_type": answer_type,
                "multiple_choice_answer": answers[0],
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": k} for k, a in enumerate(answers, start=1)
                ],
            }
        )
    path = assets["root"] / "vqa_annotations.json"
    path.write_text(json.dumps({"info": {}, "annotations": anns}))
    return path


def vqa_config(assets, output_dir: Path, **changes) -> EvalConfig:
    values = dict(
        task="vqa",
        checkpoint=str(assets["ckpt"]),
        output_dir=str(output_dir),
        questions=str(assets["questions"]),
        image_root=str(assets["coco"]),
        batch_size=3,
        num_workers=0,
        report_samples=len(VQA_QUESTIONS),
        **VQA_DECODING,
    )
    return EvalConfig(**{**values, **changes})


def gqa_files(assets, own: dict[str, str], name: str, broken_at: int | None = None) -> Path:
    """A GQA balanced-questions file; the answer is the model's own (normalized) where GQA_QUESTIONS says so."""
    entries = {}
    for n, (qid, (image_id, question, correct)) in enumerate(GQA_QUESTIONS.items()):
        answer = normalize_gqa_prediction(own[qid]) if correct else "zebra"
        if n == broken_at:
            image_id = "broken"
        entries[qid] = {"imageId": image_id, "question": question, "answer": answer, "fullAnswer": answer + "."}
    path = assets["root"] / name
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture(scope="module")
def gqa_own(model, assets) -> dict[str, str]:
    gen = GenerationConfig(**VQA_DECODING)
    return {
        qid: model.predict_answers(
            [clean_question(question)],
            images=load_for_test(assets["gqa"] / f"{image_id}.jpg"),
            prompt=EvalConfig.prompt,
            cfg=gen,
        )[0]
        for qid, (image_id, question, _) in GQA_QUESTIONS.items()
    }


@pytest.fixture(scope="module")
def broken_image(assets) -> Path:
    path = assets["gqa"] / "broken.jpg"
    write_jpeg(path, seed=7)
    path.write_bytes(path.read_bytes()[:200])  # truncated JPEG
    return path


# ---------------------------------------------------------------------------------------------------- VQA, GQA


def test_leave_one_out_reference_on_hand_checked_cases():
    # 0..3 matching annotators out of 10 give 0, 0.3, 0.6, 0.9; four or more give 1.
    expected = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9, 4: 1.0, 5: 1.0, 10: 1.0}
    for matches, acc in expected.items():
        assert leave_one_out_accuracy("cat", vqa_gt_answers("cat", matches)) == pytest.approx(acc)


def test_vqa_end_to_end(model, assets, own_answers, vqa_annotations, tmp_path):
    cfg = vqa_config(assets, tmp_path / "vqa", annotations=str(vqa_annotations))
    metrics = evaluate_vqa(model, cfg, "cpu")

    results = json.loads((tmp_path / "vqa" / "results.json").read_text())
    assert results == [{"question_id": qid, "answer": own_answers[qid]} for qid in sorted(own_answers)]
    assert json.loads((tmp_path / "vqa" / "metrics.json").read_text()) == metrics

    accuracy = {
        qid: leave_one_out_accuracy(
            normalize_answer(own_answers[qid]), vqa_gt_answers(normalize_answer(own_answers[qid]), m)
        )
        for qid, _, _, _, m in VQA_QUESTIONS
    }
    assert [round(100 * accuracy[q[0]], 2) for q in VQA_QUESTIONS] == [100.0, 100.0, 90.0, 60.0, 30.0, 0.0, 100.0]
    assert metrics["overall"] == round(100 * sum(accuracy.values()) / len(accuracy), 2) == 68.57
    by_type: dict[str, list[float]] = {}
    for qid, _, _, answer_type, _ in VQA_QUESTIONS:
        by_type.setdefault(answer_type, []).append(accuracy[qid])
    assert metrics["per_answer_type"] == {t: round(100 * sum(a) / len(a), 2) for t, a in by_type.items()}
    assert metrics["per_question_type"]["how many"] == 50.0 and metrics["per_question_type"]["Is the"] == 90.0
    assert (metrics["task"], metrics["num_questions"], metrics["vqa_eval_version"]) == ("vqa", 7, "lavis")

    report = (tmp_path / "vqa" / "report.html").read_text()
    assert report.count('<div class="card">') == len(VQA_QUESTIONS)
    assert report.count("data:image/jpeg;base64,") == len(VQA_QUESTIONS)
    assert "what is on the &lt;b&gt;table&lt;/b&gt; ?" in report and "<b>table" not in report
    assert html.escape(own_answers[104]) in report and "zebra ×8" in report


def test_vqa_limit_and_no_annotations(model, assets, own_answers, tmp_path):
    cfg = vqa_config(assets, tmp_path / "vqa", limit=3, batch_size=2, report_samples=2)
    metrics = evaluate_vqa(model, cfg, "cpu")
    results = json.loads((tmp_path / "vqa" / "results.json").read_text())
    first = sorted(q[0] for q in VQA_QUESTIONS[:3])
    assert results == [{"question_id": qid, "answer": own_answers[qid]} for qid in first]
    assert metrics["num_questions"] == 3 and "overall" not in metrics and "evaluation server" in metrics["note"]
    assert (tmp_path / "vqa" / "report.html").read_text().count('<div class="card">') == 2


def test_vqa_questions_without_annotation_are_an_error(model, assets, tmp_path):
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"annotations": [{"question_id": 301, "answers": [{"answer": "yes"}] * 10}]}))
    with pytest.raises(ValueError, match="102"):
        evaluate_vqa(model, vqa_config(assets, tmp_path / "out", annotations=str(path)), "cpu")
    assert not (tmp_path / "out" / "results.json").exists()


def test_vqa_annotations_without_10_answers_warn_or_refuse(model, assets, vqa_annotations, tmp_path, caplog):
    data = json.loads(vqa_annotations.read_text())
    data["annotations"][1]["answers"] = data["annotations"][1]["answers"][:3]  # question 102: 3 answers, not 10
    data["annotations"][4]["answers"] = data["annotations"][4]["answers"][:3]
    data["annotations"][5]["answers"] = data["annotations"][5]["answers"][:11] * 2  # 406: 20
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(data))
    cfg = vqa_config(assets, tmp_path / "vqa", annotations=str(path), limit=3)
    with caplog.at_level("WARNING"):
        metrics = evaluate_vqa(model, cfg, "cpu")
    counts = "3 of 7 annotations have other than 10 answers (2 with 3, 1 with 20; e.g. question_id 102, 505, 406)"
    assert counts in caplog.text
    assert metrics["annotations_without_10_answers"] == 1  # of the 3 questions evaluated, only 102
    assert metrics["num_questions"] == 3 and "overall" in metrics
    strict = dataclasses.replace(cfg, strict_annotations=True, output_dir=str(tmp_path / "strict"))
    with pytest.raises(ValueError, match=r"odd.json: 3 of 7 annotations .*refused \(strict_annotations=true\)"):
        evaluate_vqa(model, strict, "cpu")
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize("prompt", ["Question: Short answer:", "Question: {q} Short answer:", "{} or {}?"])
def test_vqa_prompt_needs_exactly_one_placeholder(model, assets, prompt, tmp_path):
    with pytest.raises(ValueError, match="needs exactly one '{}'"):
        evaluate_vqa(model, vqa_config(assets, tmp_path / "out", prompt=prompt), "cpu")
    with pytest.raises(ValueError, match="needs exactly one '{}'"):
        model.predict_answers(["what?"], images=torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE), prompt=prompt)


def test_gqa_end_to_end(model, assets, gqa_own, tmp_path):
    questions = gqa_files(assets, gqa_own, "gqa_testdev.json")
    cfg = EvalConfig(
        task="gqa",
        checkpoint=str(assets["ckpt"]),
        output_dir=str(tmp_path / "gqa"),
        questions=str(questions),
        image_root=str(assets["gqa"]),
        batch_size=2,
        num_workers=0,
        **VQA_DECODING,
    )
    metrics = evaluate_vqa(model, cfg, "cpu")
    results = json.loads((tmp_path / "gqa" / "results.json").read_text())
    assert results == [{"question_id": q, "answer": gqa_own[q]} for q in ["4", "20", "55", "301", "2010"]]
    correct = sum(1 for _, _, right in GQA_QUESTIONS.values() if right)  # the others' answer is "zebra"
    assert metrics["accuracy"] == pytest.approx(100 * correct / len(GQA_QUESTIONS)) == pytest.approx(60.0)
    assert json.loads((tmp_path / "gqa" / "metrics.json").read_text()) == metrics


def test_unreadable_image_is_an_error_naming_it(model, assets, gqa_own, broken_image, tmp_path):
    questions = gqa_files(assets, gqa_own, "gqa_broken.json", broken_at=2)
    cfg = EvalConfig(
        task="gqa",
        checkpoint=str(assets["ckpt"]),
        output_dir=str(tmp_path / "gqa"),
        questions=str(questions),
        image_root=str(assets["gqa"]),
        num_workers=0,
        **VQA_DECODING,
    )
    with pytest.raises(ImageReadError, match="broken.jpg"):
        evaluate_vqa(model, cfg, "cpu")


# ---------------------------------------------------------------------------------------------------- captions


def own_captions(model, assets, ids) -> dict[int, str]:
    gen = GenerationConfig(**{k: v for k, v in CAPTION_DECODING.items() if k != "prompt"})
    return {
        i: model.generate(CAPTION_DECODING["prompt"], images=load_for_test(assets["coco"] / coco_name(i)), cfg=gen)[0]
        for i in ids
    }


def caption_references(own: dict[int, str]) -> dict[int, list[str]]:
    """References that share some words with the model's captions, with case and punctuation to tokenize."""
    refs = {}
    for n, (image_id, caption) in enumerate(own.items()):
        words = caption.split()
        refs[image_id] = [
            " ".join(words[: 2 + n % 3]).capitalize() + ", on the table.",
            "A " + " ".join(words[-2:]) + " and the red cat",
            "Two dogs <sitting> under the big tree!",
        ]
    return refs


def caption_files(assets, refs: dict[int, list[str]], tmp_path: Path) -> tuple[Path, Path]:
    """LAVIS-style test list (no image_id: derived from the file names) and COCO-format ground truth."""
    ann = [{"image": f"val2014/{coco_name(i)}", "caption": refs[i]} for i in CAPTION_IMAGES]
    ann_path = tmp_path / "coco_karpathy_test.json"
    ann_path.write_text(json.dumps(ann))
    gt = {
        "info": {},
        "licenses": [],
        "type": "captions",
        "images": [{"id": i, "file_name": coco_name(i), "domain": DOMAINS[i]} for i in CAPTION_IMAGES],
        "annotations": [
            {"image_id": i, "id": 1000 * i + k, "caption": c} for i in CAPTION_IMAGES for k, c in enumerate(refs[i])
        ],
    }
    gt_path = tmp_path / "coco_karpathy_test_gt.json"
    gt_path.write_text(json.dumps(gt))
    return ann_path, gt_path


def caption_config(assets, tmp_path: Path, ann_path: Path, **changes) -> EvalConfig:
    values = dict(
        task="caption",
        checkpoint=str(assets["ckpt"]),
        output_dir=str(tmp_path / "caption"),
        ann_path=str(ann_path),
        image_root=str(assets["coco"].parent),
        batch_size=3,
        num_workers=0,
        report_samples=len(CAPTION_IMAGES),
        **CAPTION_DECODING,
    )
    return EvalConfig(**{**values, **changes})


def direct_scores(refs: dict[int, list[str]], own: dict[int, str]) -> dict[str, float]:
    """pycocoevalcap's tokenizer and scorers, called directly."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs[i]] for i in own})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in own.items()})
    bleu, _ = Bleu(4).compute_score(gts, res)
    out = {f"Bleu_{n + 1}": b for n, b in enumerate(bleu)}
    out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    return out


def test_image_ids_from_file_names():
    assert image_id_from_name("val2014/COCO_val2014_000000391895.jpg") == 391895
    with pytest.raises(ValueError, match="abc.jpg"):
        image_id_from_name("abc.jpg")


def test_caption_end_to_end_with_every_scorer(model, assets, tmp_path):
    own = own_captions(model, assets, CAPTION_IMAGES)
    assert len(set(own.values())) >= 2, own
    refs = caption_references(own)
    ann_path, gt_path = caption_files(assets, refs, tmp_path)
    metrics = evaluate_caption(model, caption_config(assets, tmp_path, ann_path, annotations=str(gt_path)), "cpu")

    out = tmp_path / "caption"
    results = json.loads((out / "results.json").read_text())
    assert results == [{"image_id": i, "caption": own[i]} for i in sorted(CAPTION_IMAGES)]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    expected = direct_scores(refs, own)
    assert {k: metrics[k] for k in expected} == pytest.approx(expected, rel=1e-12)
    assert 0 < expected["CIDEr"] and 0 < expected["Bleu_4"] < 1
    assert isinstance(metrics["METEOR"], float) and 0 < metrics["METEOR"] <= 1
    reason = spice_unavailable_reason()
    if reason is not None:  # the CoreNLP jars SPICE needs are not shipped with pycocoevalcap
        assert metrics["SPICE"] == f"unavailable: {reason}"
    for domain in ("in-domain", "out-domain"):
        ids = [i for i in CAPTION_IMAGES if DOMAINS[i] == domain]
        part = direct_scores(refs, {i: own[i] for i in ids})
        got = metrics["per_domain"][domain]
        assert got["num_images"] == 2 and {k: got[k] for k in part} == pytest.approx(part, rel=1e-12)

    report = (out / "report.html").read_text()
    assert report.count('<div class="card">') == len(CAPTION_IMAGES)
    assert "Two dogs &lt;sitting&gt; under the big tree!" in report and "<sitting>" not in report


def test_caption_ground_truth_from_the_annotation_list(model, assets, tmp_path):
    ids = CAPTION_IMAGES[:3]
    own = own_captions(model, assets, ids)
    refs = caption_references(own)
    ann_path, _ = caption_files(assets, {**refs, CAPTION_IMAGES[3]: ["unused"]}, tmp_path)
    cfg = caption_config(assets, tmp_path, ann_path, limit=3)
    metrics = evaluate_caption(model, cfg, "cpu", scorers=FAST_SCORERS)
    assert json.loads((tmp_path / "caption" / "results.json").read_text()) == [
        {"image_id": i, "caption": own[i]} for i in sorted(ids)
    ]
    expected = direct_scores(refs, own)
    assert metrics["CIDEr"] == pytest.approx(expected["CIDEr"], rel=1e-12)
    assert metrics["Bleu_4"] == pytest.approx(expected["Bleu_4"], rel=1e-12)
    assert "METEOR" not in metrics and "per_domain" not in metrics


def test_caption_ground_truth_must_cover_every_image(model, assets, tmp_path):
    refs = {i: ["a cat"] for i in CAPTION_IMAGES}
    ann_path, gt_path = caption_files(assets, refs, tmp_path)
    gt = json.loads(gt_path.read_text())
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] != 1234]
    gt_path.write_text(json.dumps(gt))
    with pytest.raises(ValueError, match="1234"):
        evaluate_caption(model, caption_config(assets, tmp_path, ann_path, annotations=str(gt_path)), "cpu")


def test_caption_prompt_with_a_placeholder_is_refused(model, assets, tmp_path):
    cfg = caption_config(assets, tmp_path, tmp_path / "unused.json", prompt="Question: {} Short answer:")
    with pytest.raises(ValueError, match="placeholder"):
        evaluate_caption(model, cfg, "cpu")


def test_scores_unavailable_without_java_or_spice_jars(monkeypatch, tmp_path):
    assert "stanford-corenlp-3.6.0.jar" in spice_unavailable_reason(tmp_path)
    monkeypatch.setattr(caption_module.shutil, "which", lambda name: None)
    scores = caption_scores({1: ["a cat"]}, {1: "a cat"})
    assert set(scores.metrics) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"}
    assert all(v.startswith("unavailable: Java not found") for v in scores.metrics.values())


# ---------------------------------------------------------------------------------------------------- reports, configs


def test_retrieval_report_marks_hits_and_escapes(assets, tmp_path):
    images = [str(assets["coco"] / coco_name(i)) for i in CAPTION_IMAGES[:3]] + [str(tmp_path / "gone.jpg")]
    texts = [f"caption {n} <i>{n}</i>" for n in range(8)]
    topk = [[0, 1, 2, 3, 4, 5], [2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2], [1, 0, 2, 3, 4, 5]]
    gt = [[0, 1], [6, 7], [7], [0]]
    path = retrieval_report(tmp_path / "r.html", images, texts, topk, gt, n=4)
    page = path.read_text()
    assert page.count('<div class="card">') == 4 and page.count("data:image/jpeg;base64,") == 3
    assert "image unreadable" in page and "gone.jpg" in page  # shown, not fatal
    assert "<i>" not in page and "caption 7 &lt;i&gt;7&lt;/i&gt;" in page
    assert page.count("✓") == 2 + 1 + 1 + 1  # image 1's correct captions are ranked 5th and 6th: one in its top 5
    assert "first correct at rank 5" in page and "first correct at rank 2" in page


def test_eval_configs_have_the_paper_decoding():
    vqa = {"vqav2_zeroshot_opt": "Question: {} Answer:", "vqav2_zeroshot_t5": "Question: {} Short answer:"}
    vqa |= {"okvqa_zeroshot_t5": "Question: {} Short answer:", "gqa_zeroshot_t5": "Question: {} Short answer:"}
    for name, prompt in vqa.items():
        cfg = load_eval_config(str(CONFIGS / f"{name}.yaml"))
        assert cfg.task in ("vqa", "gqa") and cfg.prompt == prompt, name
        assert (cfg.num_beams, cfg.max_new_tokens, cfg.min_new_tokens, cfg.length_penalty) == (5, 10, 1, -1.0), name
    for name in ("caption_coco", "nocaps"):
        cfg = load_eval_config(str(CONFIGS / f"{name}.yaml"))
        assert (cfg.task, cfg.prompt, cfg.num_beams, cfg.max_new_tokens, cfg.min_new_tokens) == (
            "caption",
            "a photo of",
            5,
            30,
            8,
        ), name


# ---------------------------------------------------------------------------------------------------- 2 processes

WORLD = 2


def _worker(rank: int, job: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{job['rdzv']}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        model = load_pretrained(job["ckpt"])
        out: dict[str, object] = {}
        out["vqa"] = evaluate_vqa(model, EvalConfig(**job["vqa"]), "cpu")
        out["caption"] = evaluate_caption(model, EvalConfig(**job["caption"]), "cpu", scorers=FAST_SCORERS)
        try:  # the broken image lands on rank 1 only: both ranks must fail, naming it
            evaluate_vqa(model, EvalConfig(**job["broken"]), "cpu")
            out["broken"] = "no error"
        except Exception as e:
            out["broken"] = f"{type(e).__name__}: {e}"
        Path(job["out"], f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        teardown_distributed()


def test_two_processes_write_what_one_writes(
    model, assets, vqa_annotations, gqa_own, broken_image, tmp_path, monkeypatch
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    own = own_captions(model, assets, CAPTION_IMAGES)
    ann_path, gt_path = caption_files(assets, caption_references(own), tmp_path)
    broken = gqa_files(assets, gqa_own, "gqa_broken_rank1.json", broken_at=1)
    # Different batch sizes too: the answers must not depend on which questions share a batch.
    configs = {
        procs: {
            "vqa": vqa_config(assets, tmp_path / procs / "vqa", annotations=str(vqa_annotations), batch_size=batch),
            "caption": caption_config(
                assets, tmp_path, ann_path, annotations=str(gt_path), output_dir=str(tmp_path / procs / "cap")
            ),
        }
        for procs, batch in (("one", 3), ("two", 2))
    }
    single = {
        "vqa": evaluate_vqa(model, configs["one"]["vqa"], "cpu"),
        "caption": evaluate_caption(model, configs["one"]["caption"], "cpu", scorers=FAST_SCORERS),
    }
    job = {
        "rdzv": str(tmp_path / "rdzv"),
        "ckpt": str(assets["ckpt"]),
        "out": str(tmp_path),
        "vqa": dataclasses.asdict(configs["two"]["vqa"]),
        "caption": dataclasses.asdict(configs["two"]["caption"]),
        "broken": dataclasses.asdict(
            EvalConfig(
                task="gqa",
                checkpoint=str(assets["ckpt"]),
                output_dir=str(tmp_path / "two" / "broken"),
                questions=str(broken),
                image_root=str(assets["gqa"]),
                batch_size=1,
                num_workers=0,
                **VQA_DECODING,
            )
        ),
    }
    mp.start_processes(_worker, args=(job,), nprocs=WORLD, join=True, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    for task, folder in (("vqa", "vqa"), ("caption", "cap")):
        for name in ("results.json", "metrics.json"):
            one = (tmp_path / "one" / folder / name).read_text()
            two = (tmp_path / "two" / folder / name).read_text()
            assert one == two, (task, name)
        for r in range(WORLD):  # every rank returns the metrics (JSON turns the int keys of nested dicts to str)
            assert ranks[r][task] == json.loads(json.dumps(single[task]))
    assert len(json.loads((tmp_path / "two" / "vqa" / "results.json").read_text())) == len(VQA_QUESTIONS)
    assert ranks[1]["broken"].startswith("ImageReadError") and "broken.jpg" in ranks[1]["broken"]
    assert ranks[0]["broken"].startswith("RuntimeError") and "rank 1" in ranks[0]["broken"]
    assert "broken.jpg" in ranks[0]["broken"]
