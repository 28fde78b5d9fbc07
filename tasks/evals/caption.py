"""Captioning evaluation: COCO Karpathy test and NoCaps val, scored with pycocoevalcap (DESIGN.md section 9).

    1. Every rank reads the LAVIS-style annotation list (`[{"image", "caption": [...], "image_id"?}]`); rank 0 also
       reads the COCO-format ground truth (`annotations`, or one made from the list's captions) and checks that
       every image has references, before any generation.
    2. Rank r captions images r, r + W, ... in batches (`Blip2Stage2.generate` with the config's prompt and
       decoding; a stage-1 model captions with its own LM head and the tokenizer saved in its checkpoint folder).
    3. Captions are gathered into one dict keyed by image id (an id captioned twice is an error).
    4. Rank 0 writes `results.json` (`[{"image_id", "caption"}]` sorted by image id: the COCO results format),
       scores it, and writes `metrics.json` and `report.html`; every rank returns the same metrics.

Scoring is what `pycocoevalcap.eval.COCOEvalCap.evaluate` does, one scorer at a time: pycocotools' `COCO` holds
the ground truth and `loadRes` the results, the Stanford PTB tokenizer (Java) tokenizes both, then BLEU-1..4,
METEOR (Java), ROUGE-L, CIDEr and SPICE each score the tokenized text. The stock `evaluate()` is not used because
SPICE downloads Stanford CoreNLP on first use and, when it cannot, takes every other metric down with it. Here
SPICE runs only when its jars are already installed (else `"SPICE": "unavailable: <reason>"`), and a scorer that
fails is reported the same way while the others still count. Without Java nothing can be tokenized: every metric
is then reported unavailable, with the reason, and an error is logged. Scores are on pycocoevalcap's scale
(CIDEr 1.216 is the paper's 121.6). When the ground-truth images carry a "domain" (NoCaps: in-domain,
near-domain, out-domain), every metric is also computed per domain.

An image id missing from the annotation list is taken from the file name's trailing digits, as LAVIS does for
COCO (`COCO_val2014_000000391895.jpg` -> 391895); NoCaps' `img_id` is used when present.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from qformer.blip2 import Blip2Stage1
from qformer.stage2 import Blip2Stage2
from tasks.data.captions import set_max_image_pixels
from tasks.dist import on_rank0
from tasks.evals import common
from tasks.evals.config import EvalConfig
from tasks.evals.report import CaptionSample, caption_report, sample_indices

logger = logging.getLogger(__name__)

__all__ = [
    "SCORERS",
    "CaptionImage",
    "CaptionScorer",
    "CaptionScores",
    "caption_scores",
    "evaluate_caption",
    "image_id_from_name",
    "load_caption_images",
    "load_ground_truth",
    "spice_unavailable_reason",
]

# Scorer names (what `scorers=` selects) and the metric keys each one reports (pycocoevalcap's names).
SCORERS: tuple[str, ...] = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "BLEU": ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"),
    "METEOR": ("METEOR",),
    "ROUGE_L": ("ROUGE_L",),
    "CIDEr": ("CIDEr",),
    "SPICE": ("SPICE",),
}
NO_JAVA = "Java not found on PATH (the PTB tokenizer, METEOR and SPICE of pycocoevalcap run on the JVM)"
SPICE_CORENLP = "stanford-corenlp-3.6.0"  # the jars SPICE's get_stanford_models() would download


# ----------------------------------------------------------------------------------------------------------
# Images and ground truth
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionImage:
    image_id: Hashable
    image_path: str
    references: tuple[str, ...]  # the captions of the annotation list (the ground truth may come from elsewhere)


_TRAILING_DIGITS = re.compile(r"(\d+)$")


def image_id_from_name(name: str) -> int:
    """The trailing digits of a file name's stem as an int, as LAVIS derives COCO image ids."""
    match = _TRAILING_DIGITS.search(Path(name).stem)
    if match is None:
        raise ValueError(f"cannot derive an image id from {name!r} (no trailing digits): give 'image_id'")
    return int(match.group(1))


