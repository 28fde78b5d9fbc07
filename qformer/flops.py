"""Model FLOPs of BLIP-2: the frozen ViT, each Q-Former pass, the stage-2 LLM, and whole training steps.

Pure functions of the configs (no model is built). Conventions:

- Matmul FLOPs only, 2 per multiply-add (what `torch.utils.flop_counter.FlopCounterMode` counts: mm, addmm, bmm,
  convolutions, attention). LayerNorm, softmax, GELU, embeddings, biases and losses are left out.
- Attention is counted in full `L x S`, whatever its mask (SDPA computes masked positions too).
- Model FLOPs, as MFU counts them: activation recomputation (gradient checkpointing) is not counted.
- Per sample: one image with its caption (stage 1), or one image with its text (stage 2).
- Training: trainable parts forward + backward = 3x forward (backward forms the gradients of inputs and weights);
  the frozen ViT forward only; the frozen LLM of stage 2 forward + backward through its activations only (its
  weights take no gradient, but the soft prompt does): 2x forward.

Shape legend as in `qformer/qformer.py`: Q queries, T text tokens, N image tokens, D Q-Former width, E image width,
H heads, d head width, F feed-forward width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from qformer.config import ARCHS, Blip2Config, QFormerConfig, VisionConfig

# -- the frozen image encoder ---------------------------------------------------------------------------------------


def vit_forward_flops(
    *, width: int, depth: int, mlp_hidden: int, patch_size: int, image_size: int, prefix_tokens: int = 1
) -> int:
    """Forward FLOPs of one image through a plain pre-norm ViT trunk (patch conv + `depth` blocks, no head).

    N = (image_size / patch_size)^2 + prefix_tokens. Per block: qkv and output projections 4*N*E^2, attention
    scores and weighted sum 2*N^2*E, MLP 2*N*E*F multiply-adds; the patch conv (image_size/patch)^2 * 3*p^2*E.

    EVA ViT-g/14 at 224 px (E 1408, F 6144, N 257): 6.670 GMACs a block, 0.212 GMACs the patch conv. timm publishes
    267.2 GMACs for `eva_giant_patch14_224` (40 blocks, with its 1000-class head); this count gives 267.0 for 40
    blocks. BLIP-2 drops the last block, so 39 blocks: 260.4 GMACs = 520.7 GFLOPs (FLOPs = 2 x MACs).
    """
    patches = (image_size // patch_size) ** 2
    n = patches + prefix_tokens
    block = n * (4 * width * width + 2 * width * mlp_hidden) + 2 * n * n * width
    patch = patches * 3 * patch_size * patch_size * width
    return 2 * (depth * block + patch)


def vision_shape(cfg: VisionConfig) -> dict[str, int]:
    """The `vit_forward_flops` keywords of the encoder `cfg` builds: built-in archs with their overrides, or a
    timm:* ViT (built on the meta device to read its shape: no memory, no weights)."""
    if cfg.arch in ARCHS:
        spec = ARCHS[cfg.arch]
        return dict(
            width=cfg.width_override or spec.width,
            depth=cfg.depth_override or spec.depth,
            mlp_hidden=cfg.mlp_override or spec.mlp_hidden,
            patch_size=cfg.patch_size_override or spec.patch_size,
            image_size=cfg.image_size,
            prefix_tokens=1,
        )
    import torch

    from qformer.vision import build_vision_encoder

    with torch.device("meta"):
        encoder = build_vision_encoder(dataclasses.replace(cfg, weights=None, precision="fp32"))
    model = encoder.model
    return dict(
        width=encoder.width,
        depth=len(model.blocks),
        mlp_hidden=model.blocks[0].mlp.fc1.out_features,
        patch_size=model.patch_embed.patch_size[0],
        image_size=cfg.image_size,
        prefix_tokens=model.num_prefix_tokens,
    )


def vision_forward_flops(cfg: VisionConfig) -> int:
    """Forward FLOPs per image of the encoder `cfg` builds."""
    return vit_forward_flops(**vision_shape(cfg))


def vision_tokens(cfg: VisionConfig) -> int:
    """N: patches plus prefix tokens (257 for EVA ViT-g/14 at 224 px)."""
    shape = vision_shape(cfg)
    return (shape["image_size"] // shape["patch_size"]) ** 2 + shape["prefix_tokens"]


# -- the Q-Former ---------------------------------------------------------------------------------------------------


def absorbed_is_cheaper(heads: int, hidden: int, width: int, length: int, context_length: int) -> bool:
    """Whether the absorbed cross-attention takes fewer multiply-adds than the direct form (the "auto" choice).

    Per sample, beside the shared q and output projections: absorbed H*L*(2*N*E + 2*d*E), direct 2*N*E*D +
    2*H*L*N*d (L queries over N image tokens of width E).
    """
    d = hidden // heads
    absorbed = heads * length * (context_length + d)
    direct = context_length * (hidden + heads * length * d / width)
    return absorbed < direct


def cross_attention_macs(cfg: QFormerConfig, queries: int, image_tokens: int, image_kv: bool = False) -> int:
    """Multiply-adds of one cross-attention block for `queries` positions over `image_tokens`, per sample.
    `image_kv`: the image keys/values were formed beforehand (`image_kv_macs`), as the stage-1 step shares them."""
    D, E, H, N, L = cfg.hidden_size, cfg.encoder_width, cfg.num_heads, image_tokens, queries
    if image_kv:  # q and output, scores and weighted sum
        return 2 * L * D * D + 2 * L * N * D
    absorbed = cfg.cross_attention_impl == "absorbed" or (
        cfg.cross_attention_impl == "auto" and absorbed_is_cheaper(H, D, E, L, N)
    )
    if absorbed:  # q, keys folded into the queries, scores, weighted image sum, values folded after, output
        return 2 * L * D * D + 2 * L * D * E + 2 * H * L * N * E
    return 2 * L * D * D + 2 * N * E * D + 2 * L * N * D  # q and output, image keys/values, scores and sum


def image_kv_macs(cfg: QFormerConfig, image_tokens: int) -> int:
    """Multiply-adds of every cross-attention layer's image keys and values for one image."""
    layers = sum(cfg.has_cross_attention(i) for i in range(cfg.num_layers))
    return layers * 2 * image_tokens * cfg.encoder_width * cfg.hidden_size


