"""Image encoders: parity with transformers and with an OpenAI-layout CLIP, strict loading, freezing, precision."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.testing import assert_close
from transformers import Blip2VisionConfig, Blip2VisionModel

from qformer.config import VisionConfig
from qformer.convert import CheckpointError
from qformer.vision import (
    ARCHS,
    build_vision_encoder,
    load_vision_weights,
    vision_state_dict,
    vision_width,
)


def randomize(module: nn.Module, std: float = 0.3) -> nn.Module:
    """Every parameter (norms and biases too) away from its init value, so a mis-mapped one cannot hide."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def tiny(arch: str = "tiny", **changes) -> VisionConfig:
    return VisionConfig(**{"arch": arch, "image_size": 28, "precision": "fp32", **changes})


def random_encoder(arch: str = "tiny", **changes):
    return randomize(build_vision_encoder(tiny(arch, **changes)))


def images(n: int = 2, size: int = 28) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))


def hf_tiny_vision() -> Blip2VisionModel:
    """transformers' BLIP-2 vision tower shaped like the "tiny" arch, every weight re-randomised (k bias kept 0)."""
    spec = ARCHS["tiny"]
    config = Blip2VisionConfig(
        hidden_size=spec.width,
        intermediate_size=spec.mlp_hidden,
        num_hidden_layers=spec.depth,
        num_attention_heads=spec.num_heads,
        image_size=28,
        patch_size=spec.patch_size,
        qkv_bias=True,
        layer_norm_eps=spec.norm_eps,
    )
    model = randomize(Blip2VisionModel(config))
    with torch.no_grad():
        for layer in model.encoder.layers:
            layer.self_attn.qkv.bias[spec.width : 2 * spec.width] = 0  # EVA has no k bias
    return model.eval()


# --- an independent OpenAI-layout CLIP ViT (the layout of LAVIS's clip_vit_L.pth), written for this test ---


class _OpenAIBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.Identity(), c_proj=nn.Linear(4 * width, width))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, B, D] as in OpenAI's code
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))  # QuickGELU