def load_caption_images(ann_path: str, image_root: str) -> list[CaptionImage]:
    """One entry per image, in first-appearance order, with the captions of every entry of that image."""
    data = common.read_json(ann_path, "caption annotation file")
    if not isinstance(data, list):
        raise ValueError(f"{ann_path}: expected a JSON list of {{'image', 'caption', 'image_id'?}} entries")
    paths: dict[Hashable, str] = {}
    references: dict[Hashable, list[str]] = {}
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or "image" not in entry:
            raise ValueError(f"{ann_path}[{i}]: an entry needs an 'image' key")
        if not isinstance(entry["image"], str) or not entry["image"]:
            raise ValueError(f"{ann_path}[{i}]: 'image' must be a path (a non-empty string), got {entry['image']!r}")
        image_id = entry.get("image_id", entry.get("img_id"))
        if image_id is None:
            try:
                image_id = image_id_from_name(entry["image"])
            except ValueError as e:
                raise ValueError(f"{ann_path}[{i}]: {e}") from e
        path = str(Path(image_root) / entry["image"])
        if paths.setdefault(image_id, path) != path:
            raise ValueError(f"{ann_path}[{i}]: image id {image_id!r} names two images: {paths[image_id]} and {path}")
        captions = entry.get("caption", [])
        captions = [captions] if isinstance(captions, str) else captions
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"{ann_path}[{i}]: 'caption' must be a string or a list of strings")
        references.setdefault(image_id, []).extend(captions)
    return [CaptionImage(image_id, paths[image_id], tuple(references[image_id])) for image_id in paths]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep pycocotools' and pycocoevalcap's prints off stdout (logged at DEBUG instead)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    if buffer.getvalue().strip():
        logger.debug("%s", buffer.getvalue().strip())


def load_ground_truth(cfg: EvalConfig, images: Sequence[CaptionImage]):
    """A pycocotools `COCO` with the references of every image: `cfg.annotations` (COCO format) when given, else
    made from the annotation list's captions. An image without references is an error."""
    from pycocotools.coco import COCO

    coco = COCO()
    if cfg.annotations:
        source = cfg.annotations
        coco.dataset = common.read_json(source, "caption ground-truth file")
        if not isinstance(coco.dataset, dict) or not {"images", "annotations"} <= set(coco.dataset):
            raise ValueError(f"{source}: expected COCO caption format {{'images': [...], 'annotations': [...]}}")
    else:
        source = f"the captions of {cfg.ann_path}"
        anns = [{"image_id": im.image_id, "caption": c} for im in images for c in im.references]
        coco.dataset = {
            "type": "captions",
            "images": [{"id": im.image_id, "file_name": Path(im.image_path).name} for im in images],
            "annotations": [dict(ann, id=n) for n, ann in enumerate(anns, start=1)],
        }
    with _quiet():
        coco.createIndex()
    missing = [im.image_id for im in images if im.image_id not in coco.imgs or not coco.imgToAnns.get(im.image_id)]
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} image(s) of {cfg.ann_path} have no image entry or no reference caption "
            f"(e.g. ids {missing[:3]}; are the id types the same?)"
        )
    return coco


# ----------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------


def spice_unavailable_reason(spice_dir: str | Path | None = None) -> str | None:
    """Why SPICE cannot run here (None when it can): Java, pycocoevalcap and the CoreNLP jars must be present.

    spice_dir: pycocoevalcap's `spice` folder (default: the installed one).
    """
    if shutil.which("java") is None:
        return NO_JAVA
    if spice_dir is None:
        try:
            import pycocoevalcap.spice.spice as spice_module
        except ImportError as e:
            return f"pycocoevalcap is not installed ({e})"
        spice_dir = Path(spice_module.__file__).parent
    spice_dir = Path(spice_dir)
    needed = [spice_dir / "spice-1.0.jar"] + [spice_dir / "lib" / f"{SPICE_CORENLP}{s}.jar" for s in ("", "-models")]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        return (
            f"missing {', '.join(missing)} (SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads from "
            "nlp.stanford.edu on first use; we never download: put the jars there to enable SPICE)"
        )
    return None


class CaptionScores(NamedTuple):
    metrics: dict[str, float | str]  # metric -> score, or "unavailable: <reason>"
    per_image: dict[Hashable, dict[str, float]]  # image id -> the per-image scores the scorers give


