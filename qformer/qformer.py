"""The Q-Former: a BERT-shaped transformer whose learned queries read a frozen image encoder.

Shape legend (used in every comment and docstring of the package):
    B  batch                              Q  query tokens (32)
    T  text tokens                        L  sequence in a pass: Q + T, Q, or T
    P  cached positions (queries + earlier text) when decoding
    N  image tokens (257 for ViT-g/14 at 224 px)
    D  Q-Former width (768)               E  image feature width (1408 ViT-g, 1024 ViT-L)
    H  attention heads                    d  head width, D / H
    F  feed-forward width (3072)          V  vocabulary (30523: BERT + `[DEC]`)

One layer, on the sequence `[queries; text]` (post-LN BERT blocks):

    x = norm(x + self_attention(x))                    all L positions, mask by mode (see masks.py)
    q = x[:, :Q]  -> norm(q + cross_attention(q, image))   only in layers i % cross_attention_freq == 0
    q -> query FFN,   t = x[:, Q:] -> text FFN           two separate feed-forward blocks
    x = [q; t]

Modes (DESIGN.md section 3) are just different inputs and masks to the same `forward`:
    image features only          -> queries-only pass (ITC image side; stage 2)
    text only                    -> text-only pass (ITC text side)
    image features and text      -> joint pass: bidirectional (ITM) or `causal=True` (ITG)
    `decode(text, cache)`        -> ITG text pass against the queries' cached keys/values; token-by-token
                                    decoding with the same cache.
    `decode_shared(token, cache)` -> one generation step, the queries' keys/values held once per image
                                    (`SharedQueryCache`) for all of its beams or samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qformer.config import QFormerConfig
from qformer.cpu_malloc import keep_large_blocks
from qformer.dropout import Dropout, attention, keep_mask
from qformer.flops import absorbed_is_cheaper
from qformer.masks import cross_attention_mask, self_attention_mask
from qformer.packed_linear import Linear

logger = logging.getLogger(__name__)


@dataclass
class KVCache:
    """Self-attention keys/values of every layer, `[B, H, P, d]` each; the first `query_length` are the queries'."""

    layers: list[tuple[Tensor, Tensor]]
    query_length: int

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[2]

    @property
    def text_length(self) -> int:
        return self.length - self.query_length

    def index_select(self, index: Tensor) -> KVCache:
        """Rows of the batch in a new order: beam reordering, or `repeat_interleave` indices to share an image."""
        return KVCache(
            [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.layers], self.query_length
        )


@dataclass
class SharedQueryCache:
    """The decoding cache of k rows per image (beams or samples): the queries' keys/values once per image, the
    text's per row. Beam reordering (`index_select`) then copies only the text, and a step never copies the queries'
    part (with 32 queries and captions of up to 30 tokens, most of the cache).

    Row r belongs to image r // rows_per_image; a reorder must keep every row within its image (beam search does).
    """

    queries: list[tuple[Tensor, Tensor]]  # per layer, [B, H, Q, d]
    text: list[tuple[Tensor, Tensor]]  # per layer, [B * rows_per_image, H, T, d]
    rows_per_image: int = 1

    @classmethod
    def of(cls, cache: KVCache) -> SharedQueryCache:
        """A queries-only `KVCache` (one row per image), with no text yet."""
        if cache.text_length:
            raise ValueError(f"expected the queries' cache alone, got {cache.text_length} text positions in it")
        return cls(cache.layers, [(k[:, :, :0], v[:, :, :0]) for k, v in cache.layers])

    @property
    def query_length(self) -> int:
        return self.queries[0][0].shape[2]

    @property
    def text_length(self) -> int:
        return self.text[0][0].shape[2]

    def index_select(self, index: Tensor, rows_per_image: int | None = None) -> SharedQueryCache:
        """Text rows in a new order (`index` into the current rows); `rows_per_image` to repeat each image's rows."""
        text = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.text]
        return SharedQueryCache(self.queries, text, rows_per_image or self.rows_per_image)


@dataclass
class QFormerOutput:
    hidden: Tensor  # [B, L, D]
    cache: KVCache | None = None


