"""Flan-T5 as BLIP-2 ran it: exact GELU in the gated FFN (`LLMConfig.t5_dense_act_fn`), not its config's gelu_new.

The tiny T5 folder's own config says feed_forward_proj "gated-gelu", i.e. dense_act_fn "gelu_new", as Flan-T5's does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoConfig, Blip2ForConditionalGeneration
from transformers import Blip2Config as HFBlip2Config

from qformer.checkpoint import config_from_dict, config_to_dict, load_pretrained, save_pretrained
from qformer.config import Blip2Config, LLMConfig
from qformer.hf_folders import load_transformers_folder
from qformer.stage2 import Blip2Stage2, load_llm, load_stage2_state, stage2_state_dict
from tasks.cli import main as cli
from tasks.config import ConfigError, load_config
from tasks.stage2 import stage2_outputs
from tasks.tiny_assets import vit_weights
from tests.helpers import hf_qformer_config, randomized, tiny_config
from tests.llm_helpers import IMAGE, TINY_VISION, tiny_opt_folder, tiny_t5_folder, word_tokenizer

CAPTIONS = ["a photo of the cat", "two red dog sitting on the grass", "a bird"]
OUTPUTS = ["cat", "on the grass", "a small bird in the sky"]
# gelu and gelu_new differ by at most 4.7e-4 (at x = -2.7); through the tiny T5 (weights at std 0.5) the logits move by
# 1.1e-3 (measured, printed by the first test). The floor sits 10x below that and 10x above the 1e-5 tolerance of the
# matching comparison, so a model that kept gelu_new can pass for neither.
MIN_ACTIVATION_EFFECT = 1e-4
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _cfg(llm: LLMConfig, **changes) -> Blip2Config:
    cfg = Blip2Config.preset("tiny")
    qformer = cfg.qformer.replace(hidden_dropout=0.0, attention_dropout=0.0)
    return dataclasses.replace(cfg, qformer=qformer, llm=llm, **changes)


def _source(t5_folder, **changes) -> Blip2Stage2:
    """A stage-2 model on the tiny T5 (its own weights drawn at std 0.5) with every other weight drawn at std 0.5."""
    cfg = _cfg(LLMConfig(path=str(t5_folder), dtype="fp32"), **changes)
    torch.manual_seed(0)
    model = Blip2Stage2(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(("llm.", "visual.")):
                p.normal_(0.0, 0.5)
    return model.eval()


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(5))


def _logits(model: Blip2Stage2, images: torch.Tensor) -> torch.Tensor:
    n = images.shape[0]
    with torch.no_grad():
        return stage2_outputs(model, CAPTIONS[:n], images=images, text_output=OUTPUTS[:n])["logits"]


def _hf_logits(hf, images: torch.Tensor, queries: int) -> torch.Tensor:
    """transformers' logits for the same inputs: `queries` image tokens before each caption, right padding."""
    tok = word_tokenizer("t5")
    enc = tok(CAPTIONS, padding="longest", return_tensors="pt")
    out = tok(OUTPUTS, padding="longest", return_tensors="pt")
    ids = torch.cat([torch.full((len(CAPTIONS), queries), IMAGE), enc.input_ids], 1)
    mask = torch.cat([torch.ones(len(CAPTIONS), queries, dtype=torch.long), enc.attention_mask], 1)
    with torch.no_grad():
        return hf(
            pixel_values=images,
            input_ids=ids,
            attention_mask=mask,
            labels=out.input_ids.masked_fill(out.attention_mask == 0, -100),
            decoder_attention_mask=out.attention_mask,
        ).logits


