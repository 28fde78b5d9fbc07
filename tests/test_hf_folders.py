"""Interop with transformers' BLIP-2 folders: ours -> folder -> transformers, and transformers' folder -> ours.

Every folder a test loads is written by the test (tiny OPT / T5 / ViT / Q-Former, random weights), and inputs come
from the exported `Blip2Processor`, the way a user of the folder would build them.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from torch.testing import assert_close
from transformers import (
    AutoConfig,
    BertTokenizer,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    PreTrainedTokenizerFast,
)
from transformers import Blip2Config as HFBlip2Config

from qformer.blip2 import Blip2Stage1
from qformer.caption import GenerationConfig
from qformer.config import Blip2Config, LLMConfig, VisionConfig
from qformer.convert import CheckpointError
from qformer.hf_folders import (
    CLIP_MEAN,
    CLIP_STD,
    ExportError,
    export_stage1,
    export_stage2,
    load_transformers_folder,
)
from qformer.stage2 import Blip2Stage2
from qformer.vision import build_vision_encoder, load_vision_weights, vision_state_dict
from tasks.stage2 import stage2_outputs
from tests.helpers import hf_blip2_config, hf_qformer_config, randomized, tiny_config
from tests.llm_helpers import EOS, IMAGE, SPECIALS, TINY_VISION, VOCAB, WORDS, tiny_opt_folder, tiny_t5_folder

CAPTIONS = ["a photo of the cat", "two red dog sitting on the grass", "a bird"]
PROMPTS = ["Question: what colour is the cat? Short answer:", "a photo of", "Question: how many dog are there?"]
T5_OUTPUTS = ["cat", "on the grass", "a small bird in the sky"]


def _images(n: int = 3, seed: int = 5) -> list[np.ndarray]:
    """Raw RGB images of another size than the model's, so the processor really resizes."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (37, 45, 3), dtype=np.uint8) for _ in range(n)]