def stage1_shares_image_kv(cfg: QFormerConfig, image_tokens: int, world_size: int = 1) -> bool:
    """Whether the stage-1 step forms each image's cross-attention keys/values once and shares them between its
    four query passes (ITC, and ITM's three pairs), rather than each pass attending on its own (direct or
    absorbed, as the layer would choose): whichever takes fewer multiply-adds. Under torchrun the ITM negative
    images may live on other ranks, so their keys/values are formed a second time. An `absorbed` setting keeps the
    per-pass form."""
    if cfg.cross_attention_impl == "absorbed":
        return False
    L, N, passes = cfg.num_query_tokens, image_tokens, 4
    keys_values = 2 * N * cfg.encoder_width * cfg.hidden_size * (1 if world_size == 1 else 2)  # per layer
    shared = keys_values + passes * cross_attention_macs(cfg, L, N, image_kv=True)
    return shared < passes * cross_attention_macs(cfg, L, N)


def qformer_pass_flops(
    cfg: QFormerConfig, *, queries: int = 0, text: int = 0, image_tokens: int = 0, past: int = 0, image_kv: bool = False
) -> int:
    """Forward FLOPs per sample of one Q-Former pass over `[queries; text]` (no heads).

    Each layer: self-attention projections on the L = queries + text new positions (4*L*D^2), attention over
    past + L keys (2*L*(past + L)*D); cross-attention for the query positions in every `cross_attention_freq`-th
    layer (direct or absorbed, as the layer would choose); the query FFN on the queries and the text FFN on the
    text (2*D*F each). `past`: cached positions (ITG decodes the text against the queries' cache). `image_kv`:
    the image keys/values come precomputed (`image_kv_macs`, not counted here).
    """
    D, F = cfg.hidden_size, cfg.intermediate_size
    length = queries + text
    macs = 0
    for layer in range(cfg.num_layers):
        macs += 4 * length * D * D + 2 * length * (past + length) * D
        if queries and cfg.has_cross_attention(layer):
            macs += cross_attention_macs(cfg, queries, image_tokens, image_kv)
        macs += length * 2 * D * F
    return 2 * macs


def qformer_query_flops(cfg: QFormerConfig, image_tokens: int, image_kv: bool = False) -> int:
    """Queries-only pass (ITC image side; stage 2)."""
    return qformer_pass_flops(cfg, queries=cfg.num_query_tokens, image_tokens=image_tokens, image_kv=image_kv)


def qformer_text_flops(cfg: QFormerConfig, text: int) -> int:
    """Text-only pass (ITC text side)."""
    return qformer_pass_flops(cfg, text=text)