def test_lavis_t5_checkpoint_runs_exact_gelu_like_transformers_blip2(tmp_path, caplog):
    t5 = tiny_t5_folder(tmp_path / "t5")
    assert AutoConfig.from_pretrained(t5).dense_act_fn == "gelu_new"  # Flan-T5's own, before any override
    source = _source(t5, ln_vision_eps=1e-6)  # transformers' post_layernorm (our ln_vision) takes the ViT's eps
    lavis = stage2_state_dict(source, "lavis", include_visual=False)
    assert {"query_tokens", "t5_proj.weight", "ln_vision.weight"} <= lavis.keys()
    assert any(k.startswith("Qformer.bert.") for k in lavis)

    def lavis_way(act: str | None) -> Blip2Stage2:
        cfg = dataclasses.replace(source.cfg, llm=dataclasses.replace(source.cfg.llm, t5_dense_act_fn=act))
        model = Blip2Stage2(cfg)
        model.visual.load_state_dict(source.visual.state_dict())  # LAVIS files leave the frozen ViT out
        load_stage2_state(model, lavis, "lavis", source="blip2_flant5.pth")
        return model.eval()

    with caplog.at_level(logging.INFO, logger="qformer.stage2"):
        ours = lavis_way("gelu")
    assert any("gelu_new replaced by gelu" in r.getMessage() for r in caplog.records)
    kept = lavis_way(None)
    assert ours.llm.config.dense_act_fn == "gelu" and kept.llm.config.dense_act_fn == "gelu_new"

    # transformers' BLIP-2 with dense_act_fn="gelu" in text_config (as its conversion script writes), same weights.
    text_config = AutoConfig.from_pretrained(t5).to_dict() | {"dense_act_fn": "gelu"}
    hf_cfg = HFBlip2Config(
        vision_config=TINY_VISION,
        qformer_config=hf_qformer_config(ours.cfg.qformer, text=False).to_dict(),
        text_config=text_config,
        num_query_tokens=ours.cfg.qformer.num_query_tokens,
        image_token_index=IMAGE,
    )
    hf = Blip2ForConditionalGeneration(hf_cfg).eval()
    hf.load_state_dict(stage2_state_dict(ours, "transformers"), strict=True)
    assert hf.config.text_config.dense_act_fn == "gelu"

    images = _images()
    expected = _hf_logits(hf, images, ours.cfg.qformer.num_query_tokens)
    got, without = _logits(ours, images), _logits(kept, images)
    assert_close(got, expected, atol=1e-5, rtol=0)
    gap = (without - expected).abs().max().item()
    print(
        f"max |logit diff| vs transformers (gelu): with override {(got - expected).abs().max().item():.2e}, "
        f"without (gelu_new) {gap:.2e}"
    )
    assert gap > MIN_ACTIVATION_EFFECT, gap


def test_lavis_t5_conversion_keeps_gelu_through_save_load_and_export(tmp_path):
    t5 = tiny_t5_folder(tmp_path / "t5")
    vit = vit_weights(tmp_path / "vit_tiny.pth", "tiny")
    vision = dataclasses.replace(Blip2Config.preset("tiny").vision, weights=str(vit))
    source = _source(t5, vision=vision)  # built as LAVIS runs it: default llm.t5_dense_act_fn = "gelu"
    assert source.llm.config.dense_act_fn == "gelu"
    torch.save({"model": stage2_state_dict(source, "lavis", include_visual=False)}, tmp_path / "blip2_t5.pth")

    ours = tmp_path / "ours"
    convert = ["convert", str(tmp_path / "blip2_t5.pth"), str(ours), "--from", "lavis", "--preset", "tiny"]
    convert += ["--vision-weights", str(vit), "--llm", str(t5)]
    assert cli([*convert, "--llm-dtype", "fp32"]) == 0
    saved = json.loads((ours / "config.json").read_text())["config"]["llm"]
    assert saved["t5_dense_act_fn"] == "gelu" and saved["path"] == str(t5)

    loaded = load_pretrained(ours)
    assert loaded.llm.config.dense_act_fn == "gelu"
    images = _images()
    got = _logits(loaded, images)
    assert_close(got, _logits(source, images), atol=0, rtol=0)

    exported = tmp_path / "exported"
    assert cli(["convert", str(ours), str(exported), "--from", "ours", "--to", "transformers"]) == 0
    text_config = json.loads((exported / "config.json").read_text())["text_config"]
    assert text_config["dense_act_fn"] == "gelu" and text_config["feed_forward_proj"] == "gated-gelu"
    hf = Blip2ForConditionalGeneration.from_pretrained(exported).eval()
    # The export's ln_vision runs at the ViT's eps (1e-6: transformers has no field of its own for it; the export
    # warns), LAVIS's at 1e-5 (a 7e-4 logit difference here): compare at the export's eps, so only the LLM differs.
    loaded.ln_vision.eps = hf.config.vision_config.layer_norm_eps
    assert_close(
        _hf_logits(hf, images, loaded.cfg.qformer.num_query_tokens), _logits(loaded, images), atol=1e-5, rtol=0
    )

    # Without --llm-dtype the LLM takes LAVIS's precision: bf16 for T5 (fp16 would overflow), fp16 for OPT.
    assert cli([*convert[:2], str(tmp_path / "t5_default"), *convert[3:]]) == 0
    assert json.loads((tmp_path / "t5_default" / "config.json").read_text())["config"]["llm"]["dtype"] == "bf16"
    opt = tiny_opt_folder(tmp_path / "opt")
    opt_model = Blip2Stage2(_cfg(LLMConfig(path=str(opt), dtype="fp32"), vision=vision))
    torch.save({"model": stage2_state_dict(opt_model, "lavis", include_visual=False)}, tmp_path / "blip2_opt.pth")
    opt_convert = ["convert", str(tmp_path / "blip2_opt.pth"), str(tmp_path / "opt_default"), "--from", "lavis"]
    assert cli([*opt_convert, "--preset", "tiny", "--vision-weights", str(vit), "--llm", str(opt)]) == 0
    assert json.loads((tmp_path / "opt_default" / "config.json").read_text())["config"]["llm"]["dtype"] == "fp16"


def test_checkpoint_written_before_the_field_keeps_the_folders_activation(tmp_path):
    t5 = tiny_t5_folder(tmp_path / "t5")
    cfg = _cfg(LLMConfig(path=str(t5), dtype="fp32"))
    old = config_to_dict(cfg)
    del old["llm"]["t5_dense_act_fn"]
    assert config_from_dict(old).llm.t5_dense_act_fn is None
    assert config_from_dict(config_to_dict(cfg)).llm.t5_dense_act_fn == "gelu"  # written now: kept as written

    folder = save_pretrained(Blip2Stage2(cfg), tmp_path / "ckpt")
    meta = json.loads((folder / "config.json").read_text())
    del meta["config"]["llm"]["t5_dense_act_fn"]
    (folder / "config.json").write_text(json.dumps(meta))
    assert load_pretrained(folder).llm.config.dense_act_fn == "gelu_new"


def test_transformers_folder_activation_survives_saving_as_ours(tmp_path):
    """A BLIP-2 folder's text_config activation (here gelu_new, not our default) is what the LLM keeps."""
    t5 = tiny_t5_folder(tmp_path / "t5")
    hf_cfg = HFBlip2Config(
        vision_config=TINY_VISION,
        qformer_config=hf_qformer_config(tiny_config(), text=False).to_dict(),
        text_config=AutoConfig.from_pretrained(t5).to_dict(),
        num_query_tokens=4,
        image_token_index=IMAGE,
    )
    hf = randomized(Blip2ForConditionalGeneration(hf_cfg), std=0.3)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("qkv.bias"):
                p.view(3, -1)[1].zero_()  # EVA has no k bias
    hf.save_pretrained(tmp_path / "blip2")
    word_tokenizer("t5").save_pretrained(tmp_path / "blip2")

    model = load_transformers_folder(tmp_path / "blip2")
    assert model.cfg.llm.t5_dense_act_fn == "gelu_new" and model.llm.config.dense_act_fn == "gelu_new"
    save_pretrained(model, tmp_path / "ours")  # the LLM goes to ours/llm/
    assert json.loads((tmp_path / "ours" / "llm" / "config.json").read_text())["dense_act_fn"] == "gelu_new"
    again = load_pretrained(tmp_path / "ours")
    assert again.llm.config.dense_act_fn == "gelu_new"
    images = _images(2)
    assert_close(_logits(again, images), _logits(model, images), atol=0, rtol=0)


def test_a_given_llm_is_recorded_with_the_activation_it_runs(tmp_path):
    t5 = tiny_t5_folder(tmp_path / "t5")
    llm, tokenizer = load_llm(str(t5), "fp32")  # the folder's own gelu_new; the config below says gelu
    model = Blip2Stage2(_cfg(LLMConfig(path=str(t5), dtype="fp32")), llm=llm, tokenizer=tokenizer)
    assert model.cfg.llm.t5_dense_act_fn == "gelu_new"
    again = load_pretrained(save_pretrained(model, tmp_path / "ours"))
    assert again.llm.config.dense_act_fn == "gelu_new"


def test_bad_activation_names_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="'gelu_fancy'") as err:
        LLMConfig(t5_dense_act_fn="gelu_fancy")
    assert "\n" not in str(err.value) and "t5_dense_act_fn" in str(err.value)
    with pytest.raises(ValueError, match="'gelu_fancy'"):
        config_from_dict({"llm": {"t5_dense_act_fn": "gelu_fancy"}})
    with pytest.raises(ConfigError, match="gelu_fancy"):
        load_config(None, ["stage=stage2", "model_preset=tiny", "output_dir=x", "model.llm.t5_dense_act_fn=gelu_fancy"])
    assert load_config(None, ["output_dir=x", "model.llm.t5_dense_act_fn=null"]).model.llm.t5_dense_act_fn is None
    t5 = tiny_t5_folder(tmp_path / "t5")
    with pytest.raises(ValueError, match="'gelu_fancy'"):
        load_llm(str(t5), "fp32", t5_dense_act_fn="gelu_fancy")


def test_decoder_only_llms_ignore_it(tmp_path):
    opt = tiny_opt_folder(tmp_path / "opt")
    own = AutoConfig.from_pretrained(opt).to_dict()
    llm, _ = load_llm(str(opt), "fp32", t5_dense_act_fn="gelu")
    assert not hasattr(llm.config, "dense_act_fn") and llm.config.activation_function == own["activation_function"]


def test_flan_t5_run_configs_get_exact_gelu():
    for name in ("stage2_flant5xl", "stage2_flant5xxl", "tiny/stage2_flant5xl", "tiny/stage2_flant5xxl"):
        assert load_config(CONFIGS / f"{name}.yaml").model.llm.t5_dense_act_fn == "gelu", name
