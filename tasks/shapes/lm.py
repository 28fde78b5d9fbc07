"""The shapes world's language models (stage 0): a word-level tokenizer trained with `tokenizers`, and a tiny OPT and a
tiny T5 (Flan-T5 style) trained from scratch on text only, saved with `save_pretrained` and loaded frozen through
`qformer.stage2.load_llm` like OPT-2.7B / Flan-T5. See `tasks.shapes.stage0` for how they fit with the rest."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from tasks.shapes.vit import init_std
from tasks.shapes.world import read_corpus, vocabulary

logger = logging.getLogger(__name__)

__all__ = ["answer_prior", "evaluate_lm", "lm_tokenizer", "train_lm", "train_tokenizer"]

# ------------------------------------------------------------------------------------------------------ tokenizers

LM_SPECIALS = ["<pad>", "</s>", "<unk>"]
PAD_ID, EOS_ID = 0, 1
END_OF_TEXT = "\n"


def _lm_pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n|[?:.,]"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r" +"), behavior="removed"),
        ]
    )


def _corpus_texts(corpus: str | Path) -> list[str]:
    return [line for scene in read_corpus(corpus) for line in _scene_lines(scene)]


def _scene_lines(scene) -> list[str]:
    return [
        caption + "".join(f" Question: {q} Short answer: {a}" for q, a in qa) + END_OF_TEXT for caption, qa in scene
    ]


def train_tokenizer(corpus: str | Path, out_dir: str | Path) -> Path:
    """A word-level tokenizer trained with `tokenizers` on the corpus (plus the world's vocabulary, so no world word
    is unknown), "\\n" included as an ordinary token; saved as `out_dir/tokenizer.json`. Ids: <pad> 0, </s> 1,
    <unk> 2, then words by frequency. `lm_tokenizer(out_dir, "opt" | "t5")` wraps it for a language model."""
    from tokenizers import Tokenizer, models, trainers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = _lm_pre_tokenizer()
    trainer = trainers.WordLevelTrainer(special_tokens=LM_SPECIALS, min_frequency=1, show_progress=False)
    texts = _corpus_texts(corpus) + [" ".join(vocabulary()) + END_OF_TEXT]
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.token_to_id(END_OF_TEXT) is None or tok.token_to_id("</s>") != EOS_ID or tok.token_to_id("<pad>") != PAD_ID:
        raise RuntimeError(f"tokenizer trained on {corpus} lacks '\\n' or has unexpected special ids")
    tok.save(str(out_dir / "tokenizer.json"))
    return out_dir


def lm_tokenizer(tokenizer_dir: str | Path, kind: str):
    """The trained tokenizer as a `PreTrainedTokenizerFast`: "opt" prepends BOS "</s>", "t5" appends "</s>"."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    if kind not in ("opt", "t5"):
        raise ValueError(f"kind must be opt or t5, got {kind!r}")
    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    template = "</s> $A" if kind == "opt" else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("</s>", EOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="</s>", unk_token="<unk>"
    )


# ------------------------------------------------------------------------------------------------------ language models