def _tiny_stage2(llm_folder, seed: int = 0) -> Blip2Stage2:
    cfg = Blip2Config.preset("tiny")
    cfg = dataclasses.replace(
        cfg,
        qformer=cfg.qformer.replace(hidden_dropout=0.0, attention_dropout=0.0),
        ln_vision_eps=1e-6,  # the ViT's eps: transformers' post_layernorm can only use that one
        llm=LLMConfig(path=str(llm_folder), dtype="fp32"),
    )
    torch.manual_seed(seed)
    model = Blip2Stage2(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("llm."):
                p.normal_(0.0, 0.3)
    return model.eval()


def _load_hf(cls, folder):
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or misshapen key, no error message
    return model.eval()


@pytest.fixture(scope="module", params=["opt", "t5"])
def exported(request, tmp_path_factory):
    """(ours, transformers' model loaded from our export, its processor, kind, export result)."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"export_{kind}")
    llm = tiny_opt_folder(root / "llm") if kind == "opt" else tiny_t5_folder(root / "llm")
    ours = _tiny_stage2(llm)
    if kind == "t5":
        # Flan-T5 keeps its LM head apart from the input embeddings: make ours so (transformers 5's T5Config always
        # says tied, so the export must carry both tensors and the loader must not tie them).
        head = ours.llm.lm_head
        head.weight = torch.nn.Parameter(torch.randn_like(head.weight) * 0.5, requires_grad=False)
    result = export_stage2(ours, root / "blip2")
    theirs = _load_hf(Blip2ForConditionalGeneration, root / "blip2")
    processor = Blip2Processor.from_pretrained(root / "blip2")
    return ours, theirs, processor, kind, result


def test_export_stage2_folder_contents(exported):
    ours, theirs, processor, kind, result = exported
    folder = result.folder
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Blip2ForConditionalGeneration"]
    assert config["image_token_index"] == IMAGE == result.image_token_index  # the vocabulary's own <image> entry
    assert config["num_query_tokens"] == 4 and not config["qformer_config"]["use_qformer_text_input"]
    assert config["vision_config"]["layer_norm_eps"] == 1e-6 and config["vision_config"]["num_hidden_layers"] == 2
    assert result.left_out == [] and result.notes == []
    image_processor = processor.image_processor
    assert image_processor.size == {"height": 28, "width": 28} and image_processor.resample == 3  # bicubic
    assert_close(torch.tensor(image_processor.image_mean), torch.tensor(CLIP_MEAN))
    assert_close(torch.tensor(image_processor.image_std), torch.tensor(CLIP_STD))
    assert processor.num_query_tokens == 4
    assert processor.tokenizer.padding_side == ("left" if kind == "opt" else "right")
    if kind == "opt":  # generation ends at "\n", as ours does (and as Salesforce/blip2-opt-* folders say)
        assert config["text_config"]["eos_token_id"] == ours.end_token_id == VOCAB["\n"]
    else:  # the untied LM head came through as its own tensor
        assert not torch.equal(theirs.language_model.lm_head.weight, theirs.language_model.shared.weight)
        assert torch.equal(theirs.language_model.lm_head.weight, ours.llm.lm_head.weight)
    assert "<image>" not in ours.tokenizer.get_added_vocab()  # the model's own tokenizer was left alone


def test_export_stage2_same_logits_and_loss(exported):
    ours, theirs, processor, kind, _ = exported
    texts = [c + "\n" for c in CAPTIONS] if kind == "opt" else CAPTIONS
    enc = processor(images=_images(), text=texts, padding="longest", padding_side="right", return_tensors="pt")
    q = ours.cfg.qformer.num_query_tokens
    assert (enc.input_ids[:, :q] == IMAGE).all() and (enc.input_ids[:, q:] != IMAGE).all()
    with torch.no_grad():
        if kind == "opt":
            got = stage2_outputs(ours, CAPTIONS, images=enc.pixel_values)
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
            labels[:, :q] = -100
            expected = theirs(**enc, labels=labels)
        else:
            got = stage2_outputs(ours, CAPTIONS, images=enc.pixel_values, text_output=T5_OUTPUTS)
            out = processor.tokenizer(T5_OUTPUTS, padding="longest", return_tensors="pt")
            labels = out.input_ids.masked_fill(out.attention_mask == 0, -100)
            expected = theirs(**enc, labels=labels, decoder_attention_mask=out.attention_mask)
    assert_close(got["logits"], expected.logits, atol=1e-5, rtol=0)
    assert_close(got["loss"], expected.loss, atol=1e-5, rtol=0)
    assert got["logits"].std() > 0.1


@pytest.mark.parametrize("beams", [1, 3])
def test_export_stage2_same_generated_ids(exported, beams):
    ours, theirs, processor, kind, _ = exported
    enc = processor(images=_images(), text=PROMPTS, padding="longest", return_tensors="pt")
    q = ours.cfg.qformer.num_query_tokens
    assert (enc.input_ids[:, :q] == IMAGE).all()
    if kind == "opt":  # the exported tokenizer pads on the left: [image tokens; pads; prompt]
        assert (enc.attention_mask[:, -1] == 1).all() and (enc.attention_mask == 0).any()
    cfg = GenerationConfig(max_new_tokens=6, min_new_tokens=2, num_beams=beams, length_penalty=-1.0)
    got = ours.generate(PROMPTS, images=enc.pixel_values, cfg=cfg, return_ids=True)
    # No eos / pad ids passed: the folder's own settings must be the ones ours uses.
    expected = theirs.generate(
        **enc, max_new_tokens=6, min_new_tokens=2, num_beams=beams, length_penalty=-1.0, do_sample=False
    )
    if kind == "opt":
        expected = expected[:, enc.input_ids.shape[1] :]  # decoder-only: transformers returns the prompt too
    assert got.tolist() == expected.tolist()
    texts = ours.generate(PROMPTS, images=enc.pixel_values, cfg=cfg)
    assert texts == [t.strip() for t in processor.batch_decode(expected, skip_special_tokens=True)]
    assert len(set(texts)) > 1


def test_export_then_load_gives_ours_back(exported):
    ours, _, _, kind, result = exported
    back = load_transformers_folder(result.folder)
    assert isinstance(back, Blip2Stage2) and back.cfg.qformer == ours.cfg.qformer and back.cfg.vision == ours.cfg.vision
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(8))
    extra = {} if kind == "opt" else {"text_output": T5_OUTPUTS}
    with torch.no_grad():
        assert_close(
            stage2_outputs(back, CAPTIONS, images=pixels, **extra)["logits"],
            stage2_outputs(ours, CAPTIONS, images=pixels, **extra)["logits"],
        )
    if kind == "t5":  # the untied LM head stays untied
        assert torch.equal(back.llm.lm_head.weight, ours.llm.lm_head.weight)
        assert not torch.equal(back.llm.lm_head.weight, back.llm.shared.weight)
    cfg = GenerationConfig(max_new_tokens=5, min_new_tokens=1, num_beams=2)
    assert back.generate(PROMPTS, images=pixels, cfg=cfg) == ours.generate(PROMPTS, images=pixels, cfg=cfg)


def _folder_from_transformers(kind: str, root, *, max_shard_size="5GB"):
    """A BLIP-2 folder as `save_pretrained` writes it, every parameter re-randomised (query tokens included)."""
    llm = tiny_opt_folder(root / "llm") if kind == "opt" else tiny_t5_folder(root / "llm")
    hf_cfg = HFBlip2Config(
        vision_config=TINY_VISION,
        qformer_config=hf_qformer_config(tiny_config(), text=False).to_dict(),
        text_config=AutoConfig.from_pretrained(llm).to_dict(),
        num_query_tokens=4,
        image_token_index=IMAGE,
    )
    torch.manual_seed(1)
    hf = Blip2ForConditionalGeneration(hf_cfg)
    _rerandomize(hf)
    hf.save_pretrained(root / "blip2", max_shard_size=max_shard_size)
    PreTrainedTokenizerFast.from_pretrained(llm).save_pretrained(root / "blip2")
    return hf, root / "blip2"


def _rerandomize(hf: torch.nn.Module) -> None:
    """transformers inits query_tokens to zero and the ViT near 1e-10: draw everything again, keeping the k third of
    the packed vision q/k/v bias zero (EVA has no k bias)."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0.0, 0.3)
            if name.endswith("qkv.bias"):
                p.view(3, -1)[1].zero_()
    hf.eval()


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_transformers_stage2_folder_loads_into_ours(kind, tmp_path):
    # Small shards: the index file and several shards must be read.
    hf, folder = _folder_from_transformers(kind, tmp_path, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2
    ours = load_transformers_folder(folder)
    assert isinstance(ours, Blip2Stage2) and ours.cfg.ln_vision_eps == 1e-6 and ours.cfg.vision.arch == "tiny"
    assert torch.equal(ours.qformer.query_tokens, hf.query_tokens) and hf.query_tokens.abs().sum() > 0
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    q = ours.cfg.qformer.num_query_tokens
    tok = ours.tokenizer
    with torch.no_grad():
        if kind == "opt":
            got = stage2_outputs(ours, CAPTIONS, images=pixels)["logits"]
            enc = tok([c + "\n" for c in CAPTIONS], padding="longest", padding_side="right", return_tensors="pt")
            kwargs = {}
        else:
            got = stage2_outputs(ours, CAPTIONS, images=pixels, text_output=T5_OUTPUTS)["logits"]
            enc = tok(CAPTIONS, padding="longest", return_tensors="pt")
            out = tok(T5_OUTPUTS, padding="longest", return_tensors="pt")
            kwargs = dict(labels=out.input_ids, decoder_attention_mask=out.attention_mask)
        ids = torch.cat([torch.full((3, q), IMAGE), enc.input_ids], 1)
        mask = torch.cat([torch.ones(3, q, dtype=torch.long), enc.attention_mask], 1)
        expected = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, **kwargs).logits
    assert_close(got, expected, atol=1e-5, rtol=0)
    assert got.std() > 0.1


def test_transformers_stage2_folder_in_bf16(tmp_path):
    hf, folder = _folder_from_transformers("t5", tmp_path)
    ours = load_transformers_folder(folder, dtype="bf16")
    assert ours.llm_dtype == torch.bfloat16 and ours.visual.dtype == torch.bfloat16
    assert ours.qformer.query_tokens.dtype == torch.float32 and ours.llm_proj.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="fp16"):
        load_transformers_folder(folder, dtype="fp16")


