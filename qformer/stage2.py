"""BLIP-2 stage 2: the Q-Former's query outputs, through one linear layer, as a soft prompt to a frozen LLM.

    images --frozen ViT, ln_vision--> [B, N, E] --Q-Former (query path only)--> [B, Q, D]
           --llm_proj--> soft prompt [B, Q, H] --> placed before the text embeddings of a frozen LLM

Decoder-only (OPT): `[soft prompt; "</s>caption\\n"]`, loss on the caption only. Batched generation pads on the
left, `[pads; soft prompt; prompt tokens]` (the layout transformers' BLIP-2 uses; OPT's positions skip the pads).
Encoder-decoder (Flan-T5): encoder input `[soft prompt; text prefix]`, decoder target the rest of the text.
Decoder-only LLaMA/Vicuna (InstructBLIP) runs the same way as OPT. With `llm.qformer_instruction` the Q-Former also
reads an instruction beside its queries (InstructBLIP; `qformer.instruct`); the LLM's side is unchanged.
The model gives logits; tokenising captions for training and the loss are `tasks/stage2.py`'s (as stage 1's
are `tasks/stage1.py`'s). Generation is transformers' `generate` on the LLM with these input embeddings.
"""

from __future__ import annotations

import logging
import string
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from qformer.blip2 import VISUAL_PREFIX, load_visual_state, split_visual_state
from qformer.caption import GenerationConfig
from qformer.config import Blip2Config, check_activation
from qformer.convert import INSTRUCT_QFORMER_KEYS, QFORMER_KEYS, KeyMap, convert_state_dict, load_converted
from qformer.dtypes import to_dtype
from qformer.instruct import default_pad_token, instruction_queries, tokenize_instructions
from qformer.qformer import QFormer

if TYPE_CHECKING:
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

VQA_PROMPT = "Question: {} Short answer:"
# Zero-shot VQA decoding of the paper: 5 beams, at most 10 new tokens, at least 1, length penalty -1.
VQA_GENERATION = GenerationConfig(max_new_tokens=10, min_new_tokens=1, num_beams=5, length_penalty=-1.0)
CAPTION_GENERATION = GenerationConfig(max_new_tokens=30, min_new_tokens=8, num_beams=5)


def check_vqa_prompt(prompt: str) -> str:
    """`prompt` if it has exactly one `{}`, where the question goes, and no other `{...}` field (a literal brace is
    `{{` or `}}`); else a ValueError saying what it has. Without the check `'hi'` would drop the question."""
    try:
        fields = [
            "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            for _, name, spec, conv in string.Formatter().parse(prompt)
            if name is not None
        ]
    except ValueError as e:  # an unmatched brace
        raise ValueError(f"prompt {prompt!r}: {e} (write a literal brace as '{{{{' or '}}}}')") from e
    if fields != ["{}"]:
        has = ", ".join(fields) if fields else "none"
        raise ValueError(f"prompt {prompt!r} needs exactly one '{{}}' (where the question goes), has: {has}")
    return prompt


def read_llm_config(path: str) -> PretrainedConfig:
    """The transformers config of a language model folder (or reachable hub name); FileNotFoundError naming `path`."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"cannot read a language model config from {path!r}: {e}") from e


def load_llm(path: str, dtype: str, *, t5_dense_act_fn: str | None = None) -> tuple[nn.Module, object]:
    """A frozen causal or seq2seq LM and its tokenizer from a local transformers folder (or reachable hub name).

    t5_dense_act_fn: the gated-FFN activation for a T5-family model (see `LLMConfig.t5_dense_act_fn`; LAVIS runs
    Flan-T5 with "gelu"); None keeps the folder's own. Models without `dense_act_fn` (OPT) ignore it.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    config = read_llm_config(path)
    if config.is_encoder_decoder and dtype == "fp16":
        raise ValueError(f"{path}: T5-style models overflow in fp16; use dtype bf16 (or fp32)")
    if t5_dense_act_fn is not None and config.is_encoder_decoder and hasattr(config, "dense_act_fn"):
        check_activation(t5_dense_act_fn, "t5_dense_act_fn")
        if config.dense_act_fn != t5_dense_act_fn:
            # The config, not the weights, picks the activation: set it before the model is built.
            logger.info(
                "%s: gated-FFN activation %s replaced by %s (llm.t5_dense_act_fn)",
                path,
                config.dense_act_fn,
                t5_dense_act_fn,
            )
            config.dense_act_fn = t5_dense_act_fn
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    llm = cls.from_pretrained(path, config=config, dtype=to_dtype(dtype))
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not config.is_encoder_decoder:
        default_pad_token(tokenizer)  # LLaMA's has none
    return llm, tokenizer