def qformer_itm_flops(cfg: QFormerConfig, text: int, image_tokens: int, image_kv: bool = False) -> int:
    """Joint bidirectional pass of one image-text pair (ITM)."""
    return qformer_pass_flops(
        cfg, queries=cfg.num_query_tokens, text=text, image_tokens=image_tokens, image_kv=image_kv
    )


def qformer_itg_flops(cfg: QFormerConfig, text: int) -> int:
    """ITG: the text decoded causally against the queries' cache, plus the LM head (dense D^2, decoder D*V)."""
    head = 2 * text * (cfg.hidden_size**2 + cfg.hidden_size * cfg.vocab_size)
    return qformer_pass_flops(cfg, text=text, past=cfg.num_query_tokens) + head


# -- the stage-2 LLM ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LLMShape:
    """What the FLOPs of a transformers LLM depend on. `attn`: the width of queries and of the attention output
    (heads * head width); `kv`: of keys and values (smaller with grouped-query attention); `embed`: the width the
    token embeddings and the LM head use (OPT's `word_embed_proj_dim`, with projections in and out when it
    differs from `hidden`)."""

    hidden: int
    layers: int
    attn: int
    kv: int
    ffn: int
    gated: bool
    vocab: int
    embed: int
    decoder_layers: int = 0  # encoder-decoder: the decoder's layers (`layers` is the encoder's)

    @property
    def is_encoder_decoder(self) -> bool:
        return self.decoder_layers > 0


def llm_shape(config: Any) -> LLMShape:
    """An `LLMShape` from a transformers config: T5 (`d_model`, `d_kv`, `d_ff`, `feed_forward_proj`), OPT
    (`ffn_dim`, `word_embed_proj_dim`) or LLaMA-style (`intermediate_size`, gated, grouped-query heads)."""
    if getattr(config, "is_encoder_decoder", False):
        attn = config.num_heads * config.d_kv
        return LLMShape(
            hidden=config.d_model,
            layers=config.num_layers,
            attn=attn,
            kv=attn,
            ffn=config.d_ff,
            gated=config.feed_forward_proj.startswith("gated"),
            vocab=config.vocab_size,
            embed=config.d_model,
            decoder_layers=config.num_decoder_layers or config.num_layers,
        )
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if hasattr(config, "ffn_dim"):  # OPT
        ffn, gated = config.ffn_dim, False
    else:
        ffn, gated = (
            config.intermediate_size,
            getattr(config, "hidden_act", "") in ("silu", "swiglu", "gelu_pytorch_tanh"),
        )
    return LLMShape(
        hidden=hidden,
        layers=config.num_hidden_layers,
        attn=heads * head_dim,
        kv=kv_heads * head_dim,
        ffn=ffn,
        gated=gated,
        vocab=config.vocab_size,
        embed=getattr(config, "word_embed_proj_dim", None) or hidden,
    )


def _ffn_macs(shape: LLMShape, tokens: int) -> int:
    return tokens * shape.hidden * shape.ffn * (3 if shape.gated else 2)


def _self_attention_macs(shape: LLMShape, tokens: int) -> int:
    projections = tokens * shape.hidden * (2 * shape.attn + 2 * shape.kv)  # q, out; k, v
    return projections + 2 * tokens * tokens * shape.attn


def llm_forward_flops(shape: LLMShape, tokens: int, decoder_tokens: int = 0) -> int:
    """Forward FLOPs per sample, the LM head on every output position (as transformers computes it).

    Decoder-only: `tokens` = soft prompt + text. Encoder-decoder: `tokens` into the encoder (soft prompt + text
    prefix), `decoder_tokens` into the decoder, which cross-attends to the encoder's output in every layer.
    """
    h, e = shape.hidden, shape.embed
    if not shape.is_encoder_decoder:
        proj = 2 * tokens * h * e if e != h else 0  # OPT's project_in / project_out
        layers = shape.layers * (_self_attention_macs(shape, tokens) + _ffn_macs(shape, tokens))
        return 2 * (layers + proj + tokens * e * shape.vocab)
    s, t = tokens, decoder_tokens
    encoder = shape.layers * (_self_attention_macs(shape, s) + _ffn_macs(shape, s))
    cross = t * h * 2 * shape.attn + s * h * 2 * shape.kv + 2 * t * s * shape.attn
    decoder = shape.decoder_layers * (_self_attention_macs(shape, t) + cross + _ffn_macs(shape, t))
    return 2 * (encoder + decoder + t * h * shape.vocab)


# -- training steps -------------------------------------------------------------------------------------------------