class _Text:
    """Token ids of the corpus pieces, cached: captions and question prompts without special tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, list[int]] = {}
        self.end = tokenizer.convert_tokens_to_ids(END_OF_TEXT)

    def __call__(self, text: str) -> list[int]:
        ids = self.cache.get(text)
        if ids is None:
            ids = self.cache[text] = self.tokenizer(text, add_special_tokens=False).input_ids
        return ids

    @staticmethod
    def prompt(question: str) -> str:
        return f"Question: {question} Short answer:"


# Loss weights of OPT's training tokens: the answers carry the signal that matters (answers follow from the scene).
ANSWER_WEIGHT = 3.0
CONTEXT_WEIGHT = 0.5
MAX_QA = 3
# How often each OPT format is drawn (see `_opt_example`).
OPT_FORMS = (0.1, 0.3, 0.2, 0.4)  # question/answer blocks per OPT training sequence


def _scene_qa(scene) -> list[tuple[str, str]]:
    return list(dict.fromkeys(pair for _, qa in scene for pair in qa))


def _opt_example(text: _Text, scene, rng: random.Random) -> tuple[list[int], list[float]]:
    """One training sequence (ids, loss weights); BOS is `</s>` (id 1), C and C' captions of one scene:

    [BOS] C \\n                                      caption
    C [BOS] C' \\n                                   the scene before BOS, where stage 2 puts the soft prompt
    [BOS] C Question: q Short answer: a \\n [BOS] Question: q2 Short answer: a2 \\n ...
    C [BOS] Question: q Short answer: a \\n [BOS] Question: ...
    """
    caption, _ = rng.choice(scene)
    c = text(caption)
    qa = _scene_qa(scene)
    form = rng.choices(range(4), weights=OPT_FORMS)[0]
    if form >= 2 and not qa:
        form = 0
    if form == 0:
        ids = [EOS_ID] + c + [text.end]
        return ids, [1.0] * len(ids)
    if form == 1:
        other = c if rng.random() < 0.5 else text(rng.choice(scene)[0])
        ids = c + [EOS_ID] + other + [text.end]
        return ids, [CONTEXT_WEIGHT] * (len(c) + 1) + [1.0] * (len(other) + 1)
    ids = [EOS_ID] + c if form == 2 else c + [EOS_ID]
    weights = [CONTEXT_WEIGHT] * len(ids)
    for i, (q, a) in enumerate(rng.sample(qa, min(len(qa), rng.randint(1, MAX_QA)))):
        prompt = ([EOS_ID] if i else []) + text(_Text.prompt(q))
        answer = text(a) + [text.end]
        ids += prompt + answer
        weights += [CONTEXT_WEIGHT] * len(prompt) + [ANSWER_WEIGHT] * len(answer)
    return ids, weights


def _t5_example(text: _Text, scene, rng: random.Random) -> tuple[list[int], list[int]]:
    """(encoder ids, decoder target ids), both ending in `</s>`, in one of two formats, half of each:

    C Question: q Short answer: -> a
    C C'[:k] -> C'[k:]                    the scene before the text, where stage 2 puts the soft prompt; k uniform in
                                          [0, n/2] (k = 0: the whole caption from the scene alone)

    Every example has a scene before the text. A T5 also trained to continue captions with no scene (prefix LM alone,
    a quarter of the examples before) learns to fall back on the prefix: its continuation loss rose only from 0.83
    to 0.88 without the scene, stage 2 had almost nothing to learn from the image, and its soft prompt stayed
    image-blind (zero-shot VQA 0 points over the blind T5). Without that format the scene is worth 2 nats per token
    and stage 2 learns from it (see the README's shapes-demo section).
    """
    caption, qa = rng.choice(scene)
    if qa and rng.random() < 0.5:
        q, a = rng.choice(qa)
        return text(caption) + text(_Text.prompt(q)) + [EOS_ID], text(a) + [EOS_ID]
    words = rng.choice(scene)[0].split()
    k = rng.randint(0, max(1, len(words) // 2))
    return text(caption) + text(" ".join(words[:k])) + [EOS_ID], text(" ".join(words[k:])) + [EOS_ID]


def _pad(rows: list[list], value) -> Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def _lr_lambda(steps: int):
    warmup = max(1, steps // 10)
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))


def _train_loop(model, batch_fn, steps: int, lr: float, name: str, probe=None, probe_every: int = 0) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps))
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        loss = batch_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("%s step %d/%d loss %.4f", name, step, steps, loss.item())
        if probe is not None and probe_every and (step + 1) % probe_every == 0:
            model.eval()
            logger.info("%s step %d: %s", name, step + 1, probe())
            model.train()
    model.eval()
    return loss.item()


def _new_opt(vocab_size: int, hidden: int, layers: int, heads: int):
    """A tiny OPTForCausalLM, freshly initialised."""
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        ffn_dim=4 * hidden,
        num_attention_heads=heads,
        max_position_embeddings=128,
        word_embed_proj_dim=hidden,
        pad_token_id=PAD_ID,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        dropout=0.0,
        attention_dropout=0.0,
        # 0.02, the convention for 768+ wide models, leaves attention at this width nearly uniform for hundreds of
        # steps; at about 0.5 / sqrt(width) copying and lookup heads form within the first few hundred.
        init_std=init_std(hidden),
    )
    return OPTForCausalLM(cfg)


def _opt_loss(model, rows: list[tuple[list[int], list[float]]]) -> Tensor:
    """Next-token cross-entropy of `_opt_example` rows, weighted by their loss weights."""
    ids = _pad([r[0] for r in rows], PAD_ID)
    weights = _pad([r[1] for r in rows], 0.0)
    mask = (weights > 0).long()
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    losses = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    w = weights[:, 1:].flatten()
    return (losses * w).sum() / w.sum()


def _new_t5(vocab_size: int, hidden: int, layers: int, heads: int):
    """A tiny T5ForConditionalGeneration, freshly initialised, Flan-T5 style: gated-gelu, decoder outputs not
    rescaled (transformers 5 ties every T5's LM head to its embeddings whatever the config says)."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=hidden,
        d_kv=hidden // heads,
        d_ff=2 * hidden,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=heads,
        dropout_rate=0.0,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,  # read by transformers 5 as "do not rescale the decoder outputs" (T5 v1.1)
        relative_attention_num_buckets=16,
        relative_attention_max_distance=64,
    )
    model = T5ForConditionalGeneration(cfg)
    with torch.no_grad():  # the embeddings, which are also the LM head, come at std 1: first logits in the tens
        model.lm_head.weight.normal_(0.0, hidden**-0.5)
    return model


def _t5_loss(model, rows: list[tuple[list[int], list[int]]]) -> Tensor:
    """Cross-entropy of the decoder targets of `_t5_example` rows."""
    enc = _pad([r[0] for r in rows], PAD_ID)
    labels = _pad([r[1] for r in rows], -100)
    return model(input_ids=enc, attention_mask=(enc != PAD_ID).long(), labels=labels).loss


# Each kind's fresh model, training example and batch loss; the rest of training is the same for both.
_LMS = {"opt": (_new_opt, _opt_example, _opt_loss), "t5": (_new_t5, _t5_example, _t5_loss)}


def train_lm(
    kind: str,
    corpus: str | Path,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    steps: int = 1200,
    seed: int = 0,
    *,
    hidden: int = 128,
    layers: int = 3,
    heads: int = 4,
    batch_size: int = 64,
    lr: float = 2e-3,
    eval_corpus: str | Path | None = None,
    probe_every: int = 0,
) -> Path:
    """A tiny language model trained from scratch on the corpus, saved (model and tokenizer, `save_pretrained`) at
    `out_dir`: "opt" an OPTForCausalLM on captions and question/answer blocks (`_opt_example`), "t5" a Flan-T5 style
    T5ForConditionalGeneration on prefix-LM and question-answering targets (`_t5_example`).

    Writes `out_dir/shapes_eval.json`, with the held-out accuracies of `evaluate_lm` when `eval_corpus` is given.
    """
    t0 = time.time()
    tokenizer = lm_tokenizer(tokenizer_dir, kind)
    new_model, example, loss = _LMS[kind]
    text = _Text(tokenizer)
    scenes = read_corpus(corpus)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = new_model(len(tokenizer), hidden, layers, heads)

    def batch() -> Tensor:
        return loss(model, [example(text, rng.choice(scenes), rng) for _ in range(batch_size)])

    probe = (lambda: evaluate_lm(model, tokenizer, eval_corpus, limit=200, modes=PROBE_MODES)) if eval_corpus else None
    final_loss = _train_loop(model, batch, steps, lr, kind, probe, probe_every)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {"steps": steps, "hidden": hidden, "layers": layers, "loss": final_loss, "train_seconds": time.time() - t0}
    if eval_corpus:
        info.update(evaluate_lm(model, tokenizer, eval_corpus, prior_corpus=corpus))
    (out_dir / "shapes_eval.json").write_text(json.dumps(info, indent=1))
    return out_dir


@torch.no_grad()
def _greedy_matches(model, prompts: list[list[int]], answers: list[list[int]], end: int) -> list[bool]:
    """Whether greedy decoding after each prompt gives exactly its answer and then `end`: checked in one
    teacher-forced pass (the argmax at every answer position, given the answer so far, must be the next token)."""
    targets = [a + [end] for a in answers]
    if model.config.is_encoder_decoder:
        enc = _pad(prompts, PAD_ID)
        dec = _pad([[PAD_ID] + a for a in answers], PAD_ID)  # T5 starts decoding from <pad>
        logits = model(input_ids=enc, attention_mask=(enc != PAD_ID).long(), decoder_input_ids=dec).logits
        pred = logits.argmax(-1).tolist()
        return [row[: len(t)] == t for row, t in zip(pred, targets, strict=True)]
    rows = [p + a for p, a in zip(prompts, answers, strict=True)]
    ids = _pad(rows, PAD_ID)
    mask = _pad([[1] * len(r) for r in rows], 0)
    pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1).tolist()
    return [row[len(p) - 1 : len(p) - 1 + len(t)] == t for row, p, t in zip(pred, prompts, targets, strict=True)]


