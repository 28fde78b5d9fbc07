"""`qformer.packed_linear.Linear`: MKL-packed weights at CPU inference, `F.linear` otherwise, never a stale pack."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from qformer import QFormer, QFormerConfig
from qformer.packed_linear import Linear, mkl_packing_available

# torch's x86-64 builds (the CPU wheels and the CUDA ones) carry MKL; where a build has none, `Linear` is `F.linear`.
PACKS = mkl_packing_available()


class _Ops(TorchDispatchMode):
    """Records the name of every aten / mkl op dispatched."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _ran_packed(fn) -> bool:
    with _Ops() as ops:
        fn()
    return "mkl._mkl_linear" in ops.names


def test_inference_multiplies_by_the_packed_weight_from_the_second_call():
    torch.manual_seed(0)
    lin = Linear(512, 640).eval()
    x = torch.randn(4, 8, 512)
    with torch.no_grad():
        first = []
        assert not _ran_packed(lambda: first.append(lin(x)))  # a row count is packed on its second call
        second = []
        assert _ran_packed(lambda: second.append(lin(x))) == PACKS
        assert not _ran_packed(lambda: lin(x[:1, :1]))  # 1 row: under MIN_ROWS
    expected = F.linear(x, lin.weight, lin.bias)
    assert_close(first[0], expected, rtol=0, atol=0)
    assert_close(second[0], expected, rtol=1e-6, atol=1e-6)


def test_a_changed_weight_is_packed_again():
    torch.manual_seed(0)
    lin = Linear(512, 512).eval()
    x = torch.randn(32, 512)
    with torch.no_grad():
        lin(x), lin(x)
        lin.weight.mul_(-2.0)  # an optimizer step or load_state_dict: in place, the version counter moves
        got = lin(x)
        assert_close(got, F.linear(x, lin.weight, lin.bias), rtol=1e-6, atol=1e-6)
        lin.weight = torch.nn.Parameter(torch.randn(512, 512))  # new storage
        lin(x)
        assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-6, atol=1e-6)


def test_training_and_autocast_use_f_linear_and_setting_the_mode_drops_the_packs():
    torch.manual_seed(0)
    lin = Linear(512, 512).eval()
    x = torch.randn(32, 512)
    for _ in range(2):
        assert not _ran_packed(lambda: lin(x).sum().backward())  # with autograd: F.linear, gradients flow
    assert lin.weight.grad is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _ran_packed(lambda: (lin(x), lin(x)))
    with torch.no_grad():
        lin(x), lin(x)
        assert len(lin._packs) == PACKS
        lin.train()
        assert not lin._packs  # a training process carries no packs between evaluations
        lin.eval()
        assert not _ran_packed(lambda: lin(x))


def test_small_weights_stay_on_f_linear():
    """Under 512 x 512 elements (the shapes demo's 128-wide Q-Former): no packing, results exactly `F.linear`'s."""
    lin = Linear(128, 512).eval()
    x = torch.randn(64, 128)
    with torch.no_grad():
        assert not _ran_packed(lambda: (lin(x), lin(x), lin(x)))


def test_at_most_two_row_counts_are_kept():
    lin = Linear(512, 512).eval()
    with torch.no_grad():
        for rows in (16, 16, 32, 32, 48, 48):
            lin(torch.randn(rows, 512))
    assert sorted(lin._packs) == ([32, 48] if PACKS else [])


@pytest.mark.parametrize("impl", ["absorbed", "direct"])
def test_qformer_inference_with_packed_weights_matches_f_linear(impl):
    cfg = QFormerConfig.preset(
        "tiny", hidden_size=512, intermediate_size=1024, num_heads=4, encoder_width=512, cross_attention_impl=impl
    )
    torch.manual_seed(0)
    model = QFormer(cfg).eval()
    image = torch.randn(5, 9, 512)  # 5 x 4 query rows: over MIN_ROWS
    ids = torch.randint(100, (3, 7))
    with torch.no_grad():
        Linear.enabled = False
        try:
            expected = model(image_embeds=image).hidden, model(input_ids=ids).hidden
        finally:
            Linear.enabled = True
        model(image_embeds=image), model(input_ids=ids)  # first calls: packs are made on the second
        got = []
        assert _ran_packed(lambda: got.extend([model(image_embeds=image).hidden, model(input_ids=ids).hidden])) == PACKS
    for a, b in zip(got, expected, strict=True):
        assert_close(a, b, rtol=1e-5, atol=1e-5)