class CaptionScorer:
    """PTB tokenization, then each requested scorer on its own (see the module docstring).

    METEOR's JVM starts when the scorer is made (it takes a while to load its paraphrase table), so make the
    scorer before generating and `close()` it (or use `with`) when done.
    """

    def __init__(self, scorers: Sequence[str] = SCORERS) -> None:
        unknown = sorted(set(scorers) - set(SCORERS))
        if unknown:
            raise ValueError(f"unknown caption scorer(s) {unknown}; known: {', '.join(SCORERS)}")
        self.scorers = [s for s in SCORERS if s in scorers]
        self.unavailable: dict[str, str] = {}
        self._meteor = None
        if shutil.which("java") is None:
            self.unavailable = dict.fromkeys(self.scorers, NO_JAVA)
            logger.error("caption metrics unavailable: %s", NO_JAVA)
            return
        if "SPICE" in self.scorers:
            reason = spice_unavailable_reason()
            if reason is not None:
                self.unavailable["SPICE"] = reason
                logger.warning("SPICE unavailable: %s", reason)
        if "METEOR" in self.scorers:
            from pycocoevalcap.meteor.meteor import Meteor

            try:
                self._meteor = Meteor()
            except Exception as e:  # e.g. the JVM cannot start
                self.unavailable["METEOR"] = f"cannot start METEOR: {type(e).__name__}: {e}"
                logger.error("METEOR unavailable: %s", self.unavailable["METEOR"])

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop METEOR's Java process."""
        if self._meteor is not None:
            process = self._meteor.meteor_p
            if process.stdin:
                process.stdin.close()
            process.kill()
            process.wait()
            self._meteor = None

    def _make(self, name: str):
        if name == "BLEU":
            from pycocoevalcap.bleu.bleu import Bleu

            return Bleu(4)
        if name == "METEOR":
            if self._meteor is None:
                raise RuntimeError("the METEOR process was closed")
            return self._meteor
        if name == "ROUGE_L":
            from pycocoevalcap.rouge.rouge import Rouge

            return Rouge()
        if name == "CIDEr":
            from pycocoevalcap.cider.cider import Cider

            return Cider()
        from pycocoevalcap.spice.spice import Spice  # only reached when the jars are present

        return Spice()

    def score(self, gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, str]) -> CaptionScores:
        """Score one caption per image (`res`) against its references (`gts`), over the images of `res`."""
        ids = list(res)
        if not ids:
            raise ValueError("no captions to score")
        missing = [i for i in ids if not gts.get(i)]
        if missing:
            raise ValueError(f"{len(missing)} captioned image(s) have no references (e.g. ids {missing[:3]})")
        metrics: dict[str, float | str] = {}
        per_image: dict[Hashable, dict[str, float]] = {i: {} for i in ids}
        if len(self.unavailable) == len(self.scorers):  # no Java: nothing can even be tokenized
            for name in self.scorers:
                metrics.update(dict.fromkeys(METRIC_KEYS[name], f"unavailable: {self.unavailable[name]}"))
            return CaptionScores(metrics, per_image)

        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        with _quiet():
            gts_tok = tokenizer.tokenize({i: [{"caption": c} for c in gts[i]] for i in ids})
            res_tok = tokenizer.tokenize({i: [{"caption": res[i]}] for i in ids})
        if set(gts_tok) != set(ids) or set(res_tok) != set(ids):
            raise RuntimeError("the PTB tokenizer lost captions (did its Java process fail? see the log above)")

        for name in self.scorers:
            keys = METRIC_KEYS[name]
            if name in self.unavailable:
                metrics.update(dict.fromkeys(keys, f"unavailable: {self.unavailable[name]}"))
                continue
            try:
                with _quiet():
                    score, scores = self._make(name).compute_score(gts_tok, res_tok)
            except Exception as e:  # one scorer's failure must not take the others down
                reason = f"{name} failed: {type(e).__name__}: {e}"
                logger.error("caption metric unavailable: %s", reason)
                metrics.update(dict.fromkeys(keys, f"unavailable: {reason}"))
                continue
            if name == "BLEU":
                metrics.update({k: float(s) for k, s in zip(keys, score, strict=True)})
                order, values = list(gts_tok), scores[3]  # per-image BLEU-4
            elif name == "SPICE":
                metrics["SPICE"] = float(score)
                order, values = sorted(gts_tok), [s["All"]["f"] for s in scores]  # Spice sorts the ids
            else:
                metrics[keys[0]] = float(score)
                order, values = list(gts_tok), scores  # the scorers follow the order of gts' keys
            for image_id, value in zip(order, values, strict=True):
                per_image[image_id][keys[-1]] = float(value)
        return CaptionScores(metrics, per_image)


def caption_scores(
    gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, str], scorers: Sequence[str] = SCORERS
) -> CaptionScores:
    """One-shot `CaptionScorer(scorers).score(gts, res)`."""
    with CaptionScorer(scorers) as scorer:
        return scorer.score(gts, res)


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------


def _captioner(model: nn.Module, cfg: EvalConfig) -> Callable[[Tensor], list[str]]:
    """images [B, 3, S, S] -> B captions, with the config's prompt and decoding."""
    gen = common.generation_config(cfg)
    if isinstance(model, Blip2Stage2):
        return lambda images: model.generate(cfg.prompt, images=images, cfg=gen)
    if isinstance(model, Blip2Stage1):
        from qformer.checkpoint import load_tokenizer_from

        tokenizer = load_tokenizer_from(cfg.checkpoint)
        if tokenizer is None:
            raise ValueError(f"{cfg.checkpoint} has no tokenizer/ folder: stage-1 captioning needs the BERT tokenizer")
        if cfg.prompt:
            logger.warning("a stage-1 model captions from [DEC] alone: prompt %r is not used", cfg.prompt)

        def caption(images: Tensor) -> list[str]:
            return model.caption(images, tokenizer, gen)

        return caption
    raise TypeError(f"captioning needs a Blip2Stage2 or Blip2Stage1 model, got {type(model).__name__}")


