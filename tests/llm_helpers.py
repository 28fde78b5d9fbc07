"""Tiny OPT and T5 folders, written the way real ones are (`save_pretrained`), with word-level tokenizers."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

SPECIALS = ["<pad>", "</s>", "<unk>", "<image>", "\n"]
WORDS = (
    "a photo of the cat dog bird red blue green small big two three on under table grass sky question short answer "
    "what is colour color how many are there ? : . , sitting running in picture image shape circle square"
).split()
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
PAD, EOS, IMAGE = 0, 1, 3


def word_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """OPT-style (BOS `</s>` first) or T5-style (`</s>` last) word-level tokenizer; `\\n` is a token."""
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n|[?:.,]"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r" +"), behavior="removed"),
        ]
    )
    template = "</s> $A" if kind == "opt" else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("</s>", EOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="</s>", unk_token="<unk>"
    )


def _randomize(model: torch.nn.Module, std: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)


def tiny_opt_folder(path: Path, seed: int = 0) -> Path:
    cfg = OPTConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        num_hidden_layers=2,
        ffn_dim=32,
        num_attention_heads=2,
        max_position_embeddings=64,
        word_embed_proj_dim=16,
        pad_token_id=PAD,
        bos_token_id=EOS,
        eos_token_id=EOS,
        dropout=0.0,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    model = OPTForCausalLM(cfg)
    _randomize(model, 0.5)
    model.save_pretrained(path)
    word_tokenizer("opt").save_pretrained(path)
    return path


def tiny_t5_folder(path: Path, seed: int = 0) -> Path:
    cfg = T5Config(
        vocab_size=len(VOCAB),
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        dropout_rate=0.0,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=PAD,
        feed_forward_proj="gated-gelu",  # Flan-T5's
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(cfg)
    _randomize(model, 0.5)
    model.save_pretrained(path)
    word_tokenizer("t5").save_pretrained(path)
    return path
