"""The ITC temperature as LAVIS's BLIP-2 has it (never clamped), and the BLIP-1-style clamp as a run config option."""

from __future__ import annotations

import pytest
import torch

from qformer.blip2 import Blip2Stage1
from qformer.losses import itc_loss
from tasks.config import ConfigError, load_config
from tasks.stage1 import Stage1Objective, stage1_losses
from tasks.train import build_objective
from tests.helpers import randomized
from tests.test_cli import BERT_WORDS, tiny_bert_tokenizer_folder, tiny_cfg

BOS = 99


def batch(n: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, 90, (n, 6), generator=g)
    ids[:, 0] = 1
    return {"images": torch.randn(n, 3, 28, 28, generator=g), "ids": ids, "mask": torch.ones_like(ids)}


@pytest.mark.parametrize(("temp", "clamped"), [(0.0005, 0.001), (0.8, 0.5)])
def test_the_temperature_is_left_alone_unless_a_clamp_is_asked_for(temp, clamped):
    model = randomized(Blip2Stage1(tiny_cfg()), std=0.3)  # features apart, so the temperature shows in the loss
    data = batch()
    with torch.no_grad():
        model.temp.fill_(temp)
        image = model.image_features(model.encode_image(data["images"]), use_cache=False)
        text = model.text_features(data["ids"], data["mask"])
    expected = {t: itc_loss(image.feats, text.feat, t).loss for t in (temp, clamped)}
    assert not torch.isclose(expected[temp], expected[clamped])  # the two temperatures give different losses

    for temp_clamp, used in ((None, temp), ((0.001, 0.5), clamped)):
        with torch.no_grad():
            model.temp.fill_(temp)
        out = stage1_losses(
            model,
            data["ids"],
            data["mask"],
            images=data["images"],
            bos_token_id=BOS,
            generator=torch.Generator().manual_seed(0),
            temp_clamp=temp_clamp,
        )
        assert model.temp.item() == pytest.approx(used, rel=1e-6)
        torch.testing.assert_close(out["loss_itc"], expected[used], rtol=1e-5, atol=1e-6)
        out["loss"].backward()
        assert model.temp.grad is not None and torch.isfinite(model.temp.grad)
        model.zero_grad()


def test_config_option_reaches_the_training_step(tmp_path):
    base = ["stage=stage1", "model_preset=tiny", f"output_dir={tmp_path}"]
    assert load_config(None, base).itc_temp_clamp is None  # the default: BLIP-2, no clamp
    cfg = load_config(None, [*base, "itc_temp_clamp=[0.001,0.5]"])
    assert cfg.itc_temp_clamp == [0.001, 0.5]

    from qformer.bert import load_tokenizer

    tokenizer = load_tokenizer(tiny_bert_tokenizer_folder(tmp_path / "bert"))
    model = Blip2Stage1(tiny_cfg())
    text = [" ".join(BERT_WORDS[i : i + 4]) for i in range(3)]
    step = {"image": batch()["images"], "text_input": text, "image_id": torch.arange(3)}
    for config, expected in ((load_config(None, base), 0.8), (cfg, 0.5)):
        objective = build_objective(config, model, tokenizer)
        assert isinstance(objective, Stage1Objective)
        with torch.no_grad():
            model.temp.fill_(0.8)
        objective(step)
        assert model.temp.item() == pytest.approx(expected)


@pytest.mark.parametrize("value", ["[0.5,0.001]", "[0.001]", "[0,0.5]", "[0.001,0.5,1.0]", "[-1,0.5]"])
def test_a_bad_clamp_is_one_line_naming_the_key(value, tmp_path):
    with pytest.raises(ConfigError, match=r"itc_temp_clamp must be null .* or \[min, max\]") as err:
        load_config(None, ["stage=stage1", "model_preset=tiny", f"output_dir={tmp_path}", f"itc_temp_clamp={value}"])
    assert "\n" not in str(err.value)