class _OpenAIClipViT(nn.Module):
    """OpenAI CLIP's visual tower: the file holds `blocks` blocks, `ln_post` and `proj`; LAVIS runs `used` blocks."""

    def __init__(self, width: int, heads: int, blocks: int, used: int, patch: int = 14, grid: int = 2) -> None:
        super().__init__()
        self.used = used
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[_OpenAIBlock(width, heads) for _ in range(blocks)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = x.transpose(0, 1)
        for block in self.transformer.resblocks[: self.used]:
            x = block(x)
        return x.transpose(0, 1)  # no ln_post: BLIP-2 uses every token before it


# --- 1. parity with transformers ---


@pytest.mark.parametrize("prefix", ["", "vision_model."])
def test_eva_matches_transformers_blip2_vision_model(prefix):
    hf = hf_tiny_vision()
    state = {prefix + k: v for k, v in hf.state_dict().items()}
    encoder = build_vision_encoder(tiny())
    dropped = load_vision_weights(encoder, state)  # layout and prefix detected from the names
    # post_layernorm is BLIP-2's ln_vision: the caller's, named rather than silently swallowed.
    assert sorted(dropped) == [f"{prefix}post_layernorm.bias", f"{prefix}post_layernorm.weight"]
    x = images()
    with torch.no_grad():
        expected = hf(pixel_values=x).last_hidden_state
        ours = encoder(x)
        assert ours.shape == (2, encoder.num_tokens(), 48) == (2, 5, 48)
        assert_close(hf.post_layernorm(ours), expected, atol=1e-5, rtol=1e-5)


def test_transformers_folder_with_whole_model_keys(tmp_path):
    hf = hf_tiny_vision()
    state = {f"vision_model.{k}": v.contiguous() for k, v in hf.state_dict().items()}
    state["qformer.layernorm.weight"] = torch.ones(4)  # another module's key: outside the prefix, ignored
    save_file(state, tmp_path / "model.safetensors")
    encoder = build_vision_encoder(tiny(weights=str(tmp_path)))
    x = images()
    with torch.no_grad():
        assert_close(hf.post_layernorm(encoder(x)), hf(pixel_values=x).last_hidden_state, atol=1e-5, rtol=1e-5)


# --- 2. LAVIS-layout files ---


def eva_lavis_state(source) -> dict[str, torch.Tensor]:
    """What LAVIS's eva_vit_g.pth looks like for `source`: timm's Eva names plus one more block than LAVIS builds."""
    state = dict(source.model.state_dict())
    extra = source.depth
    for key, value in list(state.items()):
        if key.startswith(f"blocks.{extra - 1}."):
            state[key.replace(f"blocks.{extra - 1}.", f"blocks.{extra}.")] = torch.randn_like(value)
    return state


@pytest.mark.parametrize("wrapped", [False, True])
def test_lavis_eva_file_loads_strictly_and_drops_the_last_block(tmp_path, wrapped):
    source = random_encoder()
    state = eva_lavis_state(source)
    path = tmp_path / "eva_vit_g.pth"
    torch.save({"model": state} if wrapped else state, path)

    encoder = build_vision_encoder(tiny())
    dropped = load_vision_weights(encoder, path)
    assert dropped and all(k.startswith("blocks.2.") for k in dropped)
    assert len(dropped) == sum(k.startswith("blocks.1.") for k in state)
    x = images()
    assert_close(encoder(x), source(x), atol=0, rtol=0)
    # the same through the config, as training code builds it
    assert_close(build_vision_encoder(tiny(weights=str(path)))(x), source(x), atol=0, rtol=0)


def test_openai_layout_clip_file_matches_reference(tmp_path):
    spec = ARCHS["tiny_vitl"]
    reference = randomize(_OpenAIClipViT(spec.width, spec.num_heads, blocks=spec.file_depth, used=spec.depth)).eval()
    path = tmp_path / "clip_vit_L.pth"
    torch.save(reference.state_dict(), path)

    encoder = build_vision_encoder(tiny("tiny_vitl", weights=str(path)))
    dropped = load_vision_weights(build_vision_encoder(tiny("tiny_vitl")), path)
    assert {"ln_post.weight", "ln_post.bias", "proj"} <= set(dropped)
    assert {k for k in dropped if k.startswith("transformer.")} == {
        k for k in reference.state_dict() if k.startswith(f"transformer.resblocks.{spec.depth}.")
    }
    x = images()
    with torch.no_grad():
        assert_close(encoder(x), reference(x), atol=1e-5, rtol=1e-5)


def test_bad_checkpoints_are_named_and_nothing_loads(tmp_path):
    state = eva_lavis_state(random_encoder())
    del state["blocks.0.mlp.fc2.bias"]
    state["blocks.1.attn.q_bias"] = torch.zeros(7)
    state["blocks.0.attn.rotary.weight"] = torch.zeros(3)
    state["blocks.3.norm1.weight"] = torch.zeros(48)  # a block beyond the one LAVIS drops is not ours to drop
    encoder = build_vision_encoder(tiny())
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_vision_weights(encoder, path)
    message = str(err.value)
    assert str(path) in message
    assert "missing keys (1): blocks.0.mlp.fc2.bias" in message
    assert "blocks.1.attn.q_bias: checkpoint (7,) vs model (48,)" in message
    assert "blocks.0.attn.rotary.weight" in message and "blocks.3.norm1.weight" in message
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed although loading failed"


def test_unknown_names_in_other_layouts_are_named():
    hf = {f"vision_model.{k}": v for k, v in hf_tiny_vision().state_dict().items()}
    hf["vision_model.encoder.layers.0.self_attn.rotary"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"vision_model\.encoder\.layers\.0\.self_attn\.rotary"):
        load_vision_weights(build_vision_encoder(tiny()), hf)
    # CLIP has no transformers layout
    with pytest.raises(CheckpointError, match="transformers format has no layout for a clip"):
        load_vision_weights(build_vision_encoder(tiny("tiny_vitl")), hf)


def test_truncated_file_names_the_file(tmp_path):
    path = tmp_path / "eva_vit_g.pth"
    torch.save(eva_lavis_state(random_encoder()), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="eva_vit_g.pth"):
        load_vision_weights(build_vision_encoder(tiny()), path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_vision_weights(build_vision_encoder(tiny()), tmp_path / "missing.pth")


# --- 3. round trips ---


@pytest.mark.parametrize(
    "arch,fmt", [("tiny", "timm"), ("tiny", "transformers"), ("tiny_vitl", "timm"), ("tiny_vitl", "lavis")]
)
def test_round_trip_is_exact(arch, fmt):
    source = random_encoder(arch)
    exported = vision_state_dict(source, fmt)
    target = build_vision_encoder(tiny(arch))
    assert load_vision_weights(target, exported, fmt=fmt) == []
    for key, value in source.model.state_dict().items():
        assert torch.equal(target.model.state_dict()[key], value), key


def test_transformers_export_packs_q_zero_v_and_loads_into_transformers():
    source = random_encoder()
    exported = vision_state_dict(source, "transformers", prefix="vision_model.")
    for i, block in enumerate(source.model.blocks):
        packed = exported[f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"]
        assert torch.equal(packed, torch.cat([block.attn.q_bias, torch.zeros(48), block.attn.v_bias]))
    hf = hf_tiny_vision()
    own = {k[len("vision_model.") :]: v for k, v in exported.items()}
    missing, unexpected = hf.load_state_dict(own, strict=False)
    assert sorted(missing) == ["post_layernorm.bias", "post_layernorm.weight"] and not unexpected
    x = images()
    with torch.no_grad():
        assert_close(hf.post_layernorm(source(x)), hf(pixel_values=x).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_nonzero_k_bias_is_refused_naming_the_key():
    state = hf_tiny_vision().state_dict()
    with torch.no_grad():
        state["encoder.layers.1.self_attn.qkv.bias"][60] = 0.5
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.1\.self_attn\.qkv\.bias.*k third"):
        load_vision_weights(build_vision_encoder(tiny()), state)


# --- 4. freezing and precision ---


def test_frozen_encoder_needs_no_grad_and_stays_in_eval():
    encoder = random_encoder(drop_path_rate=0.5)
    assert encoder.frozen and not encoder.training
    assert all(not p.requires_grad for p in encoder.parameters())
    parent = nn.ModuleDict(dict(visual=encoder, head=nn.Linear(2, 2))).train()
    assert parent.head.training and not any(m.training for m in encoder.modules())
    x = images().requires_grad_(True)
    out_train = encoder(x)
    assert not out_train.requires_grad
    assert_close(out_train, encoder.eval()(x), atol=0, rtol=0)

    # the control: the same encoder unfrozen does drop paths in training mode
    trainable = build_vision_encoder(tiny(frozen=False, drop_path_rate=0.5, grad_checkpointing=True))
    trainable.load_state_dict(encoder.state_dict())
    assert trainable.model.grad_checkpointing
    assert not torch.equal(trainable.train()(x), trainable.eval()(x))
    trainable.train()(x).sum().backward()
    assert all(p.grad is not None for p in trainable.parameters())


def test_bf16_weights_inputs_and_outputs():
    encoder = build_vision_encoder(tiny(precision="bf16"))
    assert all(p.dtype == torch.bfloat16 for p in encoder.parameters())
    assert encoder(images()).dtype == torch.bfloat16


# --- 5. position-embedding resampling ---


@pytest.mark.parametrize("arch", ["tiny", "tiny_vitl"])
def test_pos_embed_is_resampled_for_a_larger_image(arch):
    source = random_encoder(arch)
    state = vision_state_dict(source, "timm")
    old = state["pos_embed"]  # [1, 1 + 2*2, E]

    same = build_vision_encoder(tiny(arch))
    load_vision_weights(same, state)
    assert torch.equal(same.model.pos_embed, old)  # same grid: untouched

    big = build_vision_encoder(tiny(arch, image_size=42))
    load_vision_weights(big, state)
    assert big.num_tokens() == 10 and big(images(size=42)).shape == (2, 10, source.width)
    new = big.model.pos_embed.detach()
    assert torch.equal(new[:, :1], old[:, :1])  # class-token slot kept
    grid = old[:, 1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
    # LAVIS resamples EVA with align_corners=False and CLIP with align_corners=True (both bicubic, no antialias).
    expected = F.interpolate(grid, size=(3, 3), mode="bicubic", align_corners=arch == "tiny_vitl")
    assert_close(new[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 9, -1), atol=1e-6, rtol=1e-6)


# --- 6. the real architectures, shapes only ---


def test_real_architectures_on_meta_device():
    counts = {}
    for arch, width, blocks in [("eva_vit_g", 1408, 39), ("clip_vit_l", 1024, 23)]:
        with torch.device("meta"):
            encoder = build_vision_encoder(VisionConfig(arch=arch))
        assert encoder.width == width == vision_width(VisionConfig(arch=arch))
        assert encoder.depth == blocks and encoder.num_tokens() == 257
        assert encoder.model.blocks[0].mlp.fc1.out_features == {1408: 6144, 1024: 4096}[width]
        assert next(encoder.parameters()).dtype == torch.float16 and encoder.frozen
        counts[arch] = sum(p.numel() for p in encoder.parameters())
    print(f"parameter counts: {counts}")
    assert counts == {"eva_vit_g": 985_894_528, "clip_vit_l": 290_581_504}
    with torch.device("meta"):
        big = build_vision_encoder(VisionConfig(arch="eva_vit_g", image_size=364))
    assert big.num_tokens() == 26 * 26 + 1
    assert vision_width(VisionConfig(arch="timm:vit_small_patch16_224")) == 384


def test_timm_model_without_final_norm_and_its_state_dict():
    import timm

    cfg = VisionConfig(arch="timm:test_vit", image_size=32, precision="fp32")
    encoder = build_vision_encoder(cfg)
    assert isinstance(encoder.model.norm, nn.Identity) and encoder.num_tokens() == 5
    full = randomize(timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3))
    dropped = load_vision_weights(encoder, full.state_dict())
    assert sorted(dropped) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    full.norm = nn.Identity()  # the timm model's tokens before its final norm
    x = images(size=32)
    with torch.no_grad():
        assert_close(encoder(x), full.forward_features(x), atol=0, rtol=0)


def test_shape_overrides_build_a_small_vit_of_your_own(tmp_path):
    """A small EVA-style ViT by shape (e.g. 64 px, patch 8, width 96, depth 4), through the same code path."""
    from qformer.config import Blip2Config, QFormerConfig

    cfg = VisionConfig(
        arch="tiny",
        image_size=64,
        precision="fp32",
        width_override=96,
        depth_override=4,
        heads_override=4,
        mlp_override=192,
        patch_size_override=8,
    )
    encoder = build_vision_encoder(cfg)
    assert (encoder.width, encoder.depth, encoder.num_tokens()) == (96, 4, 65) and vision_width(cfg) == 96
    out = encoder(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 65, 96)
    path = tmp_path / "vit.pth"
    torch.save(encoder.model.state_dict(), path)  # a timm state dict
    again = build_vision_encoder(dataclasses.replace(cfg, weights=str(path)))
    torch.testing.assert_close(again(torch.ones(1, 3, 64, 64)), encoder(torch.ones(1, 3, 64, 64)))
    with pytest.raises(ValueError, match="encoder_width"):
        Blip2Config(vision=cfg, qformer=QFormerConfig.preset("tiny"))  # 48 wide: does not fit 96
