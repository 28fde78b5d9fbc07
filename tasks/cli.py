"""The `qformer` command line.

qformer convert blip2_pretrained.pth runs/ckpt --from lavis --preset paper --vision-weights eva_vit_g.pth --bert BERT
qformer convert blip2_opt.pth runs/opt --from lavis --llm /models/opt-2.7b --vision-weights eva_vit_g.pth
qformer convert blip2_flant5xl.pth runs/t5 --from lavis --llm /models/flan-t5-xl --vision-weights eva_vit_g.pth
qformer convert /models/blip2-opt-2.7b runs/opt --from transformers
qformer convert runs/opt exported/ --from ours --to transformers
qformer caption photo.jpg --checkpoint runs/opt
qformer ask photo.jpg "what is the man holding?" --checkpoint runs/opt
qformer features a.jpg b.jpg --checkpoint runs/ckpt --mode image --out feats.safetensors
qformer train configs/stage1_vitg.yaml optim.lr=5e-5         (the same as python -m tasks.train ...)
qformer train configs/stage1_vitg.yaml optim.lr=5e-5 --print-config      (every key of the resolved config; no run)
qformer eval configs/eval/retrieval_coco.yaml checkpoint=runs/x/final   (python -m tasks.evaluate ...)
qformer capfilt configs/capfilt/laion.yaml captioner=runs/opt/final   (python -m tasks.capfilt ...)
qformer demo --fast
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.command import HelpFormatter, add_verbosity_arguments, execute

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


# -- helpers ------------------------------------------------------------------------------------------------------


def load_images(paths: list[str], size: int) -> torch.Tensor:
    """`[B, 3, size, size]` eval-transformed images; a missing, undecodable or too large (`ImageTooLarge`, PIL's
    `Image.MAX_IMAGE_PIXELS`) file is an error naming it."""
    import torch
    from PIL import UnidentifiedImageError

    from tasks.data.captions import load_image
    from tasks.data.transforms import eval_transform

    transform = eval_transform(size)
    out = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            image = load_image(path)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot decode image {path}: {e}") from e
        out.append(transform(image))
    return torch.stack(out)


def stage1_tokens(folder: str, texts: list[str], max_length: int):
    from qformer.checkpoint import load_tokenizer_from

    tokenizer = load_tokenizer_from(folder)
    if tokenizer is None:
        raise ValueError(f"{folder} has no tokenizer/ folder: convert it with --bert BERT_FOLDER")
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return tokenizer, enc


# -- commands -----------------------------------------------------------------------------------------------------


def _generation_cfg(args: argparse.Namespace, default):
    changes = {
        k: v
        for k, v in (
            ("num_beams", args.beams),
            ("max_new_tokens", args.max_new_tokens),
            ("min_new_tokens", args.min_new_tokens),
            ("length_penalty", args.length_penalty),
            ("repetition_penalty", args.repetition_penalty),
            ("top_p", args.top_p),
            ("top_k", args.top_k),
            ("temperature", args.temperature),
            ("num_return_sequences", getattr(args, "num_captions", None)),
        )
        if v is not None
    }
    if "max_new_tokens" in changes and "min_new_tokens" not in changes:
        # Asking for shorter output should not trip over the default minimum.
        changes["min_new_tokens"] = min(default.min_new_tokens, changes["max_new_tokens"])
    sampling = {"top_p", "top_k", "temperature"} & set(changes)
    if sampling and not args.sample:
        raise ValueError(f"--{'/--'.join(sorted(k.replace('_', '-') for k in sampling))} only act with --sample")
    if args.sample:
        # Nucleus sampling as LAVIS's captioning does it: one beam and top_p 0.9 unless asked otherwise.
        changes = {"num_beams": 1, "top_p": 0.9, **changes, "do_sample": True}
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)  # the commands decode right after: sampled text repeats with the seed
    return dataclasses.replace(default, **changes)


def cmd_caption(args: argparse.Namespace) -> int:
    from qformer.blip2 import Blip2Stage1
    from qformer.checkpoint import load_pretrained
    from qformer.stage2 import CAPTION_GENERATION

    model = load_pretrained(args.checkpoint)
    images = load_images(args.images, model.cfg.vision.image_size)
    cfg = _generation_cfg(args, CAPTION_GENERATION)
    if isinstance(model, Blip2Stage1):
        tokenizer, _ = stage1_tokens(args.checkpoint, [""], 8)
        captions = model.caption(images, tokenizer, cfg)
    else:
        captions = model.generate(args.prompt, images=images, cfg=cfg)
    for i, caption in enumerate(captions):  # image i's cfg.num_return_sequences captions are consecutive
        print(f"{args.images[i // cfg.num_return_sequences]}\t{caption}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from qformer.checkpoint import load_pretrained
    from qformer.stage2 import VQA_GENERATION, Blip2Stage2, check_vqa_prompt

    check_vqa_prompt(args.prompt)  # before the model loads
    model = load_pretrained(args.checkpoint)
    if not isinstance(model, Blip2Stage2):
        raise ValueError(f"{args.checkpoint} is a stage-1 model: questions need a stage-2 (LLM) checkpoint")
    images = load_images([args.image], model.cfg.vision.image_size)
    answer = model.predict_answers(
        [args.question], images=images, prompt=args.prompt, cfg=_generation_cfg(args, VQA_GENERATION)
    )
    print(answer[0])
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from qformer.blip2 import Blip2Stage1
    from qformer.checkpoint import load_pretrained

    model = load_pretrained(args.checkpoint)
    if not isinstance(model, Blip2Stage1):
        raise ValueError(f"{args.checkpoint}: feature extraction needs a stage-1 checkpoint")
    images = load_images(args.images, model.cfg.vision.image_size) if args.images else None
    ids = mask = None
    if args.text:
        _, enc = stage1_tokens(args.checkpoint, args.text, model.cfg.max_text_length)
        ids, mask = enc.input_ids, enc.attention_mask
    feats = model.extract_features(images, ids, mask, mode=args.mode)
    tensors = {k: v.contiguous() for k, v in dataclasses.asdict(feats).items() if v is not None}
    out = Path(args.out)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, out)
    elif out.suffix == ".npy":
        import numpy as np

        main = {"image": "image_embeds_proj", "text": "text_embeds_proj", "multimodal": "multimodal_embeds"}[args.mode]
        np.save(out, tensors[main].float().numpy())
    else:
        raise ValueError(f"--out must end in .safetensors or .npy, got {out}")
    print(f"wrote {out}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()))
    return 0


# -- parser -------------------------------------------------------------------------------------------------------


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser that gets its arguments from `load(parser)` when it first parses or shows its help, so
    that `qformer --help` (or `qformer caption`) never imports the training, evaluation or demo modules (nor torch)."""

    def __init__(self, *args, load: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._load = load
        add_verbosity_arguments(self, subcommand=True)

    def load_arguments(self) -> argparse.ArgumentParser:
        """Add the command's arguments now (once); returns the parser."""
        if self._load is not None:
            load, self._load = self._load, None
            load(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        self.load_arguments()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.load_arguments()
        return super().format_help()

    def format_usage(self) -> str:
        self.load_arguments()
        return super().format_usage()


def _decoding_arguments(p: argparse.ArgumentParser, preset) -> None:
    """--checkpoint and the decoding options; `preset` (a GenerationConfig) holds the command's defaults."""
    p.add_argument(
        "--checkpoint", required=True, help="one of our checkpoint folders (qformer train's final/ or convert's output)"
    )
    p.add_argument(
        "--beams", type=int, metavar="N", help=f"beams of the beam search, 1 = greedy (default: {preset.num_beams})"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help=f"the most tokens to generate (default: {preset.max_new_tokens})",
    )
    p.add_argument(
        "--min-new-tokens",
        type=int,
        metavar="N",
        help=f"the fewest tokens to generate before the end token may come (default: {preset.min_new_tokens}, or "
        "--max-new-tokens when that is smaller)",
    )
    p.add_argument(
        "--length-penalty",
        type=float,
        metavar="X",
        help="beam search ranks finished beams by sum(log p) / length ** X; > 0 favours longer text "
        f"(default: {preset.length_penalty})",
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        metavar="X",
        help=f"> 1 discourages tokens already in the text (default: {preset.repetition_penalty})",
    )
    p.add_argument(
        "--sample",
        action="store_true",
        help="sample instead of searching: nucleus sampling with 1 beam and top-p 0.9 unless --beams / --top-p say "
        "otherwise (random: set a seed with --seed for repeatable text)",
    )
    p.add_argument(
        "--top-p", type=float, metavar="P", help="with --sample: nucleus sampling's probability mass (default: 0.9)"
    )
    p.add_argument(
        "--top-k", type=int, metavar="K", help="with --sample: among the K most likely tokens, 0 = all (default: 50)"
    )
    p.add_argument("--temperature", type=float, metavar="T", help="with --sample: divide the logits by T (default: 1)")
    p.add_argument("--seed", type=int, help="torch's random seed, for repeatable sampling (default: none)")


def _caption_arguments(p: argparse.ArgumentParser) -> None:
    from qformer.stage2 import CAPTION_GENERATION

    p.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    p.add_argument("--prompt", default="", help="text the caption continues (stage 2 only), e.g. 'a photo of'")
    _decoding_arguments(p, CAPTION_GENERATION)
    p.add_argument(
        "--num-captions",
        type=int,
        metavar="N",
        help="captions per image, one line each: the N best beams (N <= --beams), or N samples with --sample "
        "(default: 1)",
    )
    p.set_defaults(func=cmd_caption)


def _ask_arguments(a: argparse.ArgumentParser) -> None:
    from qformer.stage2 import VQA_GENERATION

    a.add_argument("image", help="an image file")
    a.add_argument("question", help="the question, e.g. 'what is the man holding?'")
    a.add_argument(
        "--prompt", default="Question: {} Short answer:", help="the template: exactly one {}, where the question goes"
    )
    _decoding_arguments(a, VQA_GENERATION)
    a.set_defaults(func=cmd_ask)


def _features_arguments(f: argparse.ArgumentParser) -> None:
    f.add_argument("images", nargs="*", help="image files (none for --mode text)")
    f.add_argument("--text", action="append", help="a text (repeat for several); default: none")
    f.add_argument(
        "--mode",
        choices=["image", "text", "multimodal"],
        default="image",
        help="image: the query outputs and their ITC projections; text: the text encoder's outputs and the projected "
        "[CLS] feature; multimodal: the query outputs of the ITM pass (queries attending to image and text)",
    )
    f.add_argument("--checkpoint", required=True, help="a stage-1 checkpoint folder of ours")
    f.add_argument("--out", required=True, help="a .safetensors (every feature) or .npy (the projected one) file")
    f.set_defaults(func=cmd_features)


def _mount(parser: argparse.ArgumentParser, module) -> None:
    """Give `parser` a command module's description, arguments and `run`."""
    parser.description = module.__doc__
    module.add_arguments(parser)
    parser.set_defaults(func=module.run)


def _convert_command(parser: argparse.ArgumentParser) -> None:
    from tasks import convert

    _mount(parser, convert)


def _train_command(parser: argparse.ArgumentParser) -> None:
    from tasks import train

    _mount(parser, train)


def _eval_command(parser: argparse.ArgumentParser) -> None:
    from tasks import evaluate

    _mount(parser, evaluate)


def _match_command(parser: argparse.ArgumentParser) -> None:
    from tasks import match

    _mount(parser, match)


def _capfilt_command(parser: argparse.ArgumentParser) -> None:
    from tasks import capfilt

    _mount(parser, capfilt)


def _demo_command(parser: argparse.ArgumentParser) -> None:
    from tasks.shapes import demo

    _mount(parser, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qformer", description=__doc__, formatter_class=HelpFormatter)
    add_verbosity_arguments(parser)  # and on every subcommand (_CommandParser): before or after the command name
    parser.set_defaults(log_level=logging.WARNING)  # a command module's parser may set its own
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        parser_class=_CommandParser,
        metavar="COMMAND",
        help="one of the commands below; qformer COMMAND --help shows its arguments",
    )

    # Every command's arguments are added when it is chosen (_CommandParser), so `qformer --help` imports no torch.
    sub.add_parser("convert", help="convert a LAVIS / transformers / qformer checkpoint", load=_convert_command)
    sub.add_parser("caption", help="caption image files", load=_caption_arguments)
    sub.add_parser("ask", help="answer a question about an image (zero-shot VQA)", load=_ask_arguments)
    sub.add_parser("features", help="extract image / text / multimodal features to a file", load=_features_arguments)

    # The commands with their own module: arguments declared there (`add_arguments`), loaded when chosen.
    sub.add_parser(
        "train", help="train stage 1 or 2 from a YAML config (same as python -m tasks.train)", load=_train_command
    )
    sub.add_parser(
        "eval",
        help="evaluate: retrieval, zero-shot VQA / GQA, captioning (configs/eval/*.yaml; = python -m tasks.evaluate)",
        load=_eval_command,
    )
    sub.add_parser("match", help="ITM probability and ITC similarity of texts with an image", load=_match_command)
    sub.add_parser(
        "capfilt",
        help="bootstrapped captions for web data: sample, rank, keep the best (= python -m tasks.capfilt)",
        load=_capfilt_command,
    )
    sub.add_parser(
        "demo", help="the whole recipe in the shapes world, on a CPU (writes runs/shapes/report.md)", load=_demo_command
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return execute(args.command, args.func, args)


if __name__ == "__main__":
    sys.exit(main())
