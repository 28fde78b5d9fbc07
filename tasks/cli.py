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

from tasks.command import execute

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


# -- helpers ------------------------------------------------------------------------------------------------------


def load_images(paths: list[str], size: int) -> torch.Tensor:
    """`[B, 3, size, size]` eval-transformed images; a missing or undecodable file is an error naming it."""
    import torch
    from PIL import Image, UnidentifiedImageError

    from tasks.data.transforms import eval_transform

    transform = eval_transform(size)
    out = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with Image.open(path) as img:
                out.append(transform(img.convert("RGB")))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot decode image {path}: {e}") from e
    return torch.stack(out)


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
    from qformer.config import Blip2Config

    stage2 = any(k.startswith(("opt_proj.", "t5_proj.")) for k in state)
    cfg = Blip2Config.preset(args.preset)
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
    from qformer.stage2 import VQA_GENERATION, Blip2Stage2

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
    """A subcommand's parser that gets its arguments from `load(parser)` when it first parses, so that `qformer
    --help` (or `qformer caption`) never imports the training, evaluation or demo modules."""

    def __init__(self, *args, load: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self._load = load

    def parse_known_args(self, args=None, namespace=None):
        if self._load is not None:
            load, self._load = self._load, None
            load(self)
        return super().parse_known_args(args, namespace)


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
    parser = argparse.ArgumentParser(
        prog="qformer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (train and eval always do)")
    parser.set_defaults(log_level=logging.WARNING)  # a command module's parser may set its own
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

    c = sub.add_parser("convert", help="convert a LAVIS / transformers / qformer checkpoint")
    c.add_argument("source", help="a LAVIS .pth file, a transformers folder, or one of our checkpoint folders")
    c.add_argument("dest", help="output folder")
    c.add_argument("--from", dest="src_fmt", choices=["lavis", "transformers", "ours"], required=True)
    c.add_argument("--to", dest="dst_fmt", choices=["ours", "transformers"], default="ours")
    c.add_argument("--preset", default="paper", help="model shape of a LAVIS file: paper (ViT-g) or paper_vitl")
    c.add_argument("--llm", help="the language model's folder (LAVIS stage-2 files)")
    c.add_argument(
        "--llm-dtype",
        choices=["fp32", "fp16", "bf16"],
        help="frozen LLM precision; default as LAVIS: bf16 for T5 (encoder-decoder), fp16 for OPT",
    )
    c.add_argument("--vision-weights", help="frozen ViT weights when the file has none (eva_vit_g.pth)")
    c.add_argument("--image-size", type=int, help="image size (e.g. 364 for fine-tuned files)")
    c.add_argument("--bert", help="BERT folder: its tokenizer (+[DEC]) is saved with a stage-1 checkpoint")
    c.set_defaults(func=cmd_convert)

    def decoding(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", required=True, help="one of our checkpoint folders")
        p.add_argument("--beams", type=int)
        p.add_argument("--max-new-tokens", type=int)
        p.add_argument("--min-new-tokens", type=int)

    p = sub.add_parser("caption", help="caption image files")
    p.add_argument("images", nargs="+")
    p.add_argument("--prompt", default="", help="text the caption continues (stage 2), e.g. 'a photo of'")
    decoding(p)
    p.set_defaults(func=cmd_caption)

    a = sub.add_parser("ask", help="answer a question about an image (zero-shot VQA)")
    a.add_argument("image")
    a.add_argument("question")
    a.add_argument("--prompt", default="Question: {} Short answer:", help="template; {} is the question")
    decoding(a)
    a.set_defaults(func=cmd_ask)

    f = sub.add_parser("features", help="extract image / text / multimodal features to a file")
    f.add_argument("images", nargs="*")
    f.add_argument("--text", action="append", help="a text (repeat for several)")
    f.add_argument("--mode", choices=["image", "text", "multimodal"], default="image")
    f.add_argument("--checkpoint", required=True)
    f.add_argument("--out", required=True, help="a .safetensors (every feature) or .npy (the projected one) file")
    f.set_defaults(func=cmd_features)

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
    return execute(args.command, args.func, args, level=logging.INFO if args.verbose else None)


if __name__ == "__main__":
    sys.exit(main())