# -- stage 1 ---------------------------------------------------------------------------------------------------------


def _bert_tokenizer(path) -> BertTokenizer:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS) - set("?:.,")) + list("?:.,")
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    return BertTokenizer(vocab_file=str(path / "vocab.txt"))


def _tiny_stage1() -> Blip2Stage1:
    cfg = Blip2Config.preset("tiny")
    cfg = dataclasses.replace(
        cfg, qformer=cfg.qformer.replace(hidden_dropout=0.0, attention_dropout=0.0), ln_vision_eps=1e-6
    )
    torch.manual_seed(0)
    return randomized(Blip2Stage1(cfg), std=0.3)


def _itc_itm(model: Blip2Stage1, pixels, ids, mask):
    with torch.no_grad():
        embeds = model.encode_image(pixels)
        sim = model.itc_similarity(model.image_features(embeds).feats, model.text_features(ids, mask).feat)
        return sim, model.itm_logits(embeds, ids, mask)


def _hf_itc_itm(hf, pixels, ids, mask):
    with torch.no_grad():
        itc = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
        itm = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    return itc.logits_per_image, itm.logits_per_image


def test_export_stage1_same_itc_and_itm(tmp_path):
    ours = _tiny_stage1()
    result = export_stage1(ours, tmp_path / "itm", tokenizer=_bert_tokenizer(tmp_path / "bert"))
    assert "temp" in result.left_out and any(k.startswith("qformer.lm_head.") for k in result.left_out)
    theirs = _load_hf(Blip2ForImageTextRetrieval, tmp_path / "itm")
    assert theirs.config.image_text_hidden_size == 16 and theirs.config.qformer_config.use_qformer_text_input
    processor = Blip2Processor.from_pretrained(tmp_path / "itm")
    enc = processor(images=_images(), text=CAPTIONS, padding="longest", return_tensors="pt")
    assert (enc.attention_mask == 0).any()  # padded rows: the masks matter
    sim, itm = _itc_itm(ours, enc.pixel_values, enc.input_ids, enc.attention_mask)
    hf_sim, hf_itm = _hf_itc_itm(theirs, enc.pixel_values, enc.input_ids, enc.attention_mask)
    assert sim.shape == (3, 3)
    assert_close(sim, hf_sim, atol=1e-5, rtol=0)
    assert_close(itm, hf_itm, atol=1e-5, rtol=0)
    assert sim.std() > 1e-3 and itm.std() > 1e-3


