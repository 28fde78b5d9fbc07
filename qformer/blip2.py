"""BLIP-2 stage 1: frozen image encoder -> `ln_vision` -> Q-Former, with the ITC projections, ITM head and the
Q-Former's own LM head for image-grounded generation (ITG). Losses live in `qformer.losses`; the training step
that joins model and losses lives in `tasks/stage1.py`.

    images [B, 3, H, W] --visual (frozen)--> [B, N, E] --ln_vision--> image_embeds [B, N, E]
    image_embeds --Q-Former, queries only--> [B, Q, D] --vision_proj, normalize--> image feats [B, Q, P]
    text ids [B, T] --Q-Former, text only--> [B, T, D] --CLS, text_proj, normalize--> text feat [B, P]
    (image_embeds, text) --joint pass--> queries [B, Q, D] --itm_head, mean over Q--> ITM logits [B, 2]
    query cache + [DEC] text --causal decode--> [B, T, D] --LM head--> ITG logits [B, T, V]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qformer.caption import GenerationConfig, generate
from qformer.config import Blip2Config
from qformer.convert import QFORMER_KEYS, KeyMap, convert_state_dict, load_converted
from qformer.qformer import KVCache, QFormer

logger = logging.getLogger(__name__)

# Stage-1 modules outside the Q-Former: (ours, LAVIS, transformers `Blip2ForImageTextRetrieval`).
STAGE1_KEYS = QFORMER_KEYS + KeyMap(
    (
        ("ln_vision", "ln_vision", "vision_model.post_layernorm"),
        ("vision_proj", "vision_proj", "vision_projection"),
        ("text_proj", "text_proj", "text_projection"),
        ("itm_head", "itm_head", "itm_head"),
        ("temp", "temp", None),  # transformers keeps no ITC temperature
    )
)
# Where each format keeps the image encoder's own weights (its inner names are converted by qformer.vision).
VISUAL_PREFIX = {"ours": "visual.model.", "lavis": "visual_encoder.", "transformers": "vision_model."}


@dataclass
class ImageFeatures:
    query_output: Tensor  # [B, Q, D]
    feats: Tensor  # [B, Q, P], unit length
    cache: KVCache | None  # the queries' self-attention keys/values, for ITG and captioning


@dataclass
class TextFeatures:
    output: Tensor  # [B, T, D]
    feat: Tensor  # [B, P], unit length (from CLS)


@dataclass
class Features:
    """What `extract_features` returns; fields not asked for by the mode are None."""

    image_embeds: Tensor | None = None  # [B, Q, D] query outputs
    image_embeds_proj: Tensor | None = None  # [B, Q, P]
    text_embeds: Tensor | None = None  # [B, T, D]
    text_embeds_proj: Tensor | None = None  # [B, P]
    multimodal_embeds: Tensor | None = None  # [B, Q, D] query outputs of the joint (ITM) pass


class Blip2Stage1(nn.Module):
    def __init__(self, cfg: Blip2Config, *, visual: nn.Module | None = None, build_visual: bool = True):
        """visual: an image encoder to use (built from `cfg.vision` when None and `build_visual`); without one the
        model takes precomputed encoder outputs (`image_embeds` before `ln_vision`) via `embed_image_tokens`."""
        super().__init__()
        self.cfg = cfg
        if visual is None and build_visual:
            from qformer.vision import build_vision_encoder

            visual = build_vision_encoder(cfg.vision)
        self.visual = visual
        width, hidden = cfg.qformer.encoder_width, cfg.qformer.hidden_size
        # Trainable, and run in fp32 whatever the frozen encoder's precision (as the reference's LayerNorm does).
        self.ln_vision = nn.LayerNorm(width, eps=cfg.ln_vision_eps)
        self.qformer = QFormer(cfg.qformer)
        self.vision_proj = nn.Linear(hidden, cfg.embed_dim)
        self.text_proj = nn.Linear(hidden, cfg.embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        std = cfg.qformer.initializer_range
        for linear in (self.vision_proj, self.text_proj, self.itm_head):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)

    # -- the pieces the losses need ------------------------------------------------------------------------------

    def encode_image(self, images: Tensor) -> Tensor:  # [B, 3, H, W] -> image_embeds [B, N, E] (fp32)
        if self.visual is None:
            raise ValueError(
                "this model was built without an image encoder: pass encoder outputs to embed_image_tokens"
            )
        return self.embed_image_tokens(self.visual(images))

    def embed_image_tokens(self, tokens: Tensor) -> Tensor:  # frozen encoder output [B, N, E] -> [B, N, E]
        return self.ln_vision(tokens.float())

    def image_features(
        self,
        image_embeds: Tensor | None = None,
        *,
        use_cache: bool = True,
        image_kv: list[tuple[Tensor, Tensor] | None] | None = None,  # instead of image_embeds (QFormer.forward)
    ) -> ImageFeatures:
        out = self.qformer(image_embeds=image_embeds, use_cache=use_cache, image_kv=image_kv)
        feats = F.normalize(self.vision_proj(out.hidden), dim=-1)  # [B, Q, P]
        return ImageFeatures(out.hidden, feats, out.cache)

    def text_features(self, input_ids: Tensor, attention_mask: Tensor | None) -> TextFeatures:
        out = self.qformer(input_ids, attention_mask).hidden  # [B, T, D]
        return TextFeatures(out, F.normalize(self.text_proj(out[:, 0]), dim=-1))

    def multimodal_output(
        self,
        image_embeds: Tensor | None,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        image_kv: list[tuple[Tensor, Tensor] | None] | None = None,  # instead of image_embeds (QFormer.forward)
    ) -> Tensor:
        """Query outputs `[B, Q, D]` of the bidirectional joint pass (ITM)."""
        hidden = self.qformer(input_ids, attention_mask, image_embeds=image_embeds, image_kv=image_kv).hidden
        return hidden[:, : self.cfg.qformer.num_query_tokens]

    def itm_logits(
        self,
        image_embeds: Tensor | None,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        image_kv: list[tuple[Tensor, Tensor] | None] | None = None,
    ) -> Tensor:
        """`[B, 2]`: the ITM head on every query output, averaged over the queries."""
        return self.itm_head(self.multimodal_output(image_embeds, input_ids, attention_mask, image_kv)).mean(dim=1)

    def itg_logits(self, cache: KVCache, decoder_input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """`[B, T, V]`: `[DEC]`-led text decoded causally against the queries' cache (gradients reach the queries)."""
        return self.qformer.lm_logits(self.qformer.decode(decoder_input_ids, cache, attention_mask).hidden)

    # -- inference -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def extract_features(
        self,
        image: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        mode: str = "multimodal",
    ) -> Features:
        """Features for "image", "text" or "multimodal" (the ITM pass's query outputs), as LAVIS names them."""
        if mode not in ("image", "text", "multimodal"):
            raise ValueError(f"mode must be 'image', 'text' or 'multimodal', got {mode!r}")
        if mode in ("image", "multimodal") and image is None:
            raise ValueError(f"mode {mode!r} needs an image")
        if mode in ("text", "multimodal") and input_ids is None:
            raise ValueError(f"mode {mode!r} needs input_ids")
        out = Features()
        if mode == "image":
            f = self.image_features(self.encode_image(image), use_cache=False)
            out.image_embeds, out.image_embeds_proj = f.query_output, f.feats
        elif mode == "text":
            t = self.text_features(input_ids, attention_mask)
            out.text_embeds, out.text_embeds_proj = t.output, t.feat
        else:
            out.multimodal_embeds = self.multimodal_output(self.encode_image(image), input_ids, attention_mask)
        return out

    @torch.no_grad()
    def itc_similarity(self, image_feats: Tensor, text_feat: Tensor) -> Tensor:
        """Cosine similarity `[B_img, B_txt]`: the best of the Q queries for each pair (no temperature)."""
        return torch.einsum("iqp,tp->itq", image_feats, text_feat).amax(dim=-1)

    @torch.no_grad()
    def match(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor | None, head: str = "itm") -> Tensor:
        """Score each (image b, text b) pair: ITM probability of a match, or the ITC cosine similarity."""
        image_embeds = self.encode_image(image)
        if head == "itm":
            return self.itm_logits(image_embeds, input_ids, attention_mask).softmax(dim=-1)[:, 1]
        if head == "itc":
            feats = self.image_features(image_embeds, use_cache=False).feats  # [B, Q, P]
            text = self.text_features(input_ids, attention_mask).feat  # [B, P]
            return torch.einsum("bqp,bp->bq", feats, text).amax(dim=-1)
        raise ValueError(f"head must be 'itm' or 'itc', got {head!r}")

    @torch.no_grad()
    def generate(
        self,
        image: Tensor,
        *,
        bos_token_id: int,
        eos_token_id: int,
        pad_token_id: int,
        cfg: GenerationConfig | None = None,
    ) -> Tensor:
        """Caption ids `[B * n, <= max_new_tokens]` from the Q-Former's LM head, decoded by transformers' `generate`
        (`qformer.caption.generate`): `[DEC]` first (not returned), `[SEP]` ends, pads after it. The image is read
        once. With `cfg.num_return_sequences` n > 1, rows b*n ... b*n+n-1 are image b's (transformers' order)."""
        cache = self.image_features(self.encode_image(image)).cache
        return generate(
            self.qformer,
            cache,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            cfg=cfg,
        )

    def caption(self, image: Tensor, tokenizer, cfg: GenerationConfig | None = None) -> list[str]:
        """Captions as text, with the BERT tokenizer the model was trained with (its `[DEC]` in the CLS slot); B*n
        of them with `cfg.num_return_sequences` n, in `generate`'s order."""
        ids = self.generate(
            image,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
            cfg=cfg,
        )
        return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def stage1_state_dict(model: Blip2Stage1, fmt: str = "ours", *, include_visual: bool = True) -> dict[str, Tensor]:
    """The stage-1 model's weights under `fmt` names ("ours", "lavis", "transformers").

    LAVIS's pretrained stage-1 files leave the frozen image encoder out: pass include_visual=False to match them.
    """
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}
    out = convert_state_dict(own, "ours", fmt, STAGE1_KEYS).state
    if include_visual and model.visual is not None:
        from qformer.vision import vision_state_dict

        out.update(vision_state_dict(model.visual, "timm" if fmt == "ours" else fmt, prefix=VISUAL_PREFIX[fmt]))
    return out


