"""Instruction templates (InstructBLIP) and caption data turned into (instruction, target) samples.

An instruction sample is ``{"image", "text_input": instruction, "text_output": target, ...}`` (LAVIS's
`CaptionInstructDataset` / `VQAInstructDataset` keys): `tasks.stage2.Stage2Objective` gives the instruction to the
LLM (and to an instruction-aware Q-Former) and puts the loss on the target only.

Templates are the InstructBLIP paper's (appendix, "Instruction templates"), written with an `<Image>` placeholder.
Our soft prompt always comes first (`[soft prompt; instruction; answer]`, as LAVIS's `blip2_*_instruct` models
build it), so a leading `<Image>` is where the soft prompt already is: it is dropped (`strip_image_placeholder`);
one elsewhere in a template is refused. A template is drawn per sample with Python's `random`, which
`tasks.train_data.SeededSamples` seeds from (seed, epoch, index): the draws do not depend on the worker that loads
the sample and a resumed run draws the same ones (LAVIS draws with `random.choice` in the dataset too,
`lavis/processors/instruction_text_processors.py` `BlipInstructionProcessor.__call__`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

IMAGE_PLACEHOLDER = "<Image>"

# InstructBLIP paper, appendix table of instruction templates: image captioning.
CAPTION_TEMPLATES = [
    "<Image>A short image caption:",
    "<Image>A short image description:",
    "<Image>A photo of",
    "<Image>An image that shows",
    "<Image>Write a short description for the image.",
    "<Image>Write a description for the photo.",
    "<Image>Provide a description of what is presented in the photo.",
    "<Image>Briefly describe the content of the image.",
    "<Image>Can you briefly explain what you see in the image?",
    "<Image>Could you use a few words to describe what you perceive in the photo?",
    "<Image>Please provide a short depiction of the picture.",
    "<Image>Using language, provide a short account of the image.",
    "<Image>Use a few words to illustrate what is happening in the picture.",
]
# The same table: VQA (short answers); `{}` is the question.
VQA_TEMPLATES = [
    "<Image>{}",
    "<Image>Question: {}",
    "<Image>{} A short answer to the question is",
    "<Image>Q: {} A:",
    "<Image>Question: {} Short answer:",
    "<Image>Given the image, answer the following question with no more than three words. {}",
    "<Image>Based on the image, respond to this question with a short answer: {}. Answer:",
    "<Image>Use the provided image to answer the question: {} Provide your answer as short as possible:",
    '<Image>What is the answer to the following question? "{}"',
    '<Image>The question "{}" can be answered using the image. A short answer is',
]
BLIP2_VQA_PROMPT = "Question: {} Answer:"  # BLIP-2 paper, VQA fine-tuning and zero-shot


def strip_image_placeholder(template: str) -> str:
    """The template without its leading `<Image>` (where the soft prompt already is); one elsewhere is an error."""
    text = template[len(IMAGE_PLACEHOLDER) :].lstrip() if template.startswith(IMAGE_PLACEHOLDER) else template
    if IMAGE_PLACEHOLDER in text:
        raise ValueError(f"instruction template {template!r}: {IMAGE_PLACEHOLDER} may only open the template")
    return text


def check_templates(templates: Sequence[str], slots: int, what: str) -> list[str]:
    """The templates with placeholders stripped; each must hold `slots` `{}` (1: the question; 0: captions)."""
    out = []
    for t in templates:
        text = strip_image_placeholder(t)
        if text.count("{}") != slots or text.count("{") != slots:
            raise ValueError(f"{what}: template {t!r} must hold {'exactly one {}' if slots else 'no {}'}")
        out.append(text)
    return out


class InstructedCaptions(Dataset):
    """A caption dataset's samples as instruction samples: a template drawn per sample is the instruction and the
    caption the target (LAVIS `CaptionInstructDataset`). Bad samples pass through untouched."""

    def __init__(self, dataset: Dataset, templates: Sequence[str]):
        if not templates:
            raise ValueError("InstructedCaptions needs at least one instruction template")
        self.dataset, self.templates = dataset, check_templates(templates, 0, "caption instructions")

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def num_images(self) -> int:
        return getattr(self.dataset, "num_images", len(self.dataset))

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if not isinstance(item, dict):
            return item
        return {**item, "text_input": random.choice(self.templates), "text_output": item["text_input"]}
