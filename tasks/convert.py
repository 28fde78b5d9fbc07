"""`qformer convert SOURCE DEST --from lavis|transformers|ours [--to ours|transformers]` (or `python -m
tasks.convert`): a checkpoint from one format into another.

qformer convert blip2_pretrained.pth runs/ckpt --from lavis --preset paper --vision-weights eva_vit_g.pth --bert BERT
qformer convert blip2_opt.pth runs/opt --from lavis --llm /models/opt-2.7b --vision-weights eva_vit_g.pth
qformer convert blip2_flant5xl.pth runs/t5 --from lavis --llm /models/flan-t5-xl --vision-weights eva_vit_g.pth
qformer convert /models/blip2-opt-2.7b runs/opt --from transformers
qformer convert runs/opt exported/ --from ours --to transformers
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from tasks import command

logger = logging.getLogger(__name__)


def _preset(name: str):
    """`Blip2Config.preset(name)`; an unknown name is bad input (a ValueError listing the known ones)."""
    from qformer.config import Blip2Config

    try:
        return Blip2Config.preset(name)
    except KeyError as e:
        raise ValueError(f"--preset: {e.args[0]}") from e


def run(args: argparse.Namespace) -> int:
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
    # A stage-2 file has the LLM projection: OPT's, T5's, or InstructBLIP-Vicuna's `llm_proj`.
    stage2 = any(k.startswith(("opt_proj.", "t5_proj.", "llm_proj.")) for k in state)
    # LAVIS drops the Q-Former's text parts from plain BLIP-2 stage-2 models; InstructBLIP keeps them.
    instruct = stage2 and "Qformer.bert.embeddings.word_embeddings.weight" in state
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

        llm_config = read_llm_config(args.llm)
        dtype = args.llm_dtype
        if dtype is None:
            # LAVIS runs OPT and Vicuna in fp16 and casts Flan-T5 to bf16 (T5 overflows in fp16).
            dtype = "bf16" if llm_config.is_encoder_decoder else "fp16"
            logger.info("%s: frozen LLM in %s (pass --llm-dtype to choose)", args.llm, dtype)
        llm = dataclasses.replace(cfg.llm, path=args.llm, dtype=dtype, qformer_instruction=instruct)
        if not llm_config.is_encoder_decoder and llm_config.model_type != "opt":
            from transformers import AutoTokenizer

            # LAVIS's Vicuna appends its eos to targets and generation stops there (OPT's captions end in "\n").
            llm = dataclasses.replace(llm, end_of_text=AutoTokenizer.from_pretrained(args.llm).eos_token)
        qformer_tokenizer = None
        if instruct:
            if not args.bert:
                raise ValueError(
                    f"{args.source} is an InstructBLIP file (its Q-Former reads instructions): pass --bert with the "
                    "BERT folder whose tokenizer it reads them with"
                )
            from qformer.bert import load_tokenizer

            qformer_tokenizer = load_tokenizer(args.bert)
        cfg = dataclasses.replace(cfg, llm=llm)
        # Flan-T5 with exact GELU (llm.t5_dense_act_fn), as LAVIS ran it.
        model = Blip2Stage2(cfg, qformer_tokenizer=qformer_tokenizer)
        load_stage2_state(model, state, "lavis", source=args.source)
    else:
        from qformer.blip2 import Blip2Stage1, load_stage1_state

        model = Blip2Stage1(cfg)
        load_stage1_state(model, state, "lavis", source=args.source)
    return model


def add_arguments(c: argparse.ArgumentParser) -> None:
    """The arguments of `qformer convert` and `python -m tasks.convert`."""
    from qformer.config import QFORMER_PRESETS, Blip2Config
    from qformer.dtypes import DTYPES

    # Blip2Config.preset knows the Q-Former presets' names (the registry), each with its image encoder.
    presets = ", ".join(f"{name} ({Blip2Config.preset(name).vision.arch} image encoder)" for name in QFORMER_PRESETS)
    c.add_argument(
        "source",
        help="a LAVIS .pth file, a transformers BLIP-2 / InstructBLIP folder, or one of our checkpoint folders",
    )
    c.add_argument("dest", help="the folder to write (one of ours, or a transformers folder with --to transformers)")
    c.add_argument(
        "--from",
        dest="src_fmt",
        choices=["lavis", "transformers", "ours"],
        required=True,
        help="the source's format: lavis (a blip2_*.pth file), transformers (a Salesforce/blip2-* or instructblip-* "
        "style folder) or "
        "ours (a folder written by qformer train / convert)",
    )
    c.add_argument(
        "--to",
        dest="dst_fmt",
        choices=["ours", "transformers"],
        default="ours",
        help="the output's format: ours (config.json + model.safetensors) or transformers (a folder "
        "Blip2ForConditionalGeneration / InstructBlipForConditionalGeneration / Blip2ForImageTextRetrieval loads, "
        "with its processor)",
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


def main(argv: list[str] | None = None) -> int:
    return command.main("convert", add_arguments, run, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