def test_transformers_retrieval_folder_loads_into_ours(tmp_path, caplog):
    qcfg = tiny_config()
    torch.manual_seed(2)
    hf = Blip2ForImageTextRetrieval(hf_blip2_config(qcfg))
    _rerandomize(hf)
    hf.save_pretrained(tmp_path / "itm")
    with caplog.at_level(logging.WARNING):
        ours = load_transformers_folder(tmp_path / "itm")
    assert isinstance(ours, Blip2Stage1) and ours.cfg.embed_dim == 16
    assert "no ITC temperature" in caplog.text
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    ids = torch.randint(5, qcfg.vocab_size, (3, 7), generator=torch.Generator().manual_seed(6))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    ids = ids.masked_fill(mask == 0, 0)
    sim, itm = _itc_itm(ours, pixels, ids, mask)
    hf_sim, hf_itm = _hf_itc_itm(hf, pixels, ids, mask)
    assert_close(sim, hf_sim, atol=1e-5, rtol=0)
    assert_close(itm, hf_itm, atol=1e-5, rtol=0)


# -- what cannot be exported or loaded -------------------------------------------------------------------------------


def _word_tokenizer_without_image(kind: str) -> PreTrainedTokenizerFast:
    """Like tests.llm_helpers.word_tokenizer, with the `<image>` entry renamed: the export has to add one."""
    vocab = {("<reserved>" if t == "<image>" else t): i for t, i in VOCAB.items()}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
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


