"""Strict loading: every missing, unexpected and misshapen key is named; nothing loads on failure."""

import pytest
import torch

from qformer import QFormer
from qformer.convert import CheckpointError, convert_state_dict, load_qformer, qformer_state_dict
from tests.helpers import tiny_config, tiny_qformer


def test_wrong_keys_and_shapes_are_all_named_and_nothing_loads():
    source = tiny_qformer()
    lavis = qformer_state_dict(source, "lavis")
    del lavis["Qformer.bert.encoder.layer.1.output_query.dense.weight"]
    lavis["Qformer.bert.encoder.layer.0.attention.self.query.bias"] = torch.zeros(7)
    target = QFormer(tiny_config())
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_qformer(target, lavis, "lavis", source="blip2_pretrained.pth")
    message = str(err.value)
    assert "blip2_pretrained.pth" in message
    assert "layers.1.ffn_query.fc2.weight" in message
    assert "layers.0.self_attn.q.bias: checkpoint (7,) vs model (32,)" in message
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed although loading failed"


def test_unknown_keys_are_named():
    lavis = qformer_state_dict(tiny_qformer(), "lavis")
    lavis["Qformer.bert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="attention.self.rotary.weight"):
        load_qformer(QFormer(tiny_config()), lavis, "lavis")


def test_lavis_tied_decoder_must_equal_word_embeddings():
    lavis = qformer_state_dict(tiny_qformer(), "lavis")
    lavis["Qformer.cls.predictions.decoder.weight"] = lavis["Qformer.cls.predictions.decoder.weight"] + 1
    with pytest.raises(ValueError, match="tied"):
        load_qformer(QFormer(tiny_config()), lavis, "lavis")


def test_export_names_what_it_drops():
    converted = convert_state_dict(
        {f"qformer.{k}": v for k, v in tiny_qformer().state_dict().items()}, "ours", "transformers"
    )
    assert sorted(converted.dropped) == [
        "qformer.lm_head.bias",
        "qformer.lm_head.dense.bias",
        "qformer.lm_head.dense.weight",
        "qformer.lm_head.norm.bias",
        "qformer.lm_head.norm.weight",
    ]
    assert converted.unknown == []


def test_unknown_format_is_named():
    with pytest.raises(ValueError, match="'lavis2'"):
        convert_state_dict({}, "lavis2", "ours")
