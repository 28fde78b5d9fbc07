"""Tiny stand-ins for the real assets (a BERT folder, OPT and Flan-T5 folders, ViT weight files, a caption dataset),
written in the real formats so the tiny twin configs (configs/tiny/) and the tests run the real loading code.

    python -m tasks.tiny_assets runs/tiny_assets     # then: QFORMER_TINY=runs/tiny_assets python -m tasks.train ...
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

SPECIALS = ["<pad>", "</s>", "<unk>", "<image>", "\n"]
WORDS = (
    "a photo of the cat dog bird red blue green small big two three on under table grass sky question short answer "
    "what is colour color how many are there ? : . , sitting running in picture image shape circle square"
).split()
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
PAD, EOS, IMAGE = 0, 1, 3


def word_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """OPT-style (BOS `</s>` first) or T5-style (`</s>` last) word-level tokenizer; `\\n` is a token."""
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n|[?:.,]"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r" +"), behavior="removed"),
        ]
    )
    template = "</s> $A" if kind == "opt" else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("</s>", EOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="</s>", unk_token="<unk>"
    )


def _randomize(model: torch.nn.Module, std: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)


def tiny_opt_folder(path: Path, seed: int = 0) -> Path:
    cfg = OPTConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        num_hidden_layers=2,
        ffn_dim=32,
        num_attention_heads=2,
        max_position_embeddings=64,
        word_embed_proj_dim=16,
        pad_token_id=PAD,
        bos_token_id=EOS,
        eos_token_id=EOS,
        dropout=0.0,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    model = OPTForCausalLM(cfg)
    _randomize(model, 0.5)
    model.save_pretrained(path)
    word_tokenizer("opt").save_pretrained(path)
    return path


def tiny_t5_folder(path: Path, seed: int = 0) -> Path:
    cfg = T5Config(
        vocab_size=len(VOCAB),
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        dropout_rate=0.0,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=PAD,
        feed_forward_proj="gated-gelu",  # Flan-T5's
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(cfg)
    _randomize(model, 0.5)
    model.save_pretrained(path)
    word_tokenizer("t5").save_pretrained(path)
    return path


def tiny_llama_folder(path: Path, seed: int = 0) -> Path:
    """A tiny LLaMA (RoPE, RMSNorm, SwiGLU) with a BOS-first word tokenizer, as InstructBLIP-Vicuna runs it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=EOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    _randomize(model, 0.5)
    model.save_pretrained(path)
    word_tokenizer("opt").save_pretrained(path)  # BOS first, like LLaMA's; Vicuna's bos/eos are both `</s>`
    return path


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
SHAPES = ["square", "bar"]
BERT_WORDS = ["a", "photo", "of", "the", "red", "green", "blue", "square", "bar", "on", "black", "background"]


def tiny_bert_folder(path: Path) -> Path:
    """A tiny BERT (weights + WordPiece vocabulary of 99, so [DEC] = 99 fits the tiny Q-Former's 100 rows)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + BERT_WORDS
    vocab += [f"w{i}" for i in range(99 - len(vocab))]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast.from_pretrained(str(path)).save_pretrained(path)  # reads vocab.txt
    cfg = BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(path)
    return path


def caption_dataset(root: Path, n: int = 20, seed: int = 0, corrupt: int = 0, missing: int = 0) -> Path:
    """n images of one coloured shape with matching captions; the first `corrupt` files are truncated JPEGs and
    the next `missing` are listed but absent. Returns the annotation JSON path."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    anns = []
    for i in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        img = Image.new("RGB", (40, 40), (0, 0, 0))
        w, h = (24, 24) if shape == "square" else (30, 10)
        x, y = rng.randint(0, 40 - w), rng.randint(0, 40 - h)
        img.paste(COLOURS[colour], (x, y, x + w, y + h))
        name = f"images/{i:03d}.jpg"
        if i < corrupt:
            img.save(root / name, quality=90)
            data = (root / name).read_bytes()
            (root / name).write_bytes(data[: len(data) // 3])
        elif i >= corrupt + missing:
            img.save(root / name, quality=90)
        anns.append({"image": name, "caption": f"a {colour} {shape} on the black background", "image_id": i})
    (root / "train.json").write_text(json.dumps(anns))
    return root / "train.json"


def vqa_dataset(root: Path) -> tuple[Path, Path]:
    """VQAv2-format questions and annotations (ten answers each, eight of them right) on the images `caption_dataset`
    wrote under `root` (image_pattern "images/{image_id:03d}.jpg"). Returns (questions, annotations) paths."""
    anns = json.loads((root / "train.json").read_text())
    questions, annotations = [], []
    for ann in anns:
        colour, shape = ann["caption"].split()[1:3]
        other = [c for c in COLOURS if c != colour]
        for k, (question, answer, wrong) in enumerate(
            [
                ("what colour is the shape?", colour, other),
                ("what shape is there?", shape, [s for s in SHAPES if s != shape]),
            ]
        ):
            qid = ann["image_id"] * 10 + k
            questions.append({"question_id": qid, "image_id": ann["image_id"], "question": question})
            answers = [answer] * 8 + [wrong[0]] * 2
            annotations.append(
                {"question_id": qid, "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(answers)]}
            )
    (root / "vqa_questions.json").write_text(json.dumps({"questions": questions}))
    (root / "vqa_annotations.json").write_text(json.dumps({"annotations": annotations}))
    return root / "vqa_questions.json", root / "vqa_annotations.json"


def vit_weights(path: Path, arch: str, seed: int = 1) -> Path:
    """A frozen-ViT weights file in LAVIS layout (as eva_vit_g.pth / clip_vit_L.pth are), for a tiny arch."""
    from qformer.config import VisionConfig
    from qformer.vision import build_vision_encoder, vision_state_dict

    torch.manual_seed(seed)
    encoder = build_vision_encoder(VisionConfig(arch=arch, image_size=28, precision="fp32"))
    torch.save(vision_state_dict(encoder, "lavis"), path)
    return path


def make_all(root: str | Path) -> Path:
    """Every tiny asset the configs in configs/tiny/ name, under `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tiny_bert_folder(root / "bert")
    tiny_opt_folder(root / "opt")
    tiny_t5_folder(root / "t5")
    vit_weights(root / "vit_tiny.pth", "tiny")
    vit_weights(root / "vit_tiny_vitl.pth", "tiny_vitl")
    caption_dataset(root / "data", n=24)
    tiny_llama_folder(root / "llama")
    vqa_dataset(root / "data")
    return root


if __name__ == "__main__":
    print(make_all(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny_assets"))