def test_export_grows_the_embedding_rows_when_the_image_token_does_not_fit(tmp_path, caplog):
    llm = tiny_opt_folder(tmp_path / "llm")
    _word_tokenizer_without_image("opt").save_pretrained(llm)  # every one of the LLM's rows is a word
    ours = _tiny_stage2(llm)
    rows = ours.llm.get_input_embeddings().weight.shape[0]
    assert rows == len(VOCAB) == len(SPECIALS) + len(WORDS)
    with caplog.at_level(logging.WARNING):
        result = export_stage2(ours, tmp_path / "blip2")
    assert result.image_token_index == rows and "does not fit" in caplog.text and len(result.notes) == 1
    theirs = _load_hf(Blip2ForConditionalGeneration, tmp_path / "blip2")
    assert theirs.config.text_config.vocab_size == rows + 1
    embed = theirs.language_model.get_input_embeddings().weight
    assert torch.equal(embed[:rows], ours.llm.get_input_embeddings().weight) and not embed[rows:].any()
    processor = Blip2Processor.from_pretrained(tmp_path / "blip2")
    enc = processor(images=_images(), text=PROMPTS, padding="longest", return_tensors="pt")
    cfg = GenerationConfig(max_new_tokens=5, min_new_tokens=2, num_beams=2)
    got = ours.generate(PROMPTS, images=enc.pixel_values, cfg=cfg, return_ids=True)
    expected = theirs.generate(
        **enc, max_new_tokens=5, min_new_tokens=2, num_beams=2, do_sample=False, suppress_tokens=[rows]
    )
    assert got.tolist() == expected[:, enc.input_ids.shape[1] :].tolist()
    assert "<image>" not in ours.tokenizer.get_added_vocab() and len(ours.tokenizer) == rows


def test_export_at_another_image_size_resamples_the_position_embedding(tmp_path):
    ours = _tiny_stage2(tiny_opt_folder(tmp_path / "llm"))
    result = export_stage2(ours, tmp_path / "blip2", image_size=42)
    assert any("resampled from 2x2 to 3x3" in n for n in result.notes)
    theirs = _load_hf(Blip2ForConditionalGeneration, tmp_path / "blip2")
    assert theirs.config.vision_config.image_size == 42
    assert Blip2Processor.from_pretrained(tmp_path / "blip2").image_processor.size == {"height": 42, "width": 42}
    # The same resampling our own loader does when 28 px encoder weights go into a 42 px encoder.
    encoder = build_vision_encoder(VisionConfig(arch="tiny", image_size=42, precision="fp32"))
    load_vision_weights(encoder, vision_state_dict(ours.visual, "timm"), "timm")
    assert_close(theirs.vision_model.embeddings.position_embedding, encoder.model.pos_embed)
    back = load_transformers_folder(tmp_path / "blip2")
    assert back.cfg.vision.image_size == 42
    pixels = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert_close(back.soft_prompt(pixels), theirs.get_image_features(pixels).pooler_output, atol=1e-5, rtol=0)


