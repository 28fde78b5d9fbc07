"""Shared test helpers: tiny configs on both sides and re-randomised weights."""

from __future__ import annotations

import torch
from transformers import Blip2Config, Blip2QFormerConfig

from qformer import QFormer, QFormerConfig


def tiny_config(**changes) -> QFormerConfig:
    """The tiny preset without dropout, so eval and train passes are comparable."""
    return QFormerConfig.preset("tiny", hidden_dropout=0.0, attention_dropout=0.0, **changes)


def randomized(model: torch.nn.Module, std: float = 0.5) -> torch.nn.Module:
    """Re-randomise every parameter (LayerNorms and biases too) so no weight is at a trivial init value."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def tiny_qformer(**changes) -> QFormer:
    return randomized(QFormer(tiny_config(**changes)))


def hf_qformer_config(cfg: QFormerConfig, text: bool) -> Blip2QFormerConfig:
    return Blip2QFormerConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        layer_norm_eps=cfg.layer_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        cross_attention_frequency=cfg.cross_attention_freq,
        encoder_hidden_size=cfg.encoder_width,
        pad_token_id=cfg.pad_token_id,
        use_qformer_text_input=text,
    )


def hf_blip2_config(cfg: QFormerConfig) -> Blip2Config:
    """A tiny `Blip2Config` whose Q-Former matches `cfg` (the ViT is tiny and unused by the Q-Former tests)."""
    return Blip2Config(
        vision_config=dict(
            hidden_size=cfg.encoder_width,
            intermediate_size=96 if cfg.encoder_width == 48 else 64,  # the "tiny" ViT's MLP
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=28,
            patch_size=14,
        ),
        qformer_config=hf_qformer_config(cfg, text=True).to_dict(),
        num_query_tokens=cfg.num_query_tokens,
        image_text_hidden_size=16,
    )


def padded_text(
    batch: int, length: int, lengths: list[int], vocab: int, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids `[B, T]` (never the pad id 0 in real positions) and a right-padding mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask
