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


def _preset(name: str):
    """`Blip2Config.preset(name)`; an unknown name is bad input (a ValueError listing the known ones)."""
    from qformer.config import Blip2Config

    try:
        return Blip2Config.preset(name)
    except KeyError as e:
        raise ValueError(f"--preset: {e.args[0]}") from e


def _stage1_tokens(folder: str, texts: list[str], max_length: int):
    from qformer.checkpoint import load_tokenizer_from

    tokenizer = load_tokenizer_from(folder)
    if tokenizer is None:
        raise ValueError(f"{folder} has no tokenizer/ folder: convert it with --bert BERT_FOLDER")
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return tokenizer, enc


# -- commands -----------------------------------------------------------------------------------------------------


def cmd_convert(args: argparse.Namespace) -> int:
    from qformer.checkpoint import read_state_dict, save_pretrained

    if args.src_fmt == "transformers":
        from qformer.hf_folders import load_transformers_folder

        model = load_transformers_folder(args.source)
    elif args.src_fmt == "ours":
        from qformer.checkpoint import load_pretrained

        model = load_pretrained(args.source)
    else:
        _preset(args.preset)  # a typo fails before a large file is read
        model = _from_lavis(args, read_state_dict(args.source))
    tokenizer = None
    if args.bert:
        from qformer.bert import load_tokenizer

        tokenizer = load_tokenizer(args.bert)
    if args.dst_fmt == "ours":
        save_pretrained(model, args.dest, tokenizer=tokenizer)
    else:
        from qformer.blip2 import Blip2Stage1
        from qformer.hf_folders import export_stage1, export_stage2

        if isinstance(model, Blip2Stage1):
            export_stage1(model, args.dest, tokenizer=tokenizer)
        else:
            export_stage2(model, args.dest)
    print(f"wrote {args.dest}")
    return 0


def _from_lavis(args: argparse.Namespace, state: dict):
    stage2 = any(k.startswith(("opt_proj.", "t5_proj.")) for k in state)
    cfg = _preset(args.preset)
    vision = cfg.vision
    if args.vision_weights:
        vision = dataclasses.replace(vision, weights=args.vision_weights)
    if args.image_size:
        vision = dataclasses.replace(vision, image_size=args.image_size)
    has_visual = any(k.startswith("visual_encoder.") for k in state)
    if not has_visual and not vision.weights:
        raise ValueError(
            f"{args.source} holds no image encoder (visual_encoder.*): pass --vision-weights (e.g. eva_vit_g.pth)"
        )
    cfg = dataclasses.replace(cfg, vision=vision)
    if stage2:
        if not args.llm:
            raise ValueError(f"{args.source} is a stage-2 file: pass --llm with the language model's folder")
        from qformer.stage2 import Blip2Stage2, load_stage2_state, read_llm_config

        dtype = args.llm_dtype
        if dtype is None:
            # LAVIS runs OPT in fp16 and casts Flan-T5 to bf16 (T5 overflows in fp16).
            dtype = "bf16" if read_llm_config(args.llm).is_encoder_decoder else "fp16"
            logger.info("%s: frozen LLM in %s (pass --llm-dtype to choose)", args.llm, dtype)
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, path=args.llm, dtype=dtype))
        model = Blip2Stage2(cfg)  # Flan-T5 with exact GELU (llm.t5_dense_act_fn), as LAVIS ran it
        load_stage2_state(model, state, "lavis", source=args.source)
    else:
        from qformer.blip2 import Blip2Stage1, load_stage1_state

        model = Blip2Stage1(cfg)
        load_stage1_state(model, state, "lavis", source=args.source)
    return model


def _generation_cfg(args: argparse.Namespace, default):
    changes = {
        k: v
        for k, v in (
            ("num_beams", args.beams),
            ("max_new_tokens", args.max_new_tokens),
            ("min_new_tokens", args.min_new_tokens),
        )
        if v is not None
    }
    if "max_new_tokens" in changes and "min_new_tokens" not in changes:
        # Asking for shorter output should not trip over the default minimum.
        changes["min_new_tokens"] = min(default.min_new_tokens, changes["max_new_tokens"])
    return dataclasses.replace(default, **changes)