def load_stage1_state(
    model: Blip2Stage1, state: dict[str, Tensor], fmt: str, *, source: str = "checkpoint", require_visual: bool = False
) -> list[str]:
    """Load a whole stage-1 checkpoint strictly; returns the keys left out on purpose.

    Expected absences are named, never silent: a LAVIS pretrained file has no `visual_encoder.*` (the frozen
    encoder keeps the weights it was built with); a transformers retrieval folder has no ITC temperature and no
    Q-Former LM head (those keep their initial values, and a warning says so).
    """
    visual, rest = split_visual_state(state, fmt)
    allowed = ["visual."]
    if fmt == "transformers":
        allowed += ["temp", "qformer.lm_head."]
        logger.warning(
            "%s: transformers' BLIP-2 has no ITC temperature or Q-Former LM head; they keep their init", source
        )
    dropped = load_converted(model, rest, fmt, key_map=STAGE1_KEYS, source=source, allowed_missing=allowed)
    return dropped + load_visual_state(model, visual, fmt, source=source, require_visual=require_visual)


def split_visual_state(state: dict[str, Tensor], fmt: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(the image encoder's keys, the rest) of a whole stage-1 or stage-2 checkpoint in `fmt` names."""
    prefix = VISUAL_PREFIX[fmt]
    ln_vision_key = "vision_model.post_layernorm."  # transformers keeps our ln_vision inside vision_model
    visual = {k: v for k, v in state.items() if k.startswith(prefix) and not k.startswith(ln_vision_key)}
    return visual, {k: v for k, v in state.items() if k not in visual}


def load_visual_state(
    model: nn.Module, visual: dict[str, Tensor], fmt: str, *, source: str, require_visual: bool
) -> list[str]:
    """Load a checkpoint's image encoder keys (from `split_visual_state`) into `model.visual` strictly; returns the
    keys left out on purpose. No keys: the encoder keeps the weights it was built with, unless `require_visual`."""
    prefix = VISUAL_PREFIX[fmt]
    if visual:
        if model.visual is None:
            raise ValueError(f"{source} holds image encoder weights ({prefix}*) but the model has no image encoder")
        from qformer.vision import load_vision_weights

        return load_vision_weights(model.visual, visual, "timm" if fmt == "ours" else fmt, prefix=prefix)
    if require_visual:
        raise ValueError(f"{source} has no image encoder weights ({prefix}*)")
    if model.visual is not None:
        logger.info("%s has no %s* keys: the image encoder keeps the weights it was built with", source, prefix)
    return []
