"""One stage-2 training step: captions tokenised for the frozen LLM, the model's logits, and the LM loss.

OPT (decoder-only): `[soft prompt; prompt + caption + end_of_text]`, loss on the caption and end token only.
Flan-T5 (encoder-decoder): encoder text after the soft prompt, decoder target the rest. The split comes from given
outputs, from the config's prompt (captioning fine-tuning: the prompt is the prefix), or from the prefix-LM split of
each caption (pretraining). The split points are drawn from a `random.Random` the caller owns: the training loop
seeds it from the run's seed and keeps it in its checkpoints, so a resumed run draws the same split sequence.

Instruction data (InstructBLIP, BLIP-2 VQA fine-tuning; batches with "text_output", `tasks.data.instructions`):
the instruction is the LLM's input and, for an instruction-aware Q-Former, the Q-Former's too; the loss is on the
answer only. Decoder-only: `[soft prompt; instruction; answer + end]`, each part tokenised on its own and joined
without padding between (LAVIS `blip2_vicuna_instruct.concat_text_input_output`); T5: encoder instruction, decoder
answer (`blip2_t5_instruct`). The instruction is cut from the left (its end holds the question), as LAVIS does.

`Stage2Objective` has the interface of `tasks.stage1.Stage1Objective`, so the loop never asks which stage it runs.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from qformer.stage2 import Blip2Stage2

logger = logging.getLogger(__name__)

IGNORE = -100  # label of a position with no loss (transformers' convention)


def prefix_lm_split(text: str, rng: random.Random, full_caption: float = 0.0) -> tuple[str, str]:
    """Split a caption at a uniform word k in [1, n/2]: (first k words, the rest); with probability `full_caption`
    the prefix is empty and the whole caption is the target."""
    words = text.split()
    if len(words) < 2 or (full_caption and rng.random() < full_caption):
        return "", text
    k = rng.randint(1, max(1, len(words) // 2))
    return " ".join(words[:k]), " ".join(words[k:])


@dataclass
class Stage2Text:
    """A batch's text as `Blip2Stage2.forward` takes it, and the labels its logits are scored against."""

    input_ids: Tensor  # [B, T] after the soft prompt (T5: the encoder's text)
    attention_mask: Tensor  # [B, T]
    labels: Tensor  # decoder-only: [B, Q + T], aligned with the logits; T5: [B, T_out]; IGNORE where no loss
    decoder_input_ids: Tensor | None = None  # T5: the labels shifted right behind the decoder start token
    decoder_attention_mask: Tensor | None = None  # T5: [B, T_out]

    def to(self, device: torch.device | str) -> Stage2Text:
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Stage2Text(**{k: None if v is None else v.to(device) for k, v in moved.items()})


def tokenize_stage2(
    model: Blip2Stage2,
    text: list[str],
    *,
    text_output: list[str] | None = None,
    rng: random.Random | None = None,
    input_truncation: str | None = None,
) -> Stage2Text:
    """Tokenise captions (and T5 targets) with the model's tokenizer and its `cfg.llm` settings.

    text_output: the targets (T5: the decoder's; decoder-only: the answers after the instructions in `text`);
    without them T5 takes the config's prompt as prefix or, with `prefix_lm`, splits each caption with `rng`
    (required then). input_truncation: the side `text` is cut from ("left" for instructions, as LAVIS; None:
    the tokenizer's own).
    """
    if model.is_encoder_decoder:
        return _t5_text(model, text, text_output, rng, input_truncation)
    if text_output is not None:
        return _decoder_only_pairs(model, text, text_output, input_truncation)
    return _decoder_only_text(model, text)


@contextmanager
def _truncation_side(tokenizer, side: str | None) -> Iterator[None]:
    """The tokenizer's call takes no truncation side: set it for this call only (the tokenizer is shared)."""
    before = tokenizer.truncation_side
    tokenizer.truncation_side = side or before
    try:
        yield
    finally:
        tokenizer.truncation_side = before


def _decoder_only_text(model: Blip2Stage2, text: list[str]) -> Stage2Text:
    llm_cfg = model.cfg.llm
    captions = [llm_cfg.prompt + t + llm_cfg.end_of_text for t in text]
    enc = model.tokenizer(
        captions,
        padding="longest",
        truncation=True,
        max_length=llm_cfg.max_text_length,
        return_tensors="pt",
        padding_side="right",
    )
    targets = enc.input_ids.masked_fill(enc.attention_mask == 0, IGNORE)  # [B, T]
    if llm_cfg.prompt:
        # The prompt's tokens (the tokenizer's BOS included) are given, not predicted.
        n_prompt = len(model.tokenizer(llm_cfg.prompt).input_ids)
        targets[:, :n_prompt] = IGNORE
    no_loss = torch.full((len(text), model.cfg.qformer.num_query_tokens), IGNORE, dtype=torch.long)  # the queries
    return Stage2Text(enc.input_ids, enc.attention_mask, torch.cat([no_loss, targets], 1))


