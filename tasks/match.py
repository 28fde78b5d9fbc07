"""`qformer match IMAGE TEXT [TEXT ...] --checkpoint CKPT` (or `python -m tasks.match`): how well each text fits
the image, by a stage-1 checkpoint's two heads.

For every text: the ITM match probability (softmax of the ITM head's two logits, averaged over the query outputs of
the joint image-text pass) and the ITC similarity (the cosine of the projected [CLS] feature with the best of the
projected query outputs, no temperature), as LAVIS's `blip2_image_text_matching` scores with `match_head="itm"` and
`"itc"`. Texts are cleaned as the retrieval evaluation cleans captions (LAVIS's `pre_caption`: lower case,
. ! " ( ) * # : ; ~ to spaces) and printed as given, sorted by ITM probability, highest first. The image is encoded
once for all texts.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch

from tasks import command


@dataclass
class Match:
    text: str
    itm: float  # ITM probability of a match, in [0, 1]
    itc: float  # ITC cosine similarity, in [-1, 1]


@torch.no_grad()
def match_texts(model, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`[T, 2]`: (ITM probability, ITC similarity) of one image `[1, 3, H, W]` with each of T texts `[T, L]`.

    `model` is a `qformer.blip2.Blip2Stage1`; the image goes through the frozen encoder once."""
    image_embeds = model.encode_image(image)  # [1, N, E]
    feats = model.image_features(image_embeds, use_cache=False).feats  # [1, Q, P]
    text = model.text_features(input_ids, attention_mask).feat  # [T, P]
    itc = model.itc_similarity(feats, text)[0]  # [T]
    joint = image_embeds.expand(input_ids.shape[0], -1, -1)  # [T, N, E], a view: the image is not re-encoded
    itm = model.itm_logits(joint, input_ids, attention_mask).softmax(dim=-1)[:, 1]  # [T]
    return torch.stack([itm, itc], dim=-1).float()


def match(checkpoint: str, image_path: str, texts: list[str]) -> list[Match]:
    """Every text scored against the image, sorted by ITM probability (highest first; ties keep the given order)."""
    from qformer.blip2 import Blip2Stage1
    from qformer.checkpoint import load_pretrained
    from tasks.cli import load_images, stage1_tokens
    from tasks.data.text import clean_caption

    model = load_pretrained(checkpoint)
    if not isinstance(model, Blip2Stage1):
        raise ValueError(
            f"{checkpoint} holds a {type(model).__name__} without ITM and ITC heads: matching needs a stage-1 "
            "checkpoint (qformer train stage 1, or qformer convert of a LAVIS blip2_pretrained.pth / transformers "
            "Blip2ForImageTextRetrieval folder)"
        )
    image = load_images([image_path], model.cfg.vision.image_size)
    _, enc = stage1_tokens(checkpoint, [clean_caption(t) for t in texts], model.cfg.max_text_length)
    scores = match_texts(model.eval(), image, enc.input_ids, enc.attention_mask).tolist()
    results = [Match(text, itm, itc) for text, (itm, itc) in zip(texts, scores, strict=True)]
    return sorted(results, key=lambda m: -m.itm)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `qformer match` and `python -m tasks.match`."""
    parser.add_argument("image", help="an image file (any format PIL reads)")
    parser.add_argument("texts", nargs="+", metavar="TEXT", help="the texts to score against the image")
    parser.add_argument(
        "--checkpoint", required=True, help="a stage-1 checkpoint folder of ours, saved with its tokenizer"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='print {"image", "checkpoint", "matches": [{"text", "itm", "itc"}, ...]} instead of a table',
    )


def run(args: argparse.Namespace) -> int:
    results = match(args.checkpoint, args.image, args.texts)
    if args.json:
        out = {"image": args.image, "checkpoint": args.checkpoint, "matches": [asdict(m) for m in results]}
        print(json.dumps(out, indent=1))
        return 0
    print("itm\titc\ttext")
    for m in results:
        print(f"{m.itm:.4f}\t{m.itc:.4f}\t{m.text}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return command.main("match", add_arguments, run, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
