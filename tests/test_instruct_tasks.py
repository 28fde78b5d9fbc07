"""An instruction-aware stage-2 checkpoint (InstructBLIP-style) through what users run: `qformer ask`, `qformer
caption` and the VQA evaluator give the model's own answers, with the prompted question read by the Q-Former too."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoTokenizer

from qformer.checkpoint import load_pretrained, save_pretrained
from qformer.config import LLMConfig
from qformer.stage2 import VQA_GENERATION, Blip2Stage2
from tasks.cli import load_images, main
from tasks.evals.config import EvalConfig
from tasks.evals.vqa import evaluate_vqa
from tasks.tiny_assets import tiny_bert_folder, tiny_llama_folder
from tests.llm_helpers import tiny_opt_folder
from tests.test_cli import tiny_cfg, write_jpegs

QUESTIONS = {1: "what colour is the square", 2: "how many bars are there"}


@pytest.fixture(scope="module")
def instruct(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("instruct")
    llm = LLMConfig(path=str(tiny_opt_folder(root / "opt")), dtype="fp32", qformer_instruction=True)
    qtok = AutoTokenizer.from_pretrained(tiny_bert_folder(root / "bert"))
    torch.manual_seed(0)
    model = Blip2Stage2(tiny_cfg(llm=llm), qformer_tokenizer=qtok)
    with torch.no_grad():  # large random weights, so that different instructions give visibly different answers
        for name, p in model.named_parameters():
            if name.startswith(("qformer.", "llm_proj.")):
                p.normal_(0.0, 0.5)
    ckpt = save_pretrained(model, root / "ckpt")
    images = write_jpegs(root / "images", n=1)
    return {"root": root, "ckpt": ckpt, "image": images[0]}


def test_the_checkpoint_reads_the_question_in_the_qformer(instruct):
    model = load_pretrained(instruct["ckpt"]).eval()
    assert isinstance(model, Blip2Stage2) and model.instruct and model.qformer_tokenizer is not None
    images = load_images([instruct["image"]] * 2, model.cfg.vision.image_size)
    ids, mask = model.instruction_inputs([QUESTIONS[1], QUESTIONS[2]])
    with torch.no_grad():
        prompts = model.soft_prompt(images, instruction_ids=ids, instruction_mask=mask)
    # One image, two instructions: instruction-aware query outputs differ (a plain BLIP-2 soft prompt would not).
    assert (prompts[0] - prompts[1]).abs().max() > 1e-3


def test_ask_and_caption_run_an_instruction_aware_checkpoint(instruct, capsys):
    model = load_pretrained(instruct["ckpt"]).eval()
    images = load_images([instruct["image"]], model.cfg.vision.image_size)
    expected = model.predict_answers([QUESTIONS[1]], images=images)[0]
    assert main(["ask", instruct["image"], QUESTIONS[1], "--checkpoint", str(instruct["ckpt"])]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()
    caption = model.generate("a photo of", images=images)[0]
    assert main(["caption", instruct["image"], "--checkpoint", str(instruct["ckpt"]), "--prompt", "a photo of"]) == 0
    assert capsys.readouterr().out.strip() == f"{instruct['image']}\t{caption}".strip()


def test_vqa_eval_answers_with_the_instruction_aware_model(instruct, tmp_path):
    root = instruct["root"]
    name = instruct["image"].rsplit("/", 1)[1]
    questions = [{"image_id": 0, "question": q, "question_id": qid} for qid, q in QUESTIONS.items()]
    (root / "questions.json").write_text(json.dumps({"questions": questions}))
    cfg = EvalConfig(
        task="vqa",
        checkpoint=str(instruct["ckpt"]),
        output_dir=str(tmp_path),
        questions=str(root / "questions.json"),
        image_root=str(root / "images"),
        image_pattern=name,
        batch_size=2,
        num_workers=0,
    )
    model = load_pretrained(instruct["ckpt"]).eval()
    evaluate_vqa(model, cfg, "cpu")
    results = {r["question_id"]: r["answer"] for r in json.loads((tmp_path / "results.json").read_text())}
    images = load_images([instruct["image"]] * 2, model.cfg.vision.image_size)
    gen = dataclasses.replace(VQA_GENERATION, num_beams=cfg.num_beams)
    direct = model.predict_answers(list(QUESTIONS.values()), images=images, prompt=cfg.prompt, cfg=gen)
    assert results == dict(zip(QUESTIONS, [a.strip() for a in direct], strict=True))


def test_convert_reads_a_lavis_instructblip_vicuna_file(tmp_path, capsys):
    """A LAVIS `blip2_vicuna_instruct` layout (Q-Former text parts kept, `llm_proj`, no ViT, no LLM) converts strictly;
    the converted model gives the original's answers, ends on LLaMA's eos and reads instructions with --bert's
    tokenizer."""
    from qformer.bert import load_tokenizer
    from qformer.stage2 import stage2_state_dict
    from qformer.vision import vision_state_dict
    from tests.test_cli import tiny_bert_tokenizer_folder

    llama = tiny_llama_folder(tmp_path / "llama")
    bert = tiny_bert_tokenizer_folder(tmp_path / "bert")
    llm = LLMConfig(path=str(llama), dtype="fp32", qformer_instruction=True, end_of_text="</s>")
    torch.manual_seed(0)
    model = Blip2Stage2(tiny_cfg(llm=llm), qformer_tokenizer=load_tokenizer(bert)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("qformer.", "llm_proj.", "ln_vision.")):
                p.normal_(0.0, 0.3)
    state = stage2_state_dict(model, "lavis", include_visual=False)
    assert "llm_proj.weight" in state and "Qformer.bert.embeddings.word_embeddings.weight" in state
    torch.save({"model": state}, tmp_path / "blip2_vicuna_instruct.pth")
    torch.save(vision_state_dict(model.visual, "lavis"), tmp_path / "vit.pth")
    out = tmp_path / "ckpt"
    args = ["convert", str(tmp_path / "blip2_vicuna_instruct.pth"), str(out), "--from", "lavis", "--preset", "tiny"]
    args += ["--vision-weights", str(tmp_path / "vit.pth"), "--llm", str(llama), "--llm-dtype", "fp32"]
    assert main(args) == 2 and "--bert" in capsys.readouterr().err  # instructions need the Q-Former's tokenizer
    assert main([*args, "--bert", str(bert)]) == 0
    back = load_pretrained(out).eval()
    assert back.instruct and back.cfg.llm.end_of_text == "</s>"
    images = load_images([write_jpegs(tmp_path / "images", n=1)[0]] * 2, back.cfg.vision.image_size)
    questions = [QUESTIONS[1], QUESTIONS[2]]
    assert back.predict_answers(questions, images=images) == model.predict_answers(questions, images=images)