def cmd_caption(args: argparse.Namespace) -> int:
    from qformer.blip2 import Blip2Stage1
    from qformer.checkpoint import load_pretrained
    from qformer.stage2 import CAPTION_GENERATION

    model = load_pretrained(args.checkpoint)
    images = load_images(args.images, model.cfg.vision.image_size)
    cfg = _generation_cfg(args, CAPTION_GENERATION)
    if isinstance(model, Blip2Stage1):
        tokenizer, _ = _stage1_tokens(args.checkpoint, [""], 8)
        captions = model.caption(images, tokenizer, cfg)
    else:
        captions = model.generate(args.prompt, images=images, cfg=cfg)
    for path, caption in zip(args.images, captions, strict=True):
        print(f"{path}\t{caption}")
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
        _, enc = _stage1_tokens(args.checkpoint, args.text, model.cfg.max_text_length)
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


def _convert_arguments(c: argparse.ArgumentParser) -> None:
    from qformer.config import QFORMER_PRESETS, Blip2Config
    from qformer.dtypes import DTYPES

    # Blip2Config.preset knows the Q-Former presets' names (the registry), each with its image encoder.
    presets = ", ".join(f"{name} ({Blip2Config.preset(name).vision.arch} image encoder)" for name in QFORMER_PRESETS)
    c.add_argument("source", help="a LAVIS .pth file, a transformers BLIP-2 folder, or one of our checkpoint folders")
    c.add_argument("dest", help="the folder to write (one of ours, or a transformers folder with --to transformers)")
    c.add_argument(
        "--from",
        dest="src_fmt",
        choices=["lavis", "transformers", "ours"],
        required=True,
        help="the source's format: lavis (a blip2_*.pth file), transformers (a Salesforce/blip2-* style folder) or "
        "ours (a folder written by qformer train / convert)",
    )
    c.add_argument(
        "--to",
        dest="dst_fmt",
        choices=["ours", "transformers"],
        default="ours",
        help="the output's format: ours (config.json + model.safetensors) or transformers (a folder "
        "Blip2ForConditionalGeneration / Blip2ForImageTextRetrieval loads, with its processor)",
    )
    c.add_argument(
        "--preset",
        default="paper",
        choices=list(QFORMER_PRESETS),
        metavar="PRESET",
        help=f"model shape of a LAVIS file (Blip2Config.preset): {presets}; the tiny ones are test twins",
    )
    c.add_argument(
        "--llm",
        help="the language model's folder, for a LAVIS stage-2 file (which holds no LLM weights); default: none "
        "(a stage-1 file needs none)",
    )
    c.add_argument(
        "--llm-dtype",
        choices=list(DTYPES),
        help="frozen LLM precision; default as LAVIS: bf16 for T5 (encoder-decoder), fp16 for OPT",
    )
    c.add_argument(
        "--vision-weights",
        help="frozen ViT weights for a LAVIS file that holds none (e.g. eva_vit_g.pth); default: none, the image "
        "encoder comes from the file itself",
    )
    c.add_argument(
        "--image-size", type=int, help="image size in pixels, e.g. 364 for fine-tuned files; default: the preset's"
    )
    c.add_argument(
        "--bert",
        help="a BERT folder whose tokenizer (+[DEC]) is saved with a stage-1 checkpoint, so that caption and "
        "features can read text; default: none (no tokenizer saved)",
    )
    c.set_defaults(func=cmd_convert)


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


def _caption_arguments(p: argparse.ArgumentParser) -> None:
    from qformer.stage2 import CAPTION_GENERATION

    p.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    p.add_argument("--prompt", default="", help="text the caption continues (stage 2 only), e.g. 'a photo of'")
    _decoding_arguments(p, CAPTION_GENERATION)
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


def _train_command(parser: argparse.ArgumentParser) -> None:
    from tasks import train

    _mount(parser, train)


def _eval_command(parser: argparse.ArgumentParser) -> None:
    from tasks import evaluate

    _mount(parser, evaluate)


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
    sub.add_parser("convert", help="convert a LAVIS / transformers / qformer checkpoint", load=_convert_arguments)
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
    sub.add_parser(
        "demo", help="the whole recipe in the shapes world, on a CPU (writes runs/shapes/report.md)", load=_demo_command
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return execute(args.command, args.func, args)


if __name__ == "__main__":
    sys.exit(main())
