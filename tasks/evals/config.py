"""Evaluation run configs (`qformer eval CONFIG [key=value ...]`), validated like the training configs."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from qformer.dtypes import DTYPES
from tasks.config import load_structured
from tasks.data.captions import DEFAULT_MAX_IMAGE_PIXELS

TASKS = ("retrieval", "vqa", "gqa", "caption")
SCORES = ("itm+itc", "itm+itc_logit", "itm", "itc")


@dataclass
class EvalConfig:
    task: str = MISSING  # retrieval | vqa | gqa | caption
    checkpoint: str = MISSING  # one of our checkpoint folders (`qformer convert` makes one from LAVIS/transformers)
    output_dir: str = MISSING
    # Data. Retrieval / caption: a LAVIS-style JSON list ({"image", "caption": [...], "image_id"?}: COCO Karpathy
    # test, Flickr30k test, NoCaps val) under image_root. VQA: the official questions + annotations JSON files with
    # images named by image_pattern under image_root. GQA: the balanced test-dev questions JSON.
    ann_path: str = ""
    image_root: str = ""
    questions: str = ""
    annotations: str = ""  # VQA annotations; for captioning, COCO-format ground truth (made from ann_path if empty)
    image_pattern: str = "COCO_val2014_{image_id:012d}.jpg"
    image_size: int = 0  # 0: the checkpoint's
    batch_size: int = 32
    num_workers: int = 4
    precision: str = "bf16"  # autocast dtype on a GPU; CPUs run fp32
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # larger images stop the run (decompression bombs); 0 = no limit
    limit: int = 0  # evaluate the first N images/questions only (0 = all)
    # Retrieval: ITC for every pair, then ITM re-ranks the top k_test candidates of every image and every text.
    k_test: int = 128
    # itm+itc: ITM positive logit + ITC cosine similarity (the reference); itm+itc_logit: ITM positive logit + ITC logit
    # (the cosine divided by the learned temperature, both terms on the logit scale); itm; itc.
    score: str = "itm+itc"
    max_text_length: int = 35
    # Generation (VQA / captioning).
    prompt: str = "Question: {} Short answer:"
    num_beams: int = 5
    max_new_tokens: int = 10
    min_new_tokens: int = 1
    length_penalty: float = -1.0
    repetition_penalty: float = 1.0
    # Sampling instead of search (qformer.caption.GenerationConfig, transformers' meaning); `qformer eval` seeds
    # torch with 0 first, so sampled numbers repeat.
    do_sample: bool = False
    top_p: float = 1.0
    top_k: int = 50
    temperature: float = 1.0
    vqa_eval_version: str = "lavis"  # lavis (pre-2021 fix, BLIP-2's published val numbers) | official
    # VQA / GQA: lemmatise each predicted answer (not the ground truth) before it is saved and scored, as LAVIS does
    # for OK-VQA (tasks/evals/lemmatize.py): nouns and verbs to their lemmas. Needs spaCy (pip install -e ".[okvqa]").
    lemmatize: bool = False
    lemmatizer_model: str = "en_core_web_sm"  # a spaCy pipeline: an installed package name or a pipeline folder
    # VQA annotations with other than 10 answers are scored over the answers they have, with a warning and their count
    # in metrics.json; true: refuse them.
    strict_annotations: bool = False
    report_samples: int = 24  # examples shown in the HTML report

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.precision not in DTYPES:
            raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {self.precision!r}")
        if self.vqa_eval_version not in ("lavis", "official"):
            raise ValueError(f"vqa_eval_version must be lavis or official, got {self.vqa_eval_version!r}")
        if self.lemmatize and self.task not in ("vqa", "gqa"):
            raise ValueError(f"lemmatize applies to predicted answers (task vqa or gqa), not to task {self.task!r}")
        if self.lemmatize and not self.lemmatizer_model:
            raise ValueError("lemmatize: true needs lemmatizer_model (e.g. en_core_web_sm)")
        if self.max_image_pixels < 0:
            raise ValueError(f"max_image_pixels must be >= 0 (0 = no limit), got {self.max_image_pixels}")


def load_eval_config(path: str | None, overrides: list[str] = ()) -> EvalConfig:
    """A validated EvalConfig from a YAML file plus `key=value` overrides (the YAML may be None)."""
    return load_structured(lambda raw, cli: EvalConfig, path, overrides)
