"""The FLOPs model (qformer/flops.py) against torch's FlopCounterMode on tiny configs.

CPU SDPA kernels are not counted by FlopCounterMode, so every count runs with the math backend, which decomposes
attention into the bmm calls the counter sees (the same 2 * L * S * D per attention as the CUDA kernels' formula).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from qformer.blip2 import Blip2Stage1
from qformer.config import Blip2Config, LLMConfig, VisionConfig
from qformer.flops import (
    llm_forward_flops,
    llm_shape,
    qformer_itg_flops,
    qformer_itm_flops,
    qformer_query_flops,
    qformer_text_flops,
    stage1_shares_image_kv,
    stage1_train_flops,
    stage2_train_flops,
    vision_forward_flops,
    vision_tokens,
    vit_forward_flops,
)
from qformer.qformer import QFormer
from qformer.vision import build_vision_encoder
from tasks.stage1 import stage1_losses
from tasks.tiny_assets import tiny_llama_folder
from tests.helpers import tiny_config
from tests.llm_helpers import tiny_opt_folder, tiny_t5_folder

B, T, N = 3, 5, 7


def counted(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_eva_vit_g_matches_the_published_count():
    eva = dict(width=1408, mlp_hidden=6144, patch_size=14, image_size=224)
    # timm: eva_giant_patch14_224 (40 blocks) 267.2 GMACs; ours leaves out the 1000-class head and the norms.
    assert vit_forward_flops(depth=40, **eva) / 2 == pytest.approx(267.2e9, rel=2e-3)
    assert vision_forward_flops(VisionConfig()) == vit_forward_flops(depth=39, **eva)
    assert vision_forward_flops(VisionConfig()) == pytest.approx(521e9, rel=1e-3)


@pytest.mark.parametrize(
    "vision",
    [
        VisionConfig(arch="tiny", image_size=28, precision="fp32"),
        VisionConfig(arch="tiny_vitl", image_size=42, precision="fp32"),
        VisionConfig(arch="timm:vit_tiny_patch16_224", image_size=32, precision="fp32"),
    ],
    ids=lambda v: v.arch,
)
def test_vit_forward_equals_the_counter(vision):
    encoder = build_vision_encoder(vision)
    images = torch.randn(2, 3, vision.image_size, vision.image_size)
    assert counted(lambda: encoder(images)) == 2 * vision_forward_flops(vision)
    assert vision_tokens(vision) == encoder.num_tokens()


@pytest.mark.parametrize("impl", ["direct", "absorbed", "auto"])
def test_qformer_passes_equal_the_counter(impl):
    cfg = tiny_config(cross_attention_impl=impl)
    # Frozen rather than under no_grad: FlopCounterMode's module hooks fail on parameters under no_grad.
    model = QFormer(cfg).eval().requires_grad_(False)
    image = torch.randn(B, N, cfg.encoder_width)
    ids = torch.randint(1, cfg.vocab_size, (B, T))
    assert counted(lambda: model(image_embeds=image)) == B * qformer_query_flops(cfg, N)
    assert counted(lambda: model(ids)) == B * qformer_text_flops(cfg, T)
    assert counted(lambda: model(ids, image_embeds=image)) == B * qformer_itm_flops(cfg, T, N)
    cache = model(image_embeds=image, use_cache=True).cache
    assert counted(lambda: model.lm_logits(model.decode(ids, cache).hidden)) == B * qformer_itg_flops(cfg, T)
    # Trainable: backward forms input and weight gradients, 2x forward.
    model.requires_grad_(True)
    image.requires_grad_(True)
    assert counted(lambda: model(image_embeds=image).hidden.sum().backward()) == 3 * B * qformer_query_flops(cfg, N)


@pytest.mark.parametrize("gather", ["faithful", "connected"])
@pytest.mark.parametrize("impl", ["auto", "absorbed"])  # auto: the step shares the image keys/values; absorbed: not
def test_stage1_step_equals_the_counter(gather, impl):
    cfg = dataclasses.replace(Blip2Config.preset("tiny"), itc_gather=gather)
    cfg = dataclasses.replace(cfg, qformer=cfg.qformer.replace(cross_attention_impl=impl))
    assert stage1_shares_image_kv(cfg.qformer, 5) == (impl == "auto")
    model = Blip2Stage1(cfg, build_visual=False).train()
    n = 5  # what a 28 px tiny ViT gives: 2 x 2 patches + the class token
    tokens = torch.randn(B, n, cfg.qformer.encoder_width)
    ids = torch.randint(2, cfg.qformer.vocab_size - 1, (B, T))
    mask = torch.ones_like(ids)

    def step():
        losses = stage1_losses(model, ids, mask, image_tokens=tokens, bos_token_id=cfg.qformer.vocab_size - 1)
        losses["loss"].backward()

    expected = stage1_train_flops(cfg, T, global_batch=B)
    assert counted(step) == B * (expected.total - expected.parts["vit"])


def _llm(kind, tmp_path):
    folder = {"opt": tiny_opt_folder, "llama": tiny_llama_folder, "t5": tiny_t5_folder}[kind](tmp_path / kind)
    auto = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
    return folder, auto.from_pretrained(folder).eval()


@pytest.mark.parametrize("kind", ["opt", "llama", "t5"])
def test_llm_forward_equals_the_counter(kind, tmp_path):
    _, llm = _llm(kind, tmp_path)
    llm.requires_grad_(False)
    shape = llm_shape(llm.config)
    embeds = torch.randn(2, 9, shape.hidden)
    if kind == "t5":
        dec = torch.zeros(2, 4, dtype=torch.long)
        assert counted(lambda: llm(inputs_embeds=embeds, decoder_input_ids=dec)) == 2 * llm_forward_flops(shape, 9, 4)
    else:
        assert counted(lambda: llm(inputs_embeds=embeds)) == 2 * llm_forward_flops(shape, 9)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_stage2_step_follows_the_convention(kind, tmp_path):
    """The Q-Former side is exact (3x forward); the frozen LLM's measured forward + backward is close to the 2x
    forward convention (attention backward forms both operands' gradients: more; layers before anything that needs
    a gradient form none: less)."""
    from qformer.stage2 import Blip2Stage2

    folder, _ = _llm(kind, tmp_path)
    cfg = dataclasses.replace(Blip2Config.preset("tiny"), llm=LLMConfig(path=str(folder), dtype="fp32"))
    model = Blip2Stage2(cfg, build_visual=False).train()
    n = 5
    tokens = torch.randn(B, n, cfg.qformer.encoder_width)
    ids = torch.randint(5, 20, (B, T))
    extra = {"decoder_input_ids": torch.randint(5, 20, (B, 4))} if kind == "t5" else {}
    total = counted(lambda: model(ids, torch.ones_like(ids), image_tokens=tokens, **extra).sum().backward())
    # The LLM alone, on a soft prompt that needs a gradient (FlopCounterMode's per-module split misplaces backward).
    prompt = torch.randn(B, cfg.qformer.num_query_tokens, model.llm.get_input_embeddings().embedding_dim)
    embeds = torch.cat([prompt.requires_grad_(True), model._embed(ids)], dim=1)
    llm_measured = counted(lambda: model.llm(inputs_embeds=embeds, **extra).logits.sum().backward())
    expected = stage2_train_flops(model.cfg, llm_shape(model.llm.config), T, decoder_text=4 if extra else 0)
    assert total - llm_measured == B * (expected.parts["qformer"])
    ratio = llm_measured / (B * expected.parts["llm"])
    assert 0.8 < ratio < 1.3, ratio


# -- the training log ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("peak", [None, 2.5])
def test_training_log_has_throughput_fields(tmp_path, peak):
    """samples_per_s (per rank), samples_per_s_total, tflops_per_s; mfu only with a known peak: never on a CPU
    unless `peak_tflops` is set."""
    import math

    from tasks.config import load_config
    from tasks.train import train
    from tests.train_helpers import caption_dataset, read_log, tiny_bert_folder, tiny_stage1_config, write_config

    cfg = tiny_stage1_config(
        tmp_path, caption_dataset(tmp_path / "data", n=8), tmp_path / "run", tiny_bert_folder(tmp_path / "bert")
    )
    cfg["optim"]["total_steps"] = 2
    cfg["save_every"] = 100
    if peak is not None:
        cfg["peak_tflops"] = peak
    train(load_config(write_config(tmp_path / "run.yaml", **cfg)))
    for record in read_log(tmp_path / "run"):
        fields = ["samples_per_s", "samples_per_s_total", "tflops_per_s"] + (["mfu"] if peak else [])
        for key in fields:
            assert math.isfinite(record[key]) and record[key] > 0, (key, record)
        assert record["samples_per_s_total"] == record["samples_per_s"]  # world size 1
        assert ("mfu" in record) == (peak is not None)
        if peak:
            assert record["mfu"] == pytest.approx(record["tflops_per_s"] / peak)


def test_peak_tflops_must_be_positive(tmp_path):
    from tasks.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="peak_tflops"):
        load_config(None, ["output_dir=x", "peak_tflops=-1"])
    assert load_config(None, ["output_dir=x", "peak_tflops=989"]).peak_tflops == 989.0


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
    ]
    + [("NVIDIA GeForce RTX 4090", None)],
)
def test_peak_table_matches_device_names(monkeypatch, name, peak):
    from tasks.throughput import device_peak_tflops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert device_peak_tflops(torch.device("cuda", 0)) == peak
    assert device_peak_tflops(torch.device("cuda", 0), 123.0) == 123.0  # the config's peak_tflops wins
    assert device_peak_tflops(torch.device("cpu")) is None
