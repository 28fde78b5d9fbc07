"""The absorbed cross-attention is the same math as the direct one: outputs and gradients, in train mode too."""

import torch
from torch.testing import assert_close

from qformer import QFormerConfig
from qformer.qformer import Attention


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
    p = torch.nn.functional.dropout(p.flatten(1, 2), 0.5).unflatten(1, (h, -1))
    a = (p @ v).transpose(1, 2).flatten(2)
    expected = absorbed.norm(x + absorbed.out(a))
    assert_close(got, expected, atol=1e-5, rtol=1e-5)
