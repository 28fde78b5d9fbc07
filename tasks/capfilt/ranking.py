"""Which captions of an image CapFilt keeps, and the image-text similarities it ranks them by.

`keep_top_k` is the rule, a pure function: the candidates (web caption(s) and synthetic captions) sorted by score,
highest first; candidates with the same text count once (the first one listed: callers list the web caption
first, so a synthetic copy of it never takes a second slot); among equal scores the candidate listed first wins
(a stable sort), so the choice never depends on anything but the scores and the order of the candidates.

The similarity comes from a `Ranker`:
- `ItcRanker`: a stage-1 checkpoint's ITC similarity, the cosine of the text's projected [CLS] feature with the
  best of the Q projected query outputs (as `Blip2Stage1.itc_similarity`; no temperature);
- `ItmRanker`: the same checkpoint's ITM head, the probability that image and text match (BLIP's filter kept or
  dropped captions by this head; BLIP-2 ranked with CLIP). It reads image and text together, so it is one joint
  Q-Former pass per candidate: slower than ITC (in the shapes world it kept 1-2 points more right captions);
- `OpenClipRanker`: a CLIP model through open_clip (the paper ranked with CLIP ViT-L/14), from a local weights file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from tasks.data.text import clean_caption

__all__ = ["ItcRanker", "ItmRanker", "Kept", "OpenClipRanker", "Ranker", "build_ranker", "keep_top_k"]


@dataclass(frozen=True)
class Kept:
    caption: str
    score: float
    source: str  # "web" | "synthetic"


def keep_top_k(scores: Sequence[float], captions: Sequence[str], sources: Sequence[str], k: int) -> list[Kept]:
    """The `k` best candidates, best first (fewer when there are fewer distinct captions). See the module docstring
    for the rule on duplicates and ties."""
    if not len(scores) == len(captions) == len(sources):
        raise ValueError(f"{len(scores)} scores, {len(captions)} captions and {len(sources)} sources: need one each")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    seen: set[str] = set()
    distinct = []
    for i, caption in enumerate(captions):
        if caption not in seen:
            seen.add(caption)
            distinct.append(i)
    best = sorted(distinct, key=lambda i: -float(scores[i]))[:k]  # sorted() is stable: ties keep the listed order
    return [Kept(captions[i], float(scores[i]), sources[i]) for i in best]


class Ranker:
    """Scores (image, text) pairs. `transform` turns a PIL RGB image into the tensor `scores` expects."""

    transform: Callable[[Image.Image], Tensor]

    def scores(self, images: Tensor, texts: Sequence[str], owners: Sequence[int]) -> list[float]:
        """The similarity of each text with its image `images[owners[j]]`; images `[B, 3, H, W]`."""
        raise NotImplementedError


class ItcRanker(Ranker):
    def __init__(self, model, tokenizer, device: torch.device, max_words: int = 50) -> None:
        from tasks.data.transforms import eval_transform

        self.model, self.tokenizer, self.device, self.max_words = model.eval(), tokenizer, device, max_words
        self.transform = eval_transform(model.cfg.vision.image_size)

    def _tokens(self, texts: Sequence[str]):
        return self.tokenizer(
            [clean_caption(t, self.max_words) for t in texts],
            padding="longest",
            truncation=True,
            max_length=self.model.cfg.max_text_length,
            return_tensors="pt",
        ).to(self.device)

    @torch.no_grad()
    def scores(self, images: Tensor, texts: Sequence[str], owners: Sequence[int]) -> list[float]:
        feats = self.model.image_features(self.model.encode_image(images.to(self.device)), use_cache=False).feats
        enc = self._tokens(texts)
        text = self.model.text_features(enc.input_ids, enc.attention_mask).feat  # [T, P]
        owner = torch.as_tensor(list(owners), device=feats.device)
        return torch.einsum("tqp,tp->tq", feats[owner].float(), text.float()).amax(dim=-1).tolist()


class ItmRanker(ItcRanker):
    @torch.no_grad()
    def scores(self, images: Tensor, texts: Sequence[str], owners: Sequence[int]) -> list[float]:
        embeds = self.model.encode_image(images.to(self.device))  # each image through the ViT once
        enc = self._tokens(texts)
        owner = torch.as_tensor(list(owners), device=embeds.device)
        logits = self.model.itm_logits(embeds[owner], enc.input_ids, enc.attention_mask)  # [T, 2]
        return logits.float().softmax(dim=-1)[:, 1].tolist()


class OpenClipRanker(Ranker):
    def __init__(self, name: str, weights: str, device: torch.device) -> None:
        try:
            import open_clip
        except ImportError as e:
            raise ValueError(
                "ranker open_clip needs the open_clip package: pip install open_clip_torch (or use ranker: itc)"
            ) from e
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights)
        self.model, self.transform = model.to(device).eval(), preprocess
        self.tokenizer, self.device = open_clip.get_tokenizer(name), device

    @torch.no_grad()
    def scores(self, images: Tensor, texts: Sequence[str], owners: Sequence[int]) -> list[float]:
        image = torch.nn.functional.normalize(self.model.encode_image(images.to(self.device)).float(), dim=-1)
        text = torch.nn.functional.normalize(
            self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float(), dim=-1
        )
        owner = torch.as_tensor(list(owners), device=image.device)
        return (image[owner] * text).sum(dim=-1).tolist()


def build_ranker(cfg, captioner, device: torch.device) -> Ranker:
    """The ranker a `CapfiltConfig` names; `captioner` (already loaded) doubles as the ITC ranker when it is a
    stage-1 model and no ranker_checkpoint is given."""
    from qformer.blip2 import Blip2Stage1
    from qformer.checkpoint import load_pretrained, load_tokenizer_from

    if cfg.ranker == "open_clip":
        return OpenClipRanker(cfg.open_clip_model, cfg.ranker_checkpoint, device)
    folder = cfg.ranker_checkpoint or cfg.captioner
    model = captioner if not cfg.ranker_checkpoint else load_pretrained(folder).to(device)
    if not isinstance(model, Blip2Stage1):
        raise ValueError(
            f"ranker {cfg.ranker} needs a stage-1 checkpoint (ITC and ITM heads): {folder} holds a "
            f"{type(model).__name__}; set ranker_checkpoint to a stage-1 folder"
        )
    tokenizer = load_tokenizer_from(folder)
    if tokenizer is None:
        raise ValueError(f"{folder} has no tokenizer/ folder: convert it with --bert BERT_FOLDER")
    return (ItmRanker if cfg.ranker == "itm" else ItcRanker)(model, tokenizer, device, cfg.max_words)
