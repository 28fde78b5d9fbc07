"""The absorbed cross-attention is the same math as the direct one: outputs and gradients, in train mode too."""

import pytest
import torch
from torch.testing import assert_close

from qformer import QFormer, QFormerConfig
from qformer.dropout import keep_mask
from qformer.qformer import Attention, _heads_matmul


def _pair(**changes):
    cfg = QFormerConfig.preset("tiny", **changes)
    direct = Attention(cfg.replace(cross_attention_impl="direct"), cfg.encoder_width)
    with torch.no_grad():
        for p in direct.parameters():
            p.normal_(0.0, 0.5)
    absorbed = Attention(cfg.replace(cross_attention_impl="absorbed"), cfg.encoder_width)
    absorbed.load_state_dict(direct.state_dict())
    return direct, absorbed


def test_outputs_and_gradients_agree():
    direct, absorbed = _pair(attention_dropout=0.0, hidden_dropout=0.0)
    x = torch.randn(3, 4, 32)
    image = torch.randn(3, 9, 48)
    mask = torch.zeros(3, 1, 1, 9).masked_fill_(torch.arange(9) >= 6, torch.finfo(torch.float32).min)
    outs = []
    for module in (direct, absorbed):
        out, _ = module(x, context=image, mask=mask)
        out.square().sum().backward()
        outs.append(out)
    assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(direct.named_parameters(), absorbed.parameters(), strict=True):
        if name == "k.bias":
            # Softmax ignores the key bias: the absorbed form never uses it, the direct one gets ~0 gradient.
            assert b.grad is None and a.grad.abs().max() < 1e-4
            continue
        assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_per_head_weight_gradients_come_back_in_the_weights_layout():
    """`_heads_matmul` is given `Wk_h` as a plain view and `Wv_h^T` as a transposed view of the parameters; each
    weight gradient must come back with its input's strides (else autograd copies it into the parameter's layout),
    and equal the plain product either way."""
    h, m, k, n = 3, 5, 4, 7
    a = torch.randn(m, h, k).transpose(0, 1)  # [H, M, K] in [M, H, K] memory, as both callers pass it
    for w in (torch.randn(h, k, n), torch.randn(h, n, k).transpose(1, 2)):
        w.requires_grad_(True)
        out = _heads_matmul(a, w)  # [M, H, N]
        grad_out = torch.randn_like(out)
        (grad_w,) = torch.autograd.grad(out, w, grad_out)
        assert grad_w.stride() == w.stride()
        assert_close(grad_w, a.transpose(1, 2) @ grad_out.transpose(0, 1))


def test_value_bias_is_exact_under_attention_dropout():
    """With dropout a row of P no longer sums to 1: the value bias must be scaled by the kept row sum."""
    _, absorbed = _pair(attention_dropout=0.5, hidden_dropout=0.0)
    absorbed.train()
    x, image = torch.randn(2, 4, 32), torch.randn(2, 9, 48)
    torch.manual_seed(3)
    got, _ = absorbed(x, context=image)

    # Reference: the textbook attention with keys/values formed, using the same dropout draw on P.
    h, d = 4, 8
    q = absorbed.q(x).unflatten(-1, (h, d)).transpose(1, 2)  # [B, H, L, d]
    k = absorbed.k(image).unflatten(-1, (h, d)).transpose(1, 2)  # [B, H, N, d]
    v = absorbed.v(image).unflatten(-1, (h, d)).transpose(1, 2)
    p = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1)  # [B, H, L, N]
    torch.manual_seed(3)
    p = p * keep_mask((2, 4, h, 9), 0.5, p.dtype, p.device).transpose(1, 2)  # drawn in [B, L, H, N] order
    assert (p == 0).float().mean().item() == pytest.approx(0.5, abs=0.1)  # the draw did drop weights
    a = (p @ v).transpose(1, 2).flatten(2)
    expected = absorbed.norm(x + absorbed.out(a))
    assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_seed_drops_the_same_attention_weights_in_both_forms():
    direct, absorbed = _pair(attention_dropout=0.3, hidden_dropout=0.2)
    x, image = torch.randn(2, 4, 32), torch.randn(2, 9, 48)
    outs = []
    for module in (direct.train(), absorbed.train()):
        torch.manual_seed(5)
        outs.append(module(x, context=image)[0])
    assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    torch.manual_seed(6)
    assert (direct(x, context=image)[0] - outs[0]).abs().max() > 1e-3  # another seed, other weights dropped


@pytest.mark.parametrize("impl", ["absorbed", "direct"])
def test_inference_runs_the_first_layer_once_for_all_images(impl):
    """Under no_grad the queries are the same for every image until they first read it: the embeddings and layer 0's
    self-attention run on one row, and the result (hidden states and cache) is the per-image pass, padding and all."""
    cfg = QFormerConfig.preset("tiny", cross_attention_impl=impl, hidden_dropout=0.0, attention_dropout=0.0)
    model = QFormer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    image = torch.randn(3, 9, cfg.encoder_width)
    image_mask = (torch.arange(9) < torch.tensor([[9], [6], [4]])).long()
    rows = []
    model.layers[0].self_attn.register_forward_hook(lambda module, args, out: rows.append(out[0].shape[0]))
    with torch.no_grad():
        batched = model(image_embeds=image, image_mask=image_mask, use_cache=True)
        alone = [
            model(image_embeds=image[i : i + 1], image_mask=image_mask[i : i + 1], use_cache=True) for i in range(3)
        ]
    assert rows == [1, 1, 1, 1]
    assert_close(batched.hidden, torch.cat([o.hidden for o in alone]), atol=1e-5, rtol=1e-5)
    for layer, (k, v) in enumerate(batched.cache.layers):
        assert_close(k, torch.cat([o.cache.layers[layer][0] for o in alone]), atol=1e-5, rtol=1e-5)
        assert_close(v, torch.cat([o.cache.layers[layer][1] for o in alone]), atol=1e-5, rtol=1e-5)
    # With autograd (training), or with dropout under no_grad, every image keeps its own row.
    rows.clear()
    model(image_embeds=image)
    dropout = QFormer(cfg.replace(hidden_dropout=0.1)).train()
    dropout.layers[0].self_attn.register_forward_hook(lambda module, args, out: rows.append(out[0].shape[0]))
    with torch.no_grad():
        dropout(image_embeds=image)
    assert rows == [3, 3]