def _decoder_only_pairs(
    model: Blip2Stage2, text: list[str], answers: list[str], input_truncation: str | None
) -> Stage2Text:
    """`[instruction; answer + end]` per sample, right-padded, labels on the answer and end token only."""
    llm_cfg, tok = model.cfg.llm, model.tokenizer
    if len(answers) != len(text):
        raise ValueError(f"{len(answers)} answers for {len(text)} instructions")
    with _truncation_side(tok, input_truncation):
        inputs = tok(list(text), truncation=True, max_length=llm_cfg.max_text_length).input_ids
    with _truncation_side(tok, "right"):
        ends = [a + llm_cfg.end_of_text for a in answers]
        outputs = tok(ends, truncation=True, max_length=llm_cfg.output_length).input_ids
    n_special = len(tok("").input_ids)  # the BOS the tokenizer puts before every text: the answer's is dropped
    rows = [(i, o[n_special:]) for i, o in zip(inputs, outputs, strict=True)]
    width = max(len(i) + len(o) for i, o in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    targets = torch.full_like(ids, IGNORE)
    for b, (inp, out) in enumerate(rows):
        n, m = len(inp), len(out)
        ids[b, : n + m] = torch.tensor(inp + out, dtype=torch.long)
        mask[b, : n + m] = 1
        targets[b, n : n + m] = ids[b, n : n + m]
    no_loss = torch.full((len(text), model.cfg.qformer.num_query_tokens), IGNORE, dtype=torch.long)  # the queries
    return Stage2Text(ids, mask, torch.cat([no_loss, targets], 1))


def _t5_text(
    model: Blip2Stage2,
    text: list[str],
    text_output: list[str] | None,
    rng: random.Random | None,
    input_truncation: str | None = None,
) -> Stage2Text:
    llm_cfg = model.cfg.llm
    explicit = text_output is not None  # instruction data: its own output length; captions: max_text_length
    if text_output is None:
        if llm_cfg.prompt:
            text, text_output = [llm_cfg.prompt] * len(text), text
        elif llm_cfg.prefix_lm:
            if rng is None:
                raise ValueError("the prefix-LM split needs rng (a random.Random the caller seeds and keeps)")
            full = llm_cfg.prefix_lm_full_caption
            text, text_output = map(list, zip(*(prefix_lm_split(t, rng, full) for t in text), strict=True))
        else:
            raise ValueError("T5 training needs text_output, a prompt, or prefix_lm=True")
    tok = dict(padding="longest", truncation=True, return_tensors="pt")
    with _truncation_side(model.tokenizer, input_truncation):
        enc = model.tokenizer(text, max_length=llm_cfg.max_text_length, **tok)
    out_length = llm_cfg.output_length if explicit else llm_cfg.max_text_length
    out = model.tokenizer(text_output, max_length=out_length, **tok)
    labels = out.input_ids.masked_fill(out.attention_mask == 0, IGNORE)
    return Stage2Text(
        enc.input_ids,
        enc.attention_mask,
        labels,
        decoder_input_ids=model.llm.prepare_decoder_input_ids_from_labels(labels),
        decoder_attention_mask=out.attention_mask,
    )


def lm_loss(logits: Tensor, labels: Tensor, *, shift: bool) -> Tensor:
    """Mean cross-entropy over the labelled positions, computed as transformers computes OPT's and T5's (so the
    numbers are theirs to the bit): decoder-only logits in fp32 against the labels shifted left by one; T5's
    decoder logits as they come."""
    if shift:
        logits = logits.float()
        labels = F.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    labels = labels.to(logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


def stage2_outputs(
    model: Blip2Stage2,
    text: list[str],
    *,
    images: Tensor | None = None,
    image_tokens: Tensor | None = None,
    text_output: list[str] | None = None,
    rng: random.Random | None = None,
    instructions: list[str] | None = None,
    input_truncation: str | None = None,
) -> dict[str, Tensor]:
    """{"loss", "logits"}: OPT's LM loss on the caption only (logits over `[soft prompt; text]`); T5's loss on the
    target part, given outputs, prompt or prefix-LM split (decoder logits). instructions: what an instruction-aware
    Q-Former reads (one per sample)."""
    batch = tokenize_stage2(model, text, text_output=text_output, rng=rng, input_truncation=input_truncation)
    batch = batch.to(model.llm_proj.weight.device)
    instruction = {}
    if instructions is not None:
        ids, mask = model.instruction_inputs(list(instructions))
        instruction = {"instruction_ids": ids, "instruction_mask": mask}
    logits = model(
        batch.input_ids,
        batch.attention_mask,
        images=images,
        image_tokens=image_tokens,
        decoder_input_ids=batch.decoder_input_ids,
        decoder_attention_mask=batch.decoder_attention_mask,
        **instruction,
    )
    return {"loss": lm_loss(logits, batch.labels, shift=not model.is_encoder_decoder), "logits": logits}


class Stage2Objective:
    """The training loop's stage-2 step: a batch of images and captions to {"loss"}. Owns the prefix-LM generator,
    seeded from the run (`seed`), whose state goes into every training checkpoint."""

    def __init__(self, model: Blip2Stage2, *, seed: int):
        self.model = model
        self.rng = random.Random(seed)

    def __call__(self, batch: dict) -> dict[str, Tensor]:
        text, answers = batch["text_input"], batch.get("text_output")
        instructions = None
        if self.model.instruct:
            # Instruction data: the Q-Former reads the LLM's instruction; plain captions: the config's prompt (as
            # `Blip2Stage2.generate` does when no instruction is given).
            instructions = text if answers is not None else [self.model.cfg.llm.prompt] * len(text)
        out = stage2_outputs(
            self.model,
            text,
            images=batch["image"],
            text_output=answers,
            rng=self.rng,
            instructions=instructions,
            input_truncation=None if answers is None else "left",
        )
        return {"loss": out["loss"]}

    def state_dict(self) -> dict:
        return {"prefix_lm_rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        if "prefix_lm_rng" in state:
            self.rng.setstate(state["prefix_lm_rng"])
        elif self.model.is_encoder_decoder:  # written before the generator was saved
            logger.warning("the checkpoint holds no prefix-LM generator state: its split sequence starts afresh")