@dataclass
class StepFlops:
    """Training FLOPs per sample, by part (each already multiplied by its forward/backward factor)."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return (
            ", ".join(f"{k} {v / 1e9:.3g}" for k, v in self.parts.items()) + f" GFLOPs (total {self.total / 1e9:.4g})"
        )


def _vision_part(cfg: Blip2Config) -> tuple[int, int]:
    """(ViT training FLOPs per sample, N): forward only when frozen, else forward + backward."""
    return vision_forward_flops(cfg.vision) * (1 if cfg.vision.frozen else 3), vision_tokens(cfg.vision)


def stage1_forward_flops(
    cfg: Blip2Config, text: int, global_batch: int = 1, image_tokens: int | None = None, world_size: int = 1
) -> dict:
    """Forward FLOPs per sample of the trainable stage-1 parts, by loss: ITC (queries pass + vision_proj, text pass
    + text_proj on [CLS], the two similarity einsums over the global batch), ITM (3 joint pairs per sample, each
    with the ITM head on every query), ITG (decode + LM head); and, when the step shares them
    (`stage1_shares_image_kv`), the image keys/values (`image_kv`: once per image, twice under torchrun)."""
    q = cfg.qformer
    n = image_tokens if image_tokens is not None else vision_tokens(cfg.vision)
    Q, D, P = q.num_query_tokens, q.hidden_size, cfg.embed_dim
    shared = stage1_shares_image_kv(q, n, world_size)
    itc = qformer_query_flops(q, n, shared) + 2 * Q * D * P + qformer_text_flops(q, text) + 2 * D * P
    itc_sims = 2 * (2 * global_batch * Q * P)
    itm = 3 * (qformer_itm_flops(q, text, n, shared) + 2 * Q * D * 2)
    itg = qformer_itg_flops(q, text)
    parts = {"itc": itc, "itc_sims": itc_sims, "itm": itm, "itg": itg}
    if shared:
        parts["image_kv"] = 2 * image_kv_macs(q, n) * (1 if world_size == 1 else 2)
    return parts


def stage1_train_flops(cfg: Blip2Config, text: int, global_batch: int = 1, world_size: int = 1) -> StepFlops:
    """Training FLOPs per sample of a stage-1 step: ViT forward (x3 if not frozen), the rest forward + backward.

    The ITC similarities with `itc_gather="faithful"` (the default) detach the other side: their backward forms
    one gradient, 2x forward in all; "connected" forms both, 3x. Texts assumed `text` tokens long.
    """
    vit, n = _vision_part(cfg)
    fwd = stage1_forward_flops(cfg, text, global_batch, n, world_size)
    sims = fwd.pop("itc_sims") * (2 if cfg.itc_gather == "faithful" else 3)
    parts = {"vit": vit, **{k: 3 * v for k, v in fwd.items()}}
    parts["itc"] += sims
    return StepFlops(parts)


def stage2_train_flops(
    cfg: Blip2Config, llm: LLMShape, text: int, *, decoder_text: int = 0, instruction: int = 0
) -> StepFlops:
    """Training FLOPs per sample of a stage-2 step: ViT forward, the Q-Former's queries pass (with `instruction`
    Q-Former tokens for an instruction-aware model) and `llm_proj` forward + backward (3x), the frozen LLM 2x
    forward (backward through its activations only, into the soft prompt; the exact count differs a little:
    attention's backward forms gradients of both operands, and layers before any input that needs a gradient
    form none). Decoder-only: Q + `text` tokens; encoder-decoder: Q + `text` into the encoder, `decoder_text`
    into the decoder."""
    vit, n = _vision_part(cfg)
    q = cfg.qformer
    Q = q.num_query_tokens
    qformer = qformer_pass_flops(q, queries=Q, text=instruction, image_tokens=n) + 2 * Q * q.hidden_size * llm.hidden
    llm_fwd = llm_forward_flops(llm, Q + text, decoder_text)
    return StepFlops({"vit": vit, "qformer": 3 * qformer, "llm": 2 * llm_fwd})


__all__ = [
    "LLMShape",
    "StepFlops",
    "absorbed_is_cheaper",
    "cross_attention_macs",
    "llm_forward_flops",
    "llm_shape",
    "qformer_itg_flops",
    "qformer_itm_flops",
    "qformer_pass_flops",
    "qformer_query_flops",
    "qformer_text_flops",
    "image_kv_macs",
    "stage1_forward_flops",
    "stage1_shares_image_kv",
    "stage1_train_flops",
    "stage2_train_flops",
    "vision_forward_flops",
    "vision_shape",
    "vision_tokens",
    "vit_forward_flops",
]
