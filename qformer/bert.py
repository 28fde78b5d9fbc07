"""Initialise a Q-Former from a local BERT folder (transformers layout), and its tokenizer with `[DEC]`.

What loads (DESIGN.md section 2): embeddings, self-attention, text FFN and the MLM head; the query FFN is a
copy of the text FFN; cross-attention keeps its fresh initialisation. BERT's token-type embedding, pooler and
next-sentence head are dropped by name (the Q-Former has none of them, as in the reference). Any other key,
a missing one, or a shape that does not fit is an error that names it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import Tensor

from qformer.convert import CheckpointError, KeyMap, check_state_dict
from qformer.qformer import QFormer
from qformer.tensor_files import read_state_dict

logger = logging.getLogger(__name__)

DEC_TOKEN = "[DEC]"

# (ours, BERT)
BERT_KEYS = KeyMap(
    (
        ("embeddings.word", "embeddings.word_embeddings"),
        ("embeddings.position", "embeddings.position_embeddings"),
        ("embeddings.norm", "embeddings.LayerNorm"),
        ("layers.{i}.self_attn.q", "encoder.layer.{i}.attention.self.query"),
        ("layers.{i}.self_attn.k", "encoder.layer.{i}.attention.self.key"),
        ("layers.{i}.self_attn.v", "encoder.layer.{i}.attention.self.value"),
        ("layers.{i}.self_attn.out", "encoder.layer.{i}.attention.output.dense"),
        ("layers.{i}.self_attn.norm", "encoder.layer.{i}.attention.output.LayerNorm"),
        ("layers.{i}.ffn_text.fc1", "encoder.layer.{i}.intermediate.dense"),
        ("layers.{i}.ffn_text.fc2", "encoder.layer.{i}.output.dense"),
        ("layers.{i}.ffn_text.norm", "encoder.layer.{i}.output.LayerNorm"),
        ("lm_head.dense", "cls.predictions.transform.dense"),
        ("lm_head.norm", "cls.predictions.transform.LayerNorm"),
        ("lm_head.bias", "cls.predictions.bias"),
    ),
    formats=("ours", "bert"),
)

# BERT keys the Q-Former deliberately has no place for.
BERT_IGNORED = (
    "embeddings.token_type_embeddings.weight",
    "embeddings.position_ids",
    "pooler.dense.weight",
    "pooler.dense.bias",
    "cls.seq_relationship.weight",
    "cls.seq_relationship.bias",
    "cls.predictions.decoder.weight",  # tied to the word embeddings
    "cls.predictions.decoder.bias",  # the same tensor as cls.predictions.bias
)

# Config fields that shapes alone cannot verify.
_CONFIG_CHECKS = (
    ("num_attention_heads", "num_heads"),
    ("num_hidden_layers", "num_layers"),
    ("hidden_size", "hidden_size"),
    ("intermediate_size", "intermediate_size"),
    ("layer_norm_eps", "layer_norm_eps"),
)


def read_bert_state(folder: str | Path) -> dict[str, Tensor]:
    """BERT weights from a transformers folder (`model.safetensors`, sharded or not, or `pytorch_model.bin`), with
    `bert.` and gamma/beta names normalised."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"BERT folder not found: {folder}")
    out = {}
    for key, value in read_state_dict(folder).items():
        key = key.removeprefix("bert.")
        # Old BERT checkpoints (bert-base-uncased among them) name LayerNorm parameters gamma/beta.
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[key] = value
    return out


def init_from_bert(model: QFormer, folder: str | Path) -> dict[str, list[str]]:
    """Load BERT weights into `model` in place; returns {"loaded", "fresh"} lists of our parameter names.

    The word embeddings (and LM-head bias) may have more rows than BERT's vocabulary: the extra rows (the
    added `[DEC]` token) keep their fresh initialisation. A BERT folder without an MLM head (a bare
    `BertModel`) leaves the LM head fresh, with a warning.
    """
    folder = Path(folder)
    cfg = model.cfg
    if not cfg.with_text:
        raise ValueError("init_from_bert needs a Q-Former with a text path (with_text=True)")
    config_path = folder / "config.json"
    if config_path.is_file():
        bert_cfg = json.loads(config_path.read_text())
        wrong = [
            f"{theirs}={bert_cfg[theirs]} vs {ours}={getattr(cfg, ours)}"
            for theirs, ours in _CONFIG_CHECKS
            if theirs in bert_cfg and bert_cfg[theirs] != getattr(cfg, ours)
        ]
        if wrong:
            raise CheckpointError(f"BERT config {config_path} does not fit the Q-Former config: {'; '.join(wrong)}")
    state = read_bert_state(folder)

    ours: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key in BERT_IGNORED:
            continue
        new, matched = BERT_KEYS.rename(key, "bert", "ours")
        if not matched:
            unknown.append(key)
        else:
            ours[new] = value
    if unknown:
        raise CheckpointError(
            f"BERT folder {folder}: key(s) the Q-Former has no place for: {', '.join(sorted(unknown))}"
        )

    target = model.state_dict()
    text_keys = [
        k
        for k in target
        if k.startswith(("embeddings.", "lm_head."))
        or (k.startswith("layers.") and (".self_attn." in k or ".ffn_text." in k))
    ]
    head_keys = [k for k in text_keys if k.startswith("lm_head.")]
    if not any(k in ours for k in head_keys):
        logger.warning("BERT folder %s has no MLM head (cls.predictions.*): the Q-Former LM head stays fresh", folder)
        text_keys = [k for k in text_keys if k not in head_keys]
    # Rows past BERT's vocabulary (the added [DEC]) keep their fresh init, so the word embedding and LM-head bias
    # may have fewer rows than ours; every other key and shape must fit exactly.
    grown = {
        k
        for k in ("embeddings.word.weight", "lm_head.bias")
        if k in ours
        and k in target
        and ours[k].shape[0] <= target[k].shape[0]
        and ours[k].shape[1:] == target[k].shape[1:]
    }
    exact = {k: v for k, v in ours.items() if k not in grown}
    fresh_or_grown = [k for k in target if k not in text_keys or k in grown]
    check_state_dict(model, exact, source=f"BERT folder {folder}", allowed_missing=fresh_or_grown)
    with torch.no_grad():
        for key in text_keys:
            target[key][: ours[key].shape[0]].copy_(ours[key])  # the whole tensor unless its rows grew
        # The query FFN starts as a copy of the text FFN (stage 1 of the reference).
        for layer in model.layers:
            layer.ffn_query.load_state_dict(layer.ffn_text.state_dict())
    fresh = sorted(k for k in target if k not in text_keys)
    logger.info("initialised Q-Former from BERT %s: %d tensors loaded, %d fresh", folder, len(text_keys), len(fresh))
    return {"loaded": sorted(text_keys), "fresh": fresh}


def load_tokenizer(folder: str | Path):
    """The BERT tokenizer of `folder` with `[DEC]` added as bos token (id = BERT's vocabulary size)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), truncation_side="right")
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer
