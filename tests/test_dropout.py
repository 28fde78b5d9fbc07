"""The Q-Former's dropout (`qformer.dropout`): F.dropout's odds and scale, its CPU masks from 16-bit uniform draws."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from qformer import QFormer, QFormerConfig
from qformer.dropout import Dropout, attention, dropout, keep_mask


class _Ops(TorchDispatchMode):
    """Records the name of every aten op that runs."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_keeps_one_minus_p_and_scales_by_its_inverse(p):
    torch.manual_seed(0)
    keep = keep_mask((1000, 1000), p, torch.float32, torch.device("cpu"))
    scale = torch.tensor(1.0) / (1.0 - p)  # F.dropout's kept value, in float32
    assert set(keep.unique().tolist()) == {0.0, scale.item()}
    kept = (keep > 0).double().mean().item()
    assert kept == pytest.approx(1.0 - p, abs=5 * (p * (1 - p) / 1e6) ** 0.5)  # 5 sigma
    assert keep.double().mean().item() == pytest.approx(1.0, abs=5e-3)  # E[mask] = 1: activations keep their mean


def test_keep_mask_near_one_keeps_almost_nothing_and_zero_keeps_everything():
    """The 16-bit threshold saturates instead of wrapping around (which would keep every position)."""
    torch.manual_seed(0)
    assert (keep_mask((1000, 1000), 1 - 1e-7, torch.float32, torch.device("cpu")) > 0).double().mean() < 1e-4
    assert torch.equal(keep_mask((1000, 1000), 0.0, torch.float32, torch.device("cpu")), torch.ones(1000, 1000))
    # Shapes whose size is not a multiple of the four draws per 64-bit word.
    assert keep_mask((3, 5, 7), 0.5, torch.float32, torch.device("cpu")).shape == (3, 5, 7)


def test_keep_mask_repeats_with_the_seed_and_comes_in_the_asked_dtype():
    draws = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        draws.append(keep_mask((64, 64), 0.3, torch.bfloat16, torch.device("cpu")))
    assert draws[0].dtype == torch.bfloat16
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\), got 1.0"):
        keep_mask((2,), 1.0, torch.float32, torch.device("cpu"))


def test_dropout_is_x_times_the_mask_with_the_masks_gradient():
    x = torch.randn(4, 8, 16, requires_grad=True)
    torch.manual_seed(7)
    out = dropout(x, 0.25)
    torch.manual_seed(7)
    mask = keep_mask(x.shape, 0.25, x.dtype, x.device)
    assert_close(out, x * mask, rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert_close(x.grad, grad * mask, rtol=0, atol=0)
    assert dropout(x, 0.25, training=False) is x and dropout(x, 0.0) is x


def test_dropout_module_is_an_nn_dropout_that_draws_with_keep_mask():
    module = Dropout(0.2)
    assert isinstance(module, torch.nn.Dropout) and repr(module) == repr(torch.nn.Dropout(0.2))
    assert module.state_dict() == {}
    x = torch.randn(32, 32)
    torch.manual_seed(3)
    got = module(x)
    torch.manual_seed(3)
    assert_close(got, dropout(x, 0.2), rtol=0, atol=0)
    assert module.eval()(x) is x


def test_attention_is_sdpa_without_dropout_and_the_textbook_with_it():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.zeros(2, 1, 1, 7).masked_fill_(torch.arange(7) >= 5, torch.finfo(torch.float32).min)
    assert_close(attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    torch.manual_seed(11)
    got = attention(q, k, v, mask, dropout_p=0.4)
    torch.manual_seed(11)
    p = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5 + mask, dim=-1)
    expected = dropout(p, 0.4) @ v
    assert_close(got, expected)
    assert not torch.allclose(got, attention(q, k, v, mask))  # the draw dropped weights


def test_a_training_pass_on_the_cpu_draws_no_bernoulli_masks():
    """Every mask of a Q-Former training pass (hidden, self- and cross-attention dropout) comes from integer draws."""
    cfg = QFormerConfig.preset("tiny", hidden_dropout=0.1, attention_dropout=0.1)
    model = QFormer(cfg).train()
    image = torch.randn(2, 9, cfg.encoder_width)
    ids = torch.randint(5, cfg.vocab_size, (2, 6))
    ops = _Ops()
    with ops:
        model(input_ids=ids, image_embeds=image, causal=True).hidden.sum().backward()
    assert "random_" in ops.names
    assert not {"bernoulli_", "bernoulli", "native_dropout", "rand", "uniform_"} & ops.names
    # And a seed repeats the pass.
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        outs.append(model(input_ids=ids, image_embeds=image).hidden)
    assert_close(outs[0], outs[1], rtol=0, atol=0)