class Blip2Stage2(nn.Module):
    def __init__(
        self,
        cfg: Blip2Config,
        *,
        visual: nn.Module | None = None,
        build_visual: bool = True,
        llm: nn.Module | None = None,
        tokenizer=None,
        qformer_tokenizer=None,
    ):
        """llm, tokenizer: a language model and its tokenizer to use; loaded from `cfg.llm.path` when None.
        qformer_tokenizer: the Q-Former's (BERT) tokenizer, for instructions given as text (`llm.qformer_instruction`).
        """
        super().__init__()
        self.instruct = cfg.llm.qformer_instruction
        # Plain stage 2 keeps only the query path; an instruction-aware one also the text embeddings and text FFN.
        qcfg = cfg.qformer.replace(with_text=self.instruct)
        self.cfg = replace(cfg, qformer=qcfg)
        if visual is None and build_visual:
            from qformer.vision import build_vision_encoder

            visual = build_vision_encoder(cfg.vision)
        self.visual = visual
        self.ln_vision = nn.LayerNorm(qcfg.encoder_width, eps=cfg.ln_vision_eps)
        self.qformer = QFormer(qcfg)
        if self.instruct:
            self.qformer.lm_head = None  # it reads the instruction, never decodes text (LAVIS: `Qformer.cls = None`)
        self.qformer_tokenizer = qformer_tokenizer
        if llm is None:
            if not cfg.llm.path:
                raise ValueError("stage 2 needs a language model: set llm.path (a local transformers folder)")
            llm, tokenizer = load_llm(cfg.llm.path, cfg.llm.dtype, t5_dense_act_fn=cfg.llm.t5_dense_act_fn)
        elif llm.config.is_encoder_decoder and hasattr(llm.config, "dense_act_fn"):
            # A model handed in runs with its own activation: record that one, so a checkpoint saved from this model
            # rebuilds its LLM the same way.
            act = llm.config.dense_act_fn
            if act != cfg.llm.t5_dense_act_fn:
                logger.info(
                    "llm.t5_dense_act_fn %s -> %s: the language model given runs with that",
                    cfg.llm.t5_dense_act_fn,
                    act,
                )
            self.cfg = replace(self.cfg, llm=replace(self.cfg.llm, t5_dense_act_fn=act))
        if tokenizer is None:
            raise ValueError("pass the tokenizer of the language model you pass")
        self.llm = llm.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.is_encoder_decoder = bool(llm.config.is_encoder_decoder)
        llm_width = llm.get_input_embeddings().embedding_dim
        self.llm_proj = nn.Linear(qcfg.hidden_size, llm_width)
        nn.init.normal_(self.llm_proj.weight, std=qcfg.initializer_range)
        nn.init.zeros_(self.llm_proj.bias)
        if not self.is_encoder_decoder:
            end = tokenizer(cfg.llm.end_of_text, add_special_tokens=False).input_ids
            if len(end) != 1:
                raise ValueError(f"end_of_text {cfg.llm.end_of_text!r} must be one token, got ids {end}")
            self.end_token_id = end[0]
        else:
            self.end_token_id = tokenizer.eos_token_id

    def train(self, mode: bool = True) -> Blip2Stage2:
        super().train(mode)
        self.llm.eval()  # frozen: dropout stays off whatever the caller asks
        return self

    @property
    def llm_dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    # -- the soft prompt -----------------------------------------------------------------------------------------

    def soft_prompt(
        self,
        images: Tensor | None = None,
        image_tokens: Tensor | None = None,
        instruction_ids: Tensor | None = None,  # [B, T_i] Q-Former tokens (`instruction_inputs`)
        instruction_mask: Tensor | None = None,  # [B, T_i]
    ) -> Tensor:
        """`[B, Q, H]` in the LLM's dtype, from images or from precomputed frozen-encoder outputs; an
        instruction-aware model (`llm.qformer_instruction`) needs the instruction's Q-Former tokens too."""
        if (instruction_ids is not None) != self.instruct:
            raise ValueError(
                "this model reads an instruction: pass instruction_ids"
                if self.instruct
                else "instruction_ids given, but this model was built without llm.qformer_instruction"
            )
        if (images is None) == (image_tokens is None):
            raise ValueError("pass exactly one of images or image_tokens")
        if images is not None:
            if self.visual is None:
                raise ValueError("this model has no image encoder: pass image_tokens")
            image_tokens = self.visual(images)
        image_embeds = self.ln_vision(image_tokens.float())  # [B, N, E]
        if self.instruct:
            queries = instruction_queries(self.qformer, image_embeds, instruction_ids, instruction_mask)
        else:
            queries = self.qformer(image_embeds=image_embeds).hidden  # [B, Q, D]
        return self.llm_proj(queries).to(self.llm_dtype)

    def instruction_inputs(self, instructions: list[str]) -> tuple[Tensor, Tensor]:
        """(ids, mask) of instructions in the Q-Former's tokens, cut from the left (`qformer.instruct`)."""
        return tokenize_instructions(
            self.qformer_tokenizer, instructions, self.cfg.llm.max_instruction_length, self.llm_proj.weight.device
        )

    def _embed(self, ids: Tensor) -> Tensor:
        return self.llm.get_input_embeddings()(ids)

    # -- logits ------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor,  # [B, T] the text after the soft prompt (T5: the encoder's)
        attention_mask: Tensor,  # [B, T]
        *,
        images: Tensor | None = None,  # [B, 3, H, W]
        image_tokens: Tensor | None = None,  # [B, N, E] frozen-encoder outputs, instead of images
        decoder_input_ids: Tensor | None = None,  # [B, T_out] T5 only
        decoder_attention_mask: Tensor | None = None,  # [B, T_out] T5 only
        instruction_ids: Tensor | None = None,  # [B, T_i] Q-Former tokens, instruction-aware models only
        instruction_mask: Tensor | None = None,  # [B, T_i]
    ) -> Tensor:
        """The LLM's logits with the soft prompt before the text: decoder-only `[B, Q + T, V]` over
        `[soft prompt; text]`; encoder-decoder `[B, T_out, V]`, the decoder's."""
        prompt = self.soft_prompt(images, image_tokens, instruction_ids, instruction_mask)
        embeds = torch.cat([prompt, self._embed(input_ids)], dim=1)  # [B, Q + T, H]
        ones = torch.ones(prompt.shape[:2], dtype=attention_mask.dtype, device=prompt.device)
        mask = torch.cat([ones, attention_mask], dim=1)
        if not self.is_encoder_decoder:
            return self.llm(inputs_embeds=embeds, attention_mask=mask).logits
        if decoder_input_ids is None:
            raise ValueError("an encoder-decoder LLM needs decoder_input_ids")
        return self.llm(
            inputs_embeds=embeds,
            attention_mask=mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
        ).logits

    # -- generation ----------------------------------------------------------------------------------------------

    def generation_inputs(self, prompt: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(input embeddings, attention mask) with the soft prompt before each sample's own text prompt.

        Decoder-only: left padding, pads first: `[pads; soft prompt; prompt tokens]`. T5: right padding.
        """
        batch, queries = prompt.shape[:2]
        if len(prompts) != batch:
            raise ValueError(f"{len(prompts)} prompts for {batch} images")
        side = "right" if self.is_encoder_decoder else "left"
        enc = self.tokenizer(prompts, padding="longest", return_tensors="pt", padding_side=side).to(prompt.device)
        text = self._embed(enc.input_ids)  # [B, L, H]
        ones = torch.ones(batch, queries, dtype=enc.attention_mask.dtype, device=prompt.device)
        if self.is_encoder_decoder:
            return torch.cat([prompt, text], 1), torch.cat([ones, enc.attention_mask], 1)
        # Move each row's pads in front of its soft prompt: target t takes source t+Q (a pad) while t < pads,
        # then the queries (source t - pads), then the tokens (source t), in the order [soft prompt; text].
        joint = torch.cat([prompt, text], 1)  # [B, Q + L, H], text left-padded
        length = enc.input_ids.shape[1]
        pads = (length - enc.attention_mask.sum(1))[:, None]  # [B, 1]
        t = torch.arange(queries + length, device=prompt.device)[None]  # [1, Q + L]
        source = torch.where(t < pads, t + queries, torch.where(t < pads + queries, t - pads, t))
        embeds = joint.gather(1, source[..., None].expand(-1, -1, joint.shape[-1]))
        return embeds, (t >= pads).to(enc.attention_mask.dtype)

    @torch.no_grad()
    def generate(
        self,
        prompts: str | list[str] = "",
        *,
        images: Tensor | None = None,
        image_tokens: Tensor | None = None,
        cfg: GenerationConfig | None = None,
        return_ids: bool = False,
        instructions: str | list[str] | None = None,
    ) -> list[str] | Tensor:
        """Text for each image (one prompt for all, or one per image), decoded with transformers' `generate`.

        instructions: what an instruction-aware model's Q-Former reads (one for all, or one per image); by default
        the prompts, as InstructBLIP feeds the prompt to both. With `cfg.num_return_sequences` n: B*n texts, image
        b's at b*n ... b*n+n-1 (transformers' order).
        """
        cfg = cfg or CAPTION_GENERATION
        if (images is None) == (image_tokens is None):
            raise ValueError("pass exactly one of images or image_tokens")
        batch = (images if images is not None else image_tokens).shape[0]
        if isinstance(prompts, str):
            prompts = [prompts] * batch
        instruction = {}
        if self.instruct:
            instructions = prompts if instructions is None else instructions
            if isinstance(instructions, str):
                instructions = [instructions] * batch
            ids, mask = self.instruction_inputs(instructions)
            instruction = {"instruction_ids": ids, "instruction_mask": mask}
        elif instructions is not None:
            raise ValueError("instructions given, but this model was built without llm.qformer_instruction")
        prompt = self.soft_prompt(images, image_tokens, **instruction)
        embeds, mask = self.generation_inputs(prompt, prompts)
        ids = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            **cfg.generate_kwargs(eos_token_id=self.end_token_id, pad_token_id=self.tokenizer.pad_token_id),
        )
        if return_ids:
            return ids
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    @torch.no_grad()
    def predict_answers(
        self,
        questions: list[str],
        *,
        images: Tensor | None = None,
        image_tokens: Tensor | None = None,
        prompt: str = VQA_PROMPT,
        cfg: GenerationConfig | None = None,
    ) -> list[str]:
        """Zero-shot VQA: each question in `prompt` (exactly one `{}`: `check_vqa_prompt`), answered by beam search
        (paper settings by default). An instruction-aware model's Q-Former reads the same prompted question (LAVIS's
        InstructBLIP `predict_answers` passes the formatted prompt as its `text_input`)."""
        prompts = [check_vqa_prompt(prompt).format(q) for q in questions]
        return self.generate(prompts, images=images, image_tokens=image_tokens, cfg=cfg or VQA_GENERATION)


# -- checkpoints ---------------------------------------------------------------------------------------------------

LLM_PREFIX = {"ours": "llm.", "transformers": "language_model."}  # LAVIS files never carry the frozen LLM


def stage2_keys(model: Blip2Stage2) -> KeyMap:
    """Q-Former rows plus ln_vision and the LLM projection (LAVIS: `opt_proj`, `t5_proj`, or InstructBLIP-Vicuna's
    `llm_proj`). An instruction-aware model's "transformers" names are `InstructBlipForConditionalGeneration`'s."""
    if model.is_encoder_decoder:
        lavis_proj = "t5_proj"
    else:
        lavis_proj = "llm_proj" if model.instruct else "opt_proj"
    return (INSTRUCT_QFORMER_KEYS if model.instruct else QFORMER_KEYS) + KeyMap(
        (
            ("ln_vision", "ln_vision", "vision_model.post_layernorm"),
            ("llm_proj", lavis_proj, "language_projection"),
        )
    )


def stage2_state_dict(
    model: Blip2Stage2, fmt: str = "ours", *, include_visual: bool = True, include_llm: bool | None = None
) -> dict[str, Tensor]:
    """The stage-2 weights under `fmt` names. The frozen LLM is included for "ours"/"transformers" by default;
    LAVIS files never hold it (and pretrained ones not the ViT either: pass include_visual=False)."""
    include_llm = fmt != "lavis" if include_llm is None else include_llm
    if include_llm and fmt == "lavis":
        raise ValueError("LAVIS stage-2 files hold no LLM weights")
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(("visual.", "llm."))}
    out = convert_state_dict(own, "ours", fmt, stage2_keys(model)).state
    if include_visual and model.visual is not None:
        from qformer.vision import vision_state_dict

        out.update(vision_state_dict(model.visual, "timm" if fmt == "ours" else fmt, prefix=VISUAL_PREFIX[fmt]))
    if include_llm:
        out.update({LLM_PREFIX[fmt] + k: v for k, v in model.llm.state_dict().items()})
    return out


def load_stage2_state(
    model: Blip2Stage2, state: dict[str, Tensor], fmt: str, *, source: str = "checkpoint", require_visual: bool = False
) -> list[str]:
    """Load stage-2 weights strictly; returns the keys left out on purpose.

    The LLM is frozen and loaded from its own folder: LLM keys in `state` must equal the loaded LLM's names and
    shapes, and are loaded too (a transformers BLIP-2 folder carries them). A LAVIS file has no LLM keys; a
    pretrained one no `visual_encoder.*` either (then the image encoder keeps the weights it was built with).
    """
    visual, rest = split_visual_state(state, fmt)
    lprefix = LLM_PREFIX.get(fmt)
    llm = {k[len(lprefix) :]: v for k, v in rest.items() if lprefix and k.startswith(lprefix)}
    rest = {k: v for k, v in rest.items() if not (lprefix and k.startswith(lprefix))}
    dropped = load_converted(
        model, rest, fmt, key_map=stage2_keys(model), source=source, allowed_missing=["visual.", "llm."]
    )
    if llm:
        from qformer.convert import check_state_dict

        check_state_dict(model.llm, llm, source=f"{source} ({lprefix}*)")
        model.llm.load_state_dict(llm, strict=False)
    return dropped + load_visual_state(model, visual, fmt, source=source, require_visual=require_visual)


def init_from_stage1(model: Blip2Stage2, stage1_state: dict[str, Tensor], *, source: str = "stage-1") -> list[str]:
    """Start stage 2 from a stage-1 model's weights (our names): the query path and ln_vision load, the text
    parts are dropped by name (returned and logged), the LLM projection stays fresh. An instruction-aware model
    keeps the text embeddings and text FFN too; only the LM head and the stage-1 heads are dropped."""
    text_parts = ("qformer.lm_head.", "vision_proj.", "text_proj.", "itm_head.", "temp")
    if not model.instruct:  # an instruction-aware Q-Former keeps its text embeddings and text FFN (LAVIS does)
        text_parts += ("qformer.embeddings.word.", "qformer.embeddings.position.")
    keep, dropped = {}, []
    for key, value in stage1_state.items():
        if key.startswith("visual."):
            continue  # the frozen encoder comes from its own weights
        if key.startswith(text_parts) or (".ffn_text." in key and not model.instruct):
            dropped.append(key)
        else:
            keep[key] = value
    load_converted(
        model, keep, "ours", key_map=stage2_keys(model), source=source, allowed_missing=["visual.", "llm.", "llm_proj."]
    )
    logger.info("stage 2 from %s: dropped %d text-side keys: %s", source, len(dropped), ", ".join(sorted(dropped)))
    return sorted(dropped)