def test_export_honours_vit_shape_overrides(tmp_path):
    """A ViT of the user's own shape (every VisionConfig *_override set, patch 8 at 32 px) goes out with that shape,
    and comes back, through transformers' class and through ours, with the same outputs."""
    overrides = dict(width_override=32, depth_override=3, heads_override=2, mlp_override=64, patch_size_override=8)
    vision = VisionConfig(arch="tiny", image_size=32, precision="fp32", **overrides)
    tiny = _tiny_stage1().cfg
    cfg = dataclasses.replace(tiny, vision=vision, qformer=tiny.qformer.replace(encoder_width=32))
    torch.manual_seed(3)
    ours = randomized(Blip2Stage1(cfg), std=0.3)
    export_stage1(ours, tmp_path / "itm")
    vision_config = json.loads((tmp_path / "itm" / "config.json").read_text())["vision_config"]
    shape = {k: vision_config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")}
    assert shape == {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2}
    assert (vision_config["intermediate_size"], vision_config["patch_size"], vision_config["image_size"]) == (64, 8, 32)
    theirs = _load_hf(Blip2ForImageTextRetrieval, tmp_path / "itm")
    back = load_transformers_folder(tmp_path / "itm")
    assert back.cfg.vision == ours.cfg.vision and back.cfg.qformer == ours.cfg.qformer
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    ids = torch.randint(5, cfg.qformer.vocab_size, (3, 7), generator=torch.Generator().manual_seed(6))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    sim, itm = _itc_itm(ours, pixels, ids, mask)
    with torch.no_grad():  # 16 patches + the class token, 32 wide
        assert theirs.vision_model(pixels).last_hidden_state.shape == (3, 17, 32)
    for model in (theirs, back):
        other_sim, other_itm = (_hf_itc_itm if model is theirs else _itc_itm)(model, pixels, ids, mask)
        assert_close(other_sim, sim, atol=1e-5, rtol=0)
        assert_close(other_itm, itm, atol=1e-5, rtol=0)
    assert sim.std() > 1e-3 and itm.std() > 1e-3
    config = json.loads((tmp_path / "itm" / "config.json").read_text())
    config["vision_config"]["qformer_arch"] = "tiny_vitl"  # the arch the overrides apply to must be EVA-style
    (tmp_path / "itm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="qformer_arch 'tiny_vitl' is not an EVA-family encoder"):
        load_transformers_folder(tmp_path / "itm")


def test_clip_family_encoder_cannot_be_exported(tmp_path):
    cfg = Blip2Config.preset("tiny_vitl")
    with pytest.raises(ExportError, match="tiny_vitl.*clip family.*Blip2VisionModel"):
        export_stage1(Blip2Stage1(cfg), tmp_path / "vitl")
    with pytest.raises(ExportError, match="without an image encoder"):
        export_stage1(Blip2Stage1(Blip2Config.preset("tiny"), build_visual=False), tmp_path / "none")


def test_folder_errors_name_the_problem(tmp_path):
    hf, folder = _folder_from_transformers("opt", tmp_path)
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*no such folder"):
        load_transformers_folder(missing)

    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # a download cut short
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_transformers_folder(folder)
    weights.write_bytes(data[:6])  # not even a header
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_transformers_folder(folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_transformers_folder(folder)

    opt = tmp_path / "llm"  # an OPT folder is not a BLIP-2 folder
    with pytest.raises(CheckpointError, match="model_type is 'opt'"):
        load_transformers_folder(opt)

    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["hidden_size"] = 64
    config["vision_config"]["intermediate_size"] = 256
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"width 64, depth 2, heads 4, MLP 256.*ArchSpec\(\"eva\", 64"):
        load_transformers_folder(folder)


def test_sharded_folder_with_a_missing_shard(tmp_path):
    _, folder = _folder_from_transformers("t5", tmp_path, max_shard_size="40KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=shards[1].name):
        load_transformers_folder(folder)


def test_cli_converts_a_transformers_folder_to_ours_and_back(tmp_path):
    """`qformer convert --from transformers`: the LLM has no folder of its own, so ours keeps a copy beside it."""
    from qformer.checkpoint import load_pretrained
    from tasks.cli import main as cli

    hf, folder = _folder_from_transformers("opt", tmp_path)
    assert cli(["convert", str(folder), str(tmp_path / "ours"), "--from", "transformers"]) == 0
    assert (tmp_path / "ours" / "llm" / "config.json").is_file()
    ours = load_pretrained(tmp_path / "ours")
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    q = ours.cfg.qformer.num_query_tokens
    enc = ours.tokenizer([c + "\n" for c in CAPTIONS[:2]], padding="longest", padding_side="right", return_tensors="pt")
    with torch.no_grad():
        got = stage2_outputs(ours, CAPTIONS[:2], images=pixels)["logits"]
        ids = torch.cat([torch.full((2, q), IMAGE), enc.input_ids], 1)
        mask = torch.cat([torch.ones(2, q, dtype=torch.long), enc.attention_mask], 1)
        expected = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
    assert_close(got, expected, atol=1e-5, rtol=0)
    # and back out to a transformers folder
    assert (
        cli(["convert", str(tmp_path / "ours"), str(tmp_path / "again"), "--from", "ours", "--to", "transformers"]) == 0
    )
    again = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert_close(again(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=0)