def _caption_images(
    caption: Callable[[Tensor], list[str]],
    images: Sequence[CaptionImage],
    size: int,
    cfg: EvalConfig,
    device: torch.device,
) -> dict[Hashable, str]:
    """image id -> generated caption for this rank's images."""
    captions: dict[Hashable, str] = {}
    paths = [im.image_path for im in images]
    for indices, batch in common.image_batches(paths, size, cfg.batch_size, cfg.num_workers, device, desc="caption"):
        with common.autocast(device, cfg.precision):
            texts = caption(batch)
        captions.update((images[i].image_id, text) for i, text in zip(indices, texts, strict=True))
    return captions


def _score_and_write(
    cfg: EvalConfig, images: Sequence[CaptionImage], captions: dict[Hashable, str], coco, scorer: CaptionScorer
) -> dict[str, Any]:
    """Rank 0: results.json, metrics.json and report.html; returns the metrics."""
    out = Path(cfg.output_dir)
    results = common.results_by_id(captions, "image_id", "caption")
    common.write_json(out / common.RESULTS_NAME, results)

    with _quiet():
        coco_res = coco.loadRes([dict(r) for r in results])  # loadRes adds ids to the dicts it gets
    ids = [r["image_id"] for r in results]
    gts = {i: [ann["caption"] for ann in coco.imgToAnns[i]] for i in ids}
    res = {i: coco_res.imgToAnns[i][0]["caption"] for i in ids}
    scored = scorer.score(gts, res)
    metrics: dict[str, Any] = {"task": "caption", "num_images": len(ids), **scored.metrics}
    domains = sorted({coco.imgs[i]["domain"] for i in ids if "domain" in coco.imgs[i]})
    if domains:
        metrics["per_domain"] = {}
        for domain in domains:
            subset = [i for i in ids if coco.imgs[i].get("domain") == domain]
            part = scorer.score({i: gts[i] for i in subset}, {i: res[i] for i in subset})
            metrics["per_domain"][domain] = {"num_images": len(subset), **part.metrics}
    common.write_json(out / common.METRICS_NAME, metrics)

    samples = []
    for n in sample_indices(len(images), cfg.report_samples):
        image = images[n]
        samples.append(
            CaptionSample(
                image.image_path,
                captions[image.image_id],
                gts[image.image_id],
                scored.per_image[image.image_id],
                image.image_id,
            )
        )
    title = f"Captioning: {Path(cfg.ann_path).name} ({cfg.checkpoint})"
    caption_report(out / common.REPORT_NAME, samples, title=title, metrics=metrics)
    logger.info("caption: %s", {k: v for k, v in metrics.items() if not isinstance(v, dict)})
    return metrics


def evaluate_caption(
    model: Blip2Stage2 | Blip2Stage1, cfg: EvalConfig, device: torch.device | str, *, scorers: Sequence[str] = SCORERS
) -> dict[str, Any]:
    """Caption the images of `cfg.ann_path` and score them (see the module docstring); call it on every rank.

    The model should already be on `device`. `scorers` selects the metrics (default all of `SCORERS`). Returns the
    metrics written to `output_dir/metrics.json`: `{"task", "num_images", "Bleu_1".."Bleu_4", "METEOR",
    "ROUGE_L", "CIDEr", "SPICE"}` (floats, or "unavailable: <reason>"), plus "per_domain" when the ground truth
    has domains.
    """
    if cfg.task != "caption":
        raise ValueError(f"evaluate_caption handles task caption, got {cfg.task!r}")
    if "{}" in cfg.prompt:
        raise ValueError(
            f"prompt {cfg.prompt!r} has a '{{}}' placeholder, as the VQA prompt (EvalConfig's default) has: "
            "set prompt for captioning (the paper's: 'a photo of')"
        )
    set_max_image_pixels(cfg.max_image_pixels)
    device = torch.device(device)
    common.warn_if_autocast_recasts_llm(model, cfg.precision, device)
    images = load_caption_images(cfg.ann_path, cfg.image_root)
    if cfg.limit:
        images = images[: cfg.limit]
    if not images:
        raise ValueError(f"no images in {cfg.ann_path}")
    caption = _captioner(model, cfg)
    coco = on_rank0(lambda: load_ground_truth(cfg, images), "reading the caption ground truth")

    # Rank 0 makes the scorer now, so METEOR's JVM loads while the images are captioned.
    scorer = on_rank0(lambda: CaptionScorer(scorers), "starting the caption scorers")
    try:
        model.eval()
        size = cfg.image_size or model.cfg.vision.image_size
        captions = common.generate_sharded(
            images, lambda mine: _caption_images(caption, mine, size, cfg, device), "captioning"
        )
        return on_rank0(lambda: _score_and_write(cfg, images, captions, coco, scorer), "scoring", share=True)
    finally:
        if scorer is not None:
            scorer.close()