class Attention(nn.Module):
    """Multi-head attention inside BERT's post-LN residual: `norm(x + out(attend(x, context)))`."""

    def __init__(self, cfg: QFormerConfig, context_width: int):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.dropout_p = cfg.attention_dropout
        self.impl = cfg.cross_attention_impl
        self.q = Linear(cfg.hidden_size, cfg.hidden_size)
        self.k = Linear(context_width, cfg.hidden_size)
        self.v = Linear(context_width, cfg.hidden_size)
        self.out = Linear(cfg.hidden_size, cfg.hidden_size)
        self.drop = Dropout(cfg.hidden_dropout)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def _split_heads(self, x: Tensor) -> Tensor:  # [B, L, D] -> [B, H, L, d]
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(
        self,
        x: Tensor,  # [B, L, D]
        context: Tensor | None = None,  # [B, N, E] for cross-attention; None for self-attention
        mask: Tensor | None = None,  # additive, broadcastable to [B, H, L, P + L] (or [B, H, L, N])
        past: tuple[Tensor, Tensor] | None = None,  # cached self-attention keys/values [B, H, P, d]
        context_kv: tuple[Tensor, Tensor] | None = None,  # precomputed cross-attention keys/values [B, H, N, d]
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        if context_kv is not None:
            q = self._split_heads(self.q(x))
            k, v = (t.to(q.dtype) for t in context_kv)
            dropout = self.dropout_p if self.training else 0.0
            mask = None if mask is None else mask.to(q.dtype)
            a = attention(q, k, v, mask, dropout, self._cross_keep(q, k, dropout)).transpose(1, 2).flatten(2)
            return self.norm(x + self.drop(self.out(a))), None
        if context is not None and self._absorb(x.shape[1], context.shape[1]):
            a = self._attend_absorbed(x, context, mask)  # [B, L, D]
            return self.norm(x + self.drop(self.out(a))), None  # x may be one row shared by all B images
        if context is not None and x.shape[0] != context.shape[0]:
            x = x.expand(context.shape[0], -1, -1)  # shared queries (`QFormer._shares_queries`): one row per image
        source = x if context is None else context
        q = self._split_heads(self.q(x))  # [B, H, L, d]
        k = self._split_heads(self.k(source))  # [B, H, L or N, d]
        v = self._split_heads(self.v(source))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # [B, H, P + L, d]
            v = torch.cat([past[1], v], dim=2)
        if mask is not None:
            mask = mask.to(q.dtype)  # autocast may run q in a lower precision than the mask was built in
        dropout = self.dropout_p if self.training else 0.0
        keep = None if context is None else self._cross_keep(q, k, dropout)
        a = attention(q, k, v, mask, dropout, keep)  # [B, H, L, d]
        a = a.transpose(1, 2).flatten(2)  # [B, L, D]
        return self.norm(x + self.drop(self.out(a))), (k, v)

    def decode_step(
        self,
        x: Tensor,  # [R, 1, D], one new text position per row
        queries: tuple[Tensor, Tensor],  # the queries' keys/values [B, H, Q, d], shared by R / B consecutive rows
        past: tuple[Tensor, Tensor],  # earlier text keys/values [R, H, T, d]
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Self-attention of one new text token over `[queries; text so far; itself]` (all visible: the causal
        mask hides only later tokens), with the queries' part read per image instead of per row."""
        q = self._split_heads(self.q(x))  # [R, H, 1, d]
        k = torch.cat([past[0], self._split_heads(self.k(x))], dim=2)  # [R, H, T + 1, d]
        v = torch.cat([past[1], self._split_heads(self.v(x))], dim=2)
        qk, qv = queries  # [B, H, Q, d]
        rows, h, _, d = q.shape
        if rows == qk.shape[0]:  # one row per image (greedy): one fused attention over [queries; text] is faster
            a = F.scaled_dot_product_attention(q, torch.cat([qk, k], dim=2), torch.cat([qv, v], dim=2))
        else:
            grouped = q.view(qk.shape[0], rows // qk.shape[0], h, d)  # [B, k, H, d]
            to_queries = torch.einsum("bkhd,bhqd->bkhq", grouped, qk).reshape(rows, h, 1, -1)  # [R, H, 1, Q]
            to_text = q @ k.transpose(-1, -2)  # [R, H, 1, T + 1]
            p = (torch.cat([to_queries, to_text], dim=-1) * d**-0.5).softmax(dim=-1, dtype=torch.float32).to(q.dtype)
            p_queries, p_text = p.split([qk.shape[2], k.shape[2]], dim=-1)
            a = torch.einsum("bkhq,bhqd->bkhd", p_queries.reshape(grouped.shape[:3] + (-1,)), qv).reshape(q.shape)
            a = a + p_text @ v  # [R, H, 1, d]
        return self.norm(x + self.drop(self.out(a.transpose(1, 2).flatten(2)))), (k, v)  # [R, 1, D]

    @staticmethod
    def _cross_keep(q: Tensor, k: Tensor, dropout: float) -> Tensor | None:
        """The direct cross-attention's CPU dropout mask `[B, H, L, N]`, drawn in the absorbed form's `[B, L, H, N]`
        order (`_attend_absorbed`) so that a seed drops the same weights in both."""
        if not dropout or q.device.type != "cpu":
            return None
        (b, h, length, _), n = q.shape, k.shape[2]
        return keep_mask((b, length, h, n), dropout, q.dtype, q.device).transpose(1, 2)

    def context_keys_values(self, context: Tensor) -> tuple[Tensor, Tensor]:  # [B, N, E] -> 2 x [B, H, N, d]
        return self._split_heads(self.k(context)), self._split_heads(self.v(context))

    def _absorb(self, length: int, context_length: int) -> bool:
        if self.impl != "auto":
            return self.impl == "absorbed"
        return absorbed_is_cheaper(self.num_heads, self.q.out_features, self.k.in_features, length, context_length)

    def _attend_absorbed(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        """Cross-attention without forming image keys and values; returns the heads' outputs `[B, L, D]`.

        Scores `q_h . (X Wk_h + bk_h)` equal `(q_h Wk_h) . X` plus `q_h . bk_h`, the same for every image token
        of a row, which softmax ignores. Values: `P (X Wv_h + bv_h) = (P X) Wv_h + rowsum(P) bv_h`. So the key
        projection moves onto the L queries and the value projection after the weighted sum: with 32 queries
        over 257 x 1408 ViT-g tokens this is about half the multiply-adds of the direct form.

        Score rows are (query, head) pairs, not (head, query): the per-head products then read and write their
        `[B, L, H, E]` operands in place (`_heads_matmul`), where the head-major order cost two permute copies of
        them per layer, more time than the saved multiply-adds.
        """
        h, (rows, length, _), (b, n, width) = self.num_heads, x.shape, context.shape
        d = self.q.out_features // h
        q = (self.q(x) * d**-0.5).view(rows * length, h, d).transpose(0, 1)  # [H, B*L, d]; the scale is a power of 2
        # Large intermediates ([B, L, H, E]) are not kept in locals: freed at once, the next one reuses their pages.
        qk = _heads_matmul(q, self.k.weight.view(h, d, width).to(q.dtype)).view(rows, length * h, width)
        if rows == b:
            scores = qk @ context.transpose(1, 2).to(qk.dtype)  # [B, L*H, N]
        else:  # one row of queries shared by all B images: a single product against all B*N image tokens
            scores = qk[0] @ context.reshape(b * n, width).T.to(qk.dtype)  # [L*H, B*N]
            scores = scores.view(length * h, b, n).transpose(0, 1)  # [B, L*H, N] view
        del qk
        if mask is not None:
            scores = scores + mask.flatten(1, 2).to(scores.dtype)  # [B, 1, N] over every head and query
        p = torch.softmax(scores.float(), dim=-1).to(scores.dtype)
        dropped = self.training and self.dropout_p
        if dropped:
            # In P's own (query, head) row order: the direct form applies the same draws through a transposed view
            # (`_cross_keep`), so that on the CPU a seed drops the same weights in both (CUDA's fused SDPA draws its
            # own). Multiplying P by a transposed mask instead cost ~1% of a paper-size training pass.
            p = p * keep_mask((b, length * h, n), self.dropout_p, p.dtype, p.device)
        px = (p @ context.to(p.dtype)).view(b * length, h, width).transpose(0, 1)  # [H, B*L, E]
        a = _heads_matmul(px, self.v.weight.view(h, d, width).transpose(1, 2).to(px.dtype))  # [B*L, H, d]
        del px
        bias = self.v.bias.view(h, d).to(a.dtype)  # rows of P sum to 1 unless dropout removed some weights
        a = a + (p.sum(-1).view(b * length, h, 1) * bias if dropped else bias)
        return a.view(b, length, h * d)  # [B, L, D]


class _HeadsMatmul(torch.autograd.Function):
    """Per-head products `[H, M, K] @ [H, K, N]` returned as `[M, H, N]`, read and written in that layout, so that
    nothing is permuted into place.

    torch's batched CPU kernel (one MKL call over all heads) takes only a contiguous result; into a strided one it
    multiplies head by head. A narrow result (`[M, H, d]`: the value projection, the query gradient of the key path)
    is therefore formed contiguous and copied into place, 1.6-1.8 ms against 2.2 ms per product at the paper size; a
    wide one (`[M, H, E]`, 17 MB) is written in place, where the copy would cost more than the per-head loop.
    """

    @staticmethod
    def forward(ctx, a: Tensor, w: Tensor) -> Tensor:  # [H, M, K], [H, K, N] -> [M, H, N]
        ctx.save_for_backward(a, w)
        out = a.new_empty(a.shape[1], a.shape[0], w.shape[2])
        _bmm_into(a, w, out.transpose(0, 1))
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        a, w = ctx.saved_tensors
        g = grad.transpose(0, 1)  # [H, M, N]
        grad_a = None
        if ctx.needs_input_grad[0]:  # in the [M, H, K] memory order `a` is a transposed view of (both callers)
            grad_a = a.new_empty(a.shape[1], a.shape[0], a.shape[2]).transpose(0, 1)
            _bmm_into(g, w.transpose(1, 2), grad_a)
        grad_w = None
        if ctx.needs_input_grad[1]:
            if w.stride(1) == 1 and w.stride(2) != 1:  # a transposed view (the value path's `Wv_h^T`): the product
                grad_w = torch.bmm(g.transpose(1, 2), a).transpose(1, 2)  # formed transposed lands in its layout
            else:
                grad_w = torch.bmm(a.transpose(1, 2), g)
        return grad_a, grad_w


def _bmm_into(a: Tensor, b: Tensor, out: Tensor) -> None:  # [H, M, K] @ [H, K, N] into `out` [H, M, N], strided
    if b.shape[2] < b.shape[1]:  # narrow: batched into a contiguous result, then copied
        out.copy_(torch.bmm(a, b))
    else:
        torch.bmm(a, b, out=out)


def _heads_matmul(a: Tensor, w: Tensor) -> Tensor:  # [H, M, K], [H, K, N] -> [M, H, N]
    return _HeadsMatmul.apply(a, w)


class FeedForward(nn.Module):
    """BERT's feed-forward block: `norm(x + fc2(gelu(fc1(x))))`."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.drop = Dropout(cfg.hidden_dropout)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:  # [B, L, D] -> [B, L, D]
        return self.norm(x + self.drop(self.fc2(F.gelu(self.fc1(x)))))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, index: int):
        super().__init__()
        self.self_attn = Attention(cfg, cfg.hidden_size)
        self.cross_attn = Attention(cfg, cfg.encoder_width) if cfg.has_cross_attention(index) else None
        self.ffn_query = FeedForward(cfg)
        self.ffn_text = FeedForward(cfg) if cfg.with_text else None

    def forward(
        self,
        x: Tensor,  # [B, L, D], the first `query_length` positions are queries
        query_length: int,
        self_mask: Tensor | None,
        image_embeds: Tensor | None,  # [B, N, E]
        image_mask: Tensor | None,
        past: tuple[Tensor, Tensor] | None,
        image_kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        x, kv = self.self_attn(x, mask=self_mask, past=past)
        if query_length == 0:
            return self.ffn_text(x), kv
        queries = x[:, :query_length]  # [B, Q, D]
        if self.cross_attn is not None:
            queries, _ = self.cross_attn(queries, context=image_embeds, mask=image_mask, context_kv=image_kv)
        queries = self.ffn_query(queries)
        if x.shape[1] == query_length:
            return queries, kv
        return torch.cat([queries, self.ffn_text(x[:, query_length:])], dim=1), kv


class Embeddings(nn.Module):
    """Text gets word + absolute position embeddings (positions start at 0 after the queries); queries get none.

    `[queries; text]` then shares one LayerNorm and dropout.
    """

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        if cfg.with_text:
            self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
            self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = Dropout(cfg.hidden_dropout)

    def forward(
        self,
        queries: Tensor | None,  # [B, Q, D]
        input_ids: Tensor | None,  # [B, T]
        position_offset: int = 0,
    ) -> Tensor:  # [B, L, D]
        parts = [] if queries is None else [queries]
        if input_ids is not None:
            positions = torch.arange(position_offset, position_offset + input_ids.shape[1], device=input_ids.device)
            if positions.numel() and positions[-1] >= self.position.num_embeddings:
                raise ValueError(
                    f"text of {position_offset + input_ids.shape[1]} positions exceeds "
                    f"max_position_embeddings={self.position.num_embeddings}"
                )
            text = self.word(input_ids) + self.position(positions)  # [B, T, D]
            parts.append(text.to(queries.dtype) if queries is not None else text)
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.drop(self.norm(x))


class LMHead(nn.Module):
    """BERT's MLM head; the decoder matrix is the word embedding (tied), only its bias is its own."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: Tensor, word_embeddings: Tensor) -> Tensor:  # [B, T, D], [V, D] -> [B, T, V]
        return F.linear(self.norm(F.gelu(self.dense(hidden))), word_embeddings, self.bias)


class QFormer(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.hidden_size))  # [1, Q, D]
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(QFormerLayer(cfg, i) for i in range(cfg.num_layers))
        self.lm_head = LMHead(cfg) if cfg.with_text else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms."""
        std = self.cfg.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.query_tokens, std=std)
        if self.lm_head is not None:
            nn.init.zeros_(self.lm_head.bias)

    def _check_text(self, input_ids: Tensor | None) -> None:
        if input_ids is not None and not self.cfg.with_text:
            raise ValueError("this Q-Former was built with with_text=False (stage 2): it has no text path")

    def forward(
        self,
        input_ids: Tensor | None = None,  # [B, T]
        attention_mask: Tensor | None = None,  # [B, T], 1 = token, 0 = padding
        image_embeds: Tensor | None = None,  # [B, N, E]
        image_mask: Tensor | None = None,  # [B, N], 1 = token, 0 = padding
        *,
        causal: bool = False,
        use_cache: bool = False,
        image_kv: list[tuple[Tensor, Tensor] | None] | None = None,
    ) -> QFormerOutput:
        """One pass over `[queries; text]`; queries are present exactly when image input is given.

        image_kv: instead of `image_embeds`, every cross-attention layer's keys/values (`image_keys_values`),
        batch-aligned with the text: an image scored against many texts (retrieval re-ranking) forms them once.
        Returns hidden states `[B, L, D]` and, with `use_cache`, every layer's self-attention keys/values
        (for an image-only pass: the query cache that ITG and captioning decode against).
        """
        has_image = image_embeds is not None or image_kv is not None
        if input_ids is None and not has_image:
            raise ValueError("QFormer.forward needs image_embeds (or image_kv), input_ids, or both")
        if image_embeds is not None and image_kv is not None:
            raise ValueError("pass image_embeds or image_kv, not both")
        self._check_text(input_ids)
        queries, batch = None, 0
        if has_image:
            batch = image_embeds.shape[0] if image_embeds is not None else next(kv for kv in image_kv if kv)[0].shape[0]
            shared = input_ids is None and image_embeds is not None and self._shares_queries()
            queries = self.query_tokens if shared else self.query_tokens.expand(batch, -1, -1)  # [1 or B, Q, D]
        x = self.embeddings(queries, input_ids)  # [B, L, D]
        if has_image and x.device.type == "cpu":
            keep_large_blocks()  # the image side's large intermediates, reused instead of mapped afresh per layer
        if image_embeds is not None:
            image_embeds = image_embeds.to(x.dtype)  # a frozen half-precision ViT feeds an fp32 Q-Former
        query_length = 0 if queries is None else queries.shape[1]
        text_length = 0 if input_ids is None else input_ids.shape[1]
        mask = self_attention_mask(
            query_length,
            attention_mask,
            causal=causal,
            batch_size=x.shape[0],
            text_length=text_length,
            dtype=x.dtype,
            device=x.device,
        )
        image_mask = cross_attention_mask(image_mask, dtype=x.dtype)
        return self._run_layers(x, query_length, mask, image_embeds, image_mask, None, use_cache, image_kv, batch)

    def _shares_queries(self) -> bool:
        """Whether a queries-only pass runs the layers before the first cross-attention once for all images.

        Until the queries first read the image they are the same for every image, unless dropout makes them differ:
        then the embeddings and that self-attention run on one row, which the first cross-attention broadcasts
        (`Attention`). Only for inference (no autograd): there it saves about 2% of a paper-size pass at batch 8
        (more at larger batches); a training step would gain well under 1% and its FLOPs per sample would depend
        on the batch size (`qformer.flops` counts every row).
        """
        dropout = self.training and (self.cfg.hidden_dropout > 0 or self.cfg.attention_dropout > 0)
        return not dropout and not torch.is_grad_enabled()

    def image_keys_values(self, image_embeds: Tensor) -> list[tuple[Tensor, Tensor] | None]:
        """Every layer's cross-attention keys/values `[B, H, N, d]` (None where a layer has no cross-attention)."""
        image_embeds = image_embeds.to(self.query_tokens.dtype)
        return [
            None if layer.cross_attn is None else layer.cross_attn.context_keys_values(image_embeds)
            for layer in self.layers
        ]

    def decode(
        self,
        input_ids: Tensor,  # [B, T], the new text tokens
        cache: KVCache,  # keys/values of the queries and of the text before `input_ids`
        attention_mask: Tensor | None = None,  # [B, P - Q + T], padding over all text so far
    ) -> QFormerOutput:
        """Multimodal-causal text pass (ITG) against cached keys/values; returns the grown cache.

        The query cache is used as is (not detached), so ITG gradients reach the queries as in the reference.
        """
        self._check_text(input_ids)
        past_text = cache.text_length
        x = self.embeddings(None, input_ids, position_offset=past_text)  # [B, T, D]
        mask = self_attention_mask(
            cache.query_length,
            attention_mask,
            num_rows=input_ids.shape[1],
            causal=True,
            batch_size=x.shape[0],
            text_length=past_text + input_ids.shape[1],
            dtype=x.dtype,
            device=x.device,
        )
        return self._run_layers(x, 0, mask, None, None, cache, True)

    def decode_shared(self, input_ids: Tensor, cache: SharedQueryCache) -> tuple[Tensor, SharedQueryCache]:
        """One new token per row (`input_ids` `[R, 1]`) against a `SharedQueryCache`: the same result as `decode`
        on the per-row cache, for generation; returns the hidden states `[R, 1, D]` and the grown cache."""
        if input_ids.shape[1] != 1:
            raise ValueError(f"decode_shared takes one new token per row, got {input_ids.shape[1]}")
        self._check_text(input_ids)
        x = self.embeddings(None, input_ids, position_offset=cache.text_length)  # [R, 1, D]
        text = []
        for layer, queries, past in zip(self.layers, cache.queries, cache.text, strict=True):
            x, kv = layer.self_attn.decode_step(x, queries, past)
            x = layer.ffn_text(x)  # text positions never cross-attend
            text.append(kv)
        return x, SharedQueryCache(cache.queries, text, cache.rows_per_image)

    def _run_layers(
        self,
        x: Tensor,
        query_length: int,
        mask: Tensor | None,
        image_embeds: Tensor | None,
        image_mask: Tensor | None,
        cache: KVCache | None,
        use_cache: bool,
        image_kv: list[tuple[Tensor, Tensor] | None] | None = None,
        batch: int = 0,  # B when the queries come as one shared row (`_shares_queries`)
    ) -> QFormerOutput:
        if query_length and image_embeds is None and image_kv is None:
            raise ValueError("query positions need image_embeds for cross-attention")
        new_layers = []
        for i, layer in enumerate(self.layers):
            past = None if cache is None else cache.layers[i]
            kv_i = None if image_kv is None else image_kv[i]
            x, kv = layer(x, query_length, mask, image_embeds, image_mask, past, kv_i)
            if use_cache:
                new_layers.append(tuple(t.expand(max(batch, t.shape[0]), -1, -1, -1) for t in kv))
        if x.shape[0] < batch:  # no layer read the image (a Q-Former without cross-attention)
            x = x.expand(batch, -1, -1).contiguous()
        query_cache_length = query_length if cache is None else cache.query_length
        return QFormerOutput(x, KVCache(new_layers, query_cache_length) if use_cache else None)

    def lm_logits(self, hidden: Tensor) -> Tensor:  # [B, T, D] -> [B, T, V]
        if self.lm_head is None:
            raise ValueError("this Q-Former was built with with_text=False (stage 2): it has no LM head")
        return self.lm_head(hidden, self.embeddings.word.weight)
