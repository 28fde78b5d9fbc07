"""Instruction-aware stage 2 through transformers' InstructBLIP folders: ours -> folder -> transformers loads it with
no missing key and generates the same ids; the folder -> ours strictly (and through `qformer convert`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, InstructBlipForConditionalGeneration, InstructBlipProcessor

from qformer.caption import GenerationConfig
from qformer.checkpoint import load_pretrained
from qformer.hf_folders import export_stage2, load_transformers_folder
from qformer.stage2 import Blip2Stage2
from tasks.tiny_assets import tiny_bert_folder, tiny_llama_folder
from tests.llm_helpers import EOS, tiny_t5_folder
from tests.test_instruct_parity import INSTRUCTIONS, PROMPTS, _images, _instruct_cfg


@pytest.fixture(scope="module", params=["t5", "llama"])
def exported(request, tmp_path_factory):
    """(ours, the exported folder, kind)."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"instruct_{kind}")
    llm = tiny_t5_folder(root / "llm") if kind == "t5" else tiny_llama_folder(root / "llm")
    qtok = AutoTokenizer.from_pretrained(tiny_bert_folder(root / "bert"))
    torch.manual_seed(0)
    ours = Blip2Stage2(_instruct_cfg(llm, kind), qformer_tokenizer=qtok)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if not name.startswith("llm."):
                p.normal_(0.0, 0.3)
    ours.eval()
    result = export_stage2(ours, root / "instructblip")
    assert result.architecture == "InstructBlipForConditionalGeneration" and not result.left_out
    return ours, root / "instructblip", kind


def test_export_loads_strictly_and_generates_the_same_ids(exported):
    ours, folder, kind = exported
    theirs, info = InstructBlipForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or misshapen key
    processor = InstructBlipProcessor.from_pretrained(folder)
    assert processor.qformer_tokenizer.truncation_side == "left"
    pictures = [np.random.default_rng(i).integers(0, 256, (28, 28, 3), dtype=np.uint8) for i in range(3)]
    # The processor puts the image tokens' slots before each (padded) prompt and gives the same prompt to the
    # Q-Former tokenizer, as InstructBLIP does; ours takes the prompts as instructions by default.
    enc = processor(images=pictures, text=PROMPTS, padding="longest", return_tensors="pt")
    assert (enc.qformer_attention_mask == 0).any() and (enc.attention_mask == 0).any()
    # The processor pads the Q-Former text on the LLM tokenizer's side (it merges that tokenizer's init kwargs into
    # both calls): left for a decoder-only LLM, which shifts the instruction's absolute positions. LAVIS pads the
    # Q-Former text on the right (BERT's default), as ours does.
    qenc = processor.qformer_tokenizer(PROMPTS, padding="longest", padding_side="right", return_tensors="pt")
    enc["qformer_input_ids"], enc["qformer_attention_mask"] = qenc.input_ids, qenc.attention_mask
    cfg = GenerationConfig(max_new_tokens=5, min_new_tokens=1, num_beams=3)
    got = ours.generate(PROMPTS, images=enc.pixel_values, cfg=cfg, return_ids=True)
    # No eos / pad ids passed: the folder's own settings must be the ones ours uses.
    expected = theirs.eval().generate(**enc, max_new_tokens=5, min_new_tokens=1, num_beams=3, do_sample=False)
    if kind == "llama":
        expected = expected[:, enc.input_ids.shape[1] :]
    assert got.tolist() == expected.tolist()
    assert len({tuple(r) for r in got.tolist()}) > 1


def test_folder_loads_back_into_ours_and_converts(exported, tmp_path):
    ours, folder, kind = exported
    back = load_transformers_folder(folder)
    assert back.instruct and back.qformer_tokenizer is not None
    if kind == "llama":
        assert back.cfg.llm.end_of_text == "</s>" and back.end_token_id == EOS
    theirs_state, own = back.state_dict(), ours.state_dict()
    for key, value in own.items():
        assert torch.equal(value, theirs_state[key]), key
    cfg = GenerationConfig(max_new_tokens=4, min_new_tokens=1, num_beams=2)
    expected = ours.generate(PROMPTS, images=_images(), cfg=cfg, instructions=INSTRUCTIONS)
    assert back.generate(PROMPTS, images=_images(), cfg=cfg, instructions=INSTRUCTIONS) == expected

    from tasks.cli import main as cli

    assert cli(["convert", str(folder), str(tmp_path / "ours"), "--from", "transformers"]) == 0
    converted = load_pretrained(tmp_path / "ours")
    assert converted.instruct and converted.qformer_tokenizer is not None
    assert converted.generate(PROMPTS, images=_images(), cfg=cfg, instructions=INSTRUCTIONS) == expected
    assert (
        cli(["convert", str(tmp_path / "ours"), str(tmp_path / "again"), "--from", "ours", "--to", "transformers"]) == 0
    )
    again = load_transformers_folder(tmp_path / "again")
    assert again.generate(PROMPTS, images=_images(), cfg=cfg, instructions=INSTRUCTIONS) == expected
