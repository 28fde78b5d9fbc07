"""Image transforms of BLIP-2 (LAVIS `Blip2ImageTrainProcessor` / `BlipImageEvalProcessor`).

Train: RandomResizedCrop(size, scale=(0.5, 1.0), bicubic) -> RandomHorizontalFlip -> ToTensor -> Normalize (crop
and flip can be turned off: `data.min_scale`, `data.hflip`).
Eval: Resize((size, size), bicubic) -> ToTensor -> Normalize. Both take an RGB PIL image and return a float
tensor `[3, size, size]` normalized with the CLIP mean/std (their home: `qformer.config`). The randomness of the
train transform comes from torch's global generator (torchvision v1 transforms), which DataLoader seeds per worker.
"""

from __future__ import annotations

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from qformer.config import CLIP_MEAN, CLIP_STD

__all__ = ["CLIP_MEAN", "CLIP_STD", "eval_transform", "train_transform"]


def train_transform(
    size: int = 224,
    min_scale: float = 0.5,
    max_scale: float = 1.0,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
    hflip: bool = True,
) -> T.Compose:
    """Random crop covering `min_scale`..`max_scale` of the area, resized to `size` (bicubic), random flip.

    `min_scale` 1.0 keeps the whole image: a square resize, as `eval_transform`; `hflip=False` never flips."""
    if min_scale >= 1.0:
        crop = T.Resize((size, size), interpolation=InterpolationMode.BICUBIC)
    else:
        crop = T.RandomResizedCrop(size, scale=(min_scale, max_scale), interpolation=InterpolationMode.BICUBIC)
    return T.Compose([crop, *([T.RandomHorizontalFlip()] if hflip else []), T.ToTensor(), T.Normalize(mean, std)])


def eval_transform(
    size: int = 224,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> T.Compose:
    """Deterministic square resize to `size` x `size` (bicubic, aspect ratio not kept, as in LAVIS)."""
    return T.Compose(
        [
            T.Resize((size, size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