def _qa_items(corpus: str | Path, limit: int) -> list[tuple[str, str, str]]:
    """(caption, question, answer) from the first line of each scene of a corpus."""
    items = []
    for scene in read_corpus(corpus):
        caption, qa = scene[0]
        items.extend((caption, q, a) for q, a in qa)
    return items[:limit]


def answer_prior(corpus: str | Path) -> dict[str, str]:
    """The most common answer to each question wording in a corpus: the best a model can do from the text of the
    question alone (what a language model shown no caption should fall back on)."""
    from collections import Counter

    counts: dict[str, Counter] = {}
    for scene in read_corpus(corpus):
        for _, qa in scene:
            for q, a in qa:
                counts.setdefault(q, Counter())[a] += 1
    return {q: c.most_common(1)[0][0] for q, c in counts.items()}


@torch.no_grad()
def evaluate_lm(
    model,
    tokenizer,
    corpus: str | Path,
    limit: int = 400,
    batch_size: int = 100,
    modes: tuple[str, ...] | None = None,
    prior_corpus: str | Path | None = None,
) -> dict:
    """Text-only question answering on held-out scenes (greedy answer, exact match): "qa_caption" with the scene's
    caption before the question (OPT: after BOS; "qa_caption_before_bos": caption, BOS, question, the layout stage 2
    gives the soft prompt), "qa_no_caption" without it; "qa_<mode>_<type>" per question type. With `prior_corpus`,
    "qa_prior" is the accuracy of always giving the training corpus's most common answer to each question."""
    model.eval()
    text = _Text(tokenizer)
    is_t5 = bool(model.config.is_encoder_decoder)
    items = _qa_items(corpus, limit)
    end = EOS_ID if is_t5 else text.end

    def prompt_ids(caption: str | None, q: str, mode: str) -> list[int]:
        p = text(_Text.prompt(q))
        if is_t5:
            return (text(caption) if caption else []) + p + [EOS_ID]
        if mode == "caption_before_bos":
            return text(caption) + [EOS_ID] + p
        return [EOS_ID] + (text(caption) if caption else []) + p

    if modes is None:
        modes = ("caption", "no_caption") + (() if is_t5 else ("caption_before_bos",))
    metrics: dict = {}
    for mode in modes:
        oks = []
        for s in range(0, len(items), batch_size):
            chunk = items[s : s + batch_size]
            prompts = [prompt_ids(None if mode == "no_caption" else c, q, mode) for c, q, _ in chunk]
            oks += _greedy_matches(model, prompts, [text(a) for _, _, a in chunk], end)
        metrics.update(_accuracies(f"qa_{mode}", items, oks))
    if prior_corpus:
        prior = answer_prior(prior_corpus)
        metrics.update(_accuracies("qa_prior", items, [prior.get(q) == a for _, q, a in items]))
    metrics["qa_items"] = len(items)
    return metrics


def _accuracies(name: str, items, oks: list[bool]) -> dict[str, float]:
    out = {name: sum(oks) / max(1, len(oks))}
    by_type: dict[str, list[bool]] = {}
    for (_, q, _), ok in zip(items, oks, strict=True):
        by_type.setdefault(_question_type(q), []).append(ok)
    out.update({f"{name}_{t}": sum(v) / len(v) for t, v in sorted(by_type.items())})
    return out


PROBE_MODES = ("caption",)


def _question_type(question: str) -> str:
    if question.startswith("what colour"):
        return "colour"
    if question.startswith("what shape"):
        return "shape"
    if question.startswith("how many"):
        return "count"
    return "exists"
