"""Self-contained HTML reports of evaluation runs: a sample of images with what the model said and the truth.

Each report is one file: the images are embedded as base64 JPEG thumbnails, the style sheet is inline, and every
piece of text (questions, answers, captions, file names) goes through `html.escape`. An image that cannot be read
is shown as a box naming the file and the error, so a report never fails because of one bad file.

    vqa_report(path, samples, title=..., metrics=...)         question, generated answer, annotators' answers
    caption_report(path, samples, title=..., metrics=...)     generated caption and the reference captions
    retrieval_report(path, images, texts, i2t_topk, gt, n)    each image's top-5 retrieved captions, hits marked
"""

from __future__ import annotations

import base64
import html
import io
import logging
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.data.captions import load_image
from tasks.evals.common import write_text

logger = logging.getLogger(__name__)

__all__ = [
    "CaptionSample",
    "VQASample",
    "caption_report",
    "retrieval_report",
    "sample_indices",
    "thumbnail_data_uri",
    "vqa_report",
]

THUMBNAIL_SIDE = 224  # longest side of an embedded thumbnail, in pixels

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; }
table.metrics { border-collapse: collapse; margin-bottom: 1.5em; }
table.metrics td, table.metrics th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
.cards { display: flex; flex-wrap: wrap; gap: 14px; }
.card { width: 300px; border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
.card img { max-width: 100%; display: block; margin: 0 auto 6px auto; }
.missing { background: #fee; color: #900; padding: 8px; font-size: 0.85em; }
.file { color: #777; font-size: 0.75em; word-break: break-all; }
.label { font-weight: 600; }
.good { color: #070; }
.bad { color: #b00; }
ol, ul { margin: 4px 0; padding-left: 1.4em; }
li.hit { color: #070; font-weight: 600; }
""".strip()


@dataclass
class VQASample:
    image_path: str
    question: str
    answer: str  # what the model generated
    gt_answers: list[str] = field(default_factory=list)  # the annotators' answers (VQA) or the one answer (GQA)
    score: float | None = None  # accuracy of this question in percent, when known
    question_id: Any = None


@dataclass
class CaptionSample:
    image_path: str
    caption: str  # what the model generated
    references: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)  # per-image metrics (e.g. CIDEr), when known
    image_id: Any = None


def sample_indices(total: int, n: int, seed: int = 0) -> list[int]:
    """`n` distinct indices out of `range(total)` (all of them when n >= total), sorted; the same for a seed."""
    if n <= 0 or total <= 0:
        return []
    if n >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), n))


def thumbnail_data_uri(path: str | Path, side: int = THUMBNAIL_SIDE) -> str:
    """A `data:image/jpeg;base64,...` URI of the image at `path`, shrunk to at most `side` pixels."""
    image = load_image(path)
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _image_html(path: str | Path) -> str:
    try:
        uri = thumbnail_data_uri(path)
    except Exception as e:  # a report shows the problem instead of failing on it
        logger.warning("report: cannot read image %s: %s: %s", path, type(e).__name__, e)
        return f'<div class="missing">image unreadable: {_esc(path)}<br>{_esc(type(e).__name__)}: {_esc(e)}</div>'
    return f'<img src="{uri}" alt="{_esc(Path(path).name)}">'


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    """Scalar entries of `metrics` as a two-column table (nested dicts are flattened one level, lists skipped)."""
    rows = []
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            for sub, subvalue in value.items():
                if not isinstance(subvalue, (Mapping, list)):
                    rows.append((f"{key} / {sub}", subvalue))
        elif not isinstance(value, list):
            rows.append((key, value))
    if not rows:
        return ""
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(_fmt(v))}</td></tr>" for k, v in rows)
    return f'<table class="metrics">{body}</table>'


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _write_page(path: str | Path, title: str, metrics: Mapping[str, Any] | None, cards: Sequence[str]) -> Path:
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_esc(title)}</title>\n<style>\n{_STYLE}\n</style>\n</head>\n<body>\n"
        f"<h1>{_esc(title)}</h1>\n{_metrics_table(metrics or {})}\n"
        f'<div class="cards">\n' + "\n".join(cards) + "\n</div>\n</body>\n</html>\n"
    )
    path = write_text(path, page)
    logger.info("wrote report %s (%d examples)", path, len(cards))
    return path


def _card(image_path: str, body: str) -> str:
    return f'<div class="card">{_image_html(image_path)}<div class="file">{_esc(image_path)}</div>{body}</div>'


def _answer_counts(answers: Sequence[str]) -> str:
    """ "yes ×7, no ×3", most frequent first (ties in first-seen order)."""
    counts = Counter(answers)
    return ", ".join(f"{_esc(a)} ×{c}" if c > 1 else _esc(a) for a, c in counts.most_common())


def vqa_report(
    path: str | Path,
    samples: Sequence[VQASample],
    *,
    title: str = "VQA",
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """One card per sample: the image, the question, the generated answer (green when its accuracy is > 0) and
    the ground-truth answers with their counts."""
    cards = []
    for s in samples:
        verdict = ""
        if s.score is not None:
            verdict = f' <span class="{"good" if s.score > 0 else "bad"}">({s.score:.0f}%)</span>'
        qid = f'<div class="file">question {_esc(s.question_id)}</div>' if s.question_id is not None else ""
        body = (
            f"{qid}<div><span class='label'>Q:</span> {_esc(s.question)}</div>"
            f"<div><span class='label'>A:</span> {_esc(s.answer)}{verdict}</div>"
            f"<div><span class='label'>GT:</span> {_answer_counts(s.gt_answers) or '<i>none</i>'}</div>"
        )
        cards.append(_card(s.image_path, body))
    return _write_page(path, title, metrics, cards)


def caption_report(
    path: str | Path,
    samples: Sequence[CaptionSample],
    *,
    title: str = "Captioning",
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """One card per sample: the image, the generated caption, its per-image scores and the references."""
    cards = []
    for s in samples:
        scores = ", ".join(f"{_esc(k)} {_esc(_fmt(v))}" for k, v in s.scores.items())
        refs = "".join(f"<li>{_esc(r)}</li>" for r in s.references)
        image_id = f'<div class="file">image {_esc(s.image_id)}</div>' if s.image_id is not None else ""
        body = (
            f"{image_id}<div><span class='label'>Generated:</span> {_esc(s.caption)}</div>"
            + (f'<div class="file">{scores}</div>' if scores else "")
            + f"<div><span class='label'>References:</span><ul>{refs}</ul></div>"
        )
        cards.append(_card(s.image_path, body))
    return _write_page(path, title, metrics, cards)


def retrieval_report(
    path: str | Path,
    images: Sequence[str],
    texts: Sequence[str],
    i2t_topk: Sequence[Sequence[int]],
    gt: Sequence[Sequence[int]],
    n: int,
    *,
    k: int = 5,
    title: str = "Image-to-text retrieval",
    metrics: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> Path:
    """`n` sampled images (fixed seed), each with its top-`k` retrieved captions; correct ones are marked.

    Args:
        images: image paths, one per image.
        texts: every caption of the test set.
        i2t_topk: per image, text indices ranked best first (at least `k` of them, or all there are).
        gt: per image, the indices of its ground-truth captions.
        n: how many images to show.
    """
    if not len(images) == len(i2t_topk) == len(gt):
        raise ValueError(f"retrieval_report: {len(images)} images, {len(i2t_topk)} top-k lists, {len(gt)} gt lists")
    cards = []
    for i in sample_indices(len(images), n, seed):
        correct = set(gt[i])
        items = []
        for t in list(i2t_topk[i])[:k]:
            if not 0 <= t < len(texts):
                raise ValueError(f"retrieval_report: image {i} ranks text index {t}, outside [0, {len(texts)})")
            mark = "✓ " if t in correct else ""
            items.append(f'<li class="{"hit" if t in correct else ""}">{mark}{_esc(texts[t])}</li>')
        first_hit = next((r for r, t in enumerate(i2t_topk[i]) if t in correct), None)
        rank = f"first correct at rank {first_hit + 1}" if first_hit is not None else "no correct caption listed"
        refs = "".join(f"<li>{_esc(texts[t])}</li>" for t in gt[i])
        body = (
            f"<div><span class='label'>Top {k}</span> ({_esc(rank)}):<ol>{''.join(items)}</ol></div>"
            f"<div><span class='label'>Ground truth:</span><ul>{refs}</ul></div>"
        )
        cards.append(_card(images[i], body))
    return _write_page(path, title, metrics, cards)
