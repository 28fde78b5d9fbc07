"""Stage-1 losses on hand-built inputs with known answers (world size 1, no process group)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from qformer.losses import (
    clamp_temperature_,
    hard_negative_indices,
    itc_loss,
    itg_labels,
    itg_loss,
    itm_labels,
    itm_loss,
)

EPS = 0.1  # label smoothing of the reference


def e(i: int, dim: int = 4) -> torch.Tensor:
    return torch.eye(dim)[i]


def cyclic_features() -> tuple[torch.Tensor, torch.Tensor, list[list[float]]]:
    """Three images of two queries, three one-hot texts; the best query sits in a different slot per image.

    Image b has one query equal to text b (dot 1) and a decoy `0.6 * text(b+1) + 0.8 * e3` (unit norm, dot 0.6
    with text b+1, 0 with the rest), so `sim_i2t = [[1, .6, 0], [0, 1, .6], [.6, 0, 1]]` only if the max over
    queries picks the right slot; a mean over queries would give other numbers.
    """
    decoy = [0.6 * e((b + 1) % 3) + 0.8 * e(3) for b in range(3)]
    image = torch.stack(
        [
            torch.stack([e(0), decoy[0]]),  # match in slot 0
            torch.stack([decoy[1], e(1)]),  # match in slot 1
            torch.stack([e(2), decoy[2]]),
        ]
    )
    text = torch.stack([e(0), e(1), e(2)])
    sims = [[1.0, 0.6, 0.0], [0.0, 1.0, 0.6], [0.6, 0.0, 1.0]]
    return image, text, sims


def smoothed_ce(row: list[float], target_probs: list[float]) -> float:
    """-sum_j t_j log softmax(row)_j, written out with math (independent of torch)."""
    lse = math.log(sum(math.exp(x) for x in row))
    return -sum(t * (x - lse) for t, x in zip(target_probs, row, strict=True))


def one_hot_smoothed(target: int, n: int) -> list[float]:
    return [(1 - EPS) * (j == target) + EPS / n for j in range(n)]


def test_itc_one_hot_known_answer():
    image, text, sims = cyclic_features()
    temp = torch.tensor(0.5)
    out = itc_loss(image, text, temp)
    expected_i2t = torch.tensor(sims) / 0.5
    assert_close(out.sim_i2t, expected_i2t)
    assert_close(out.sim_t2i, expected_i2t.T)  # text b vs image j = image j vs text b

    # Every row is a permutation of [2, 1.2, 0] with the target on the 2: CE = 0.9 (lse - 2) + 0.1 (lse - 3.2/3).
    lse = math.log(math.exp(2) + math.exp(1.2) + 1)
    expected = 0.9 * (lse - 2) + 0.1 * (lse - 3.2 / 3)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    rows = [[x / 0.5 for x in r] for r in sims]
    assert out.loss.item() == pytest.approx(sum(smoothed_ce(rows[b], one_hot_smoothed(b, 3)) for b in range(3)) / 3)


def test_itc_image_ids_soft_targets():
    image, text, sims = cyclic_features()
    temp = 0.5
    out = itc_loss(image, text, temp, image_ids=torch.tensor([7, 7, 9]))
    # Rows 0 and 1 share image 7: their positives are columns {0, 1}, row 2's is {2}.
    positives = [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
    targets = [[0.9 * p + 0.1 / 3 for p in row] for row in positives]
    i2t = [[x / temp for x in r] for r in sims]
    t2i = [[sims[j][b] / temp for j in range(3)] for b in range(3)]
    loss_i2t = sum(smoothed_ce(i2t[b], targets[b]) for b in range(3)) / 3
    loss_t2i = sum(smoothed_ce(t2i[b], targets[b]) for b in range(3)) / 3
    assert out.loss.item() == pytest.approx((loss_i2t + loss_t2i) / 2, rel=1e-6)
    # And it is not the plain loss (the shared image changes the targets).
    assert out.loss.item() != pytest.approx(itc_loss(image, text, temp).loss.item(), rel=1e-3)


def test_itc_unique_image_ids_equal_plain_loss():
    image = F.normalize(torch.randn(5, 3, 8), dim=-1)
    text = F.normalize(torch.randn(5, 8), dim=-1)
    plain = itc_loss(image, text, 0.07).loss
    with_ids = itc_loss(image, text, 0.07, image_ids=torch.tensor([3, 1, 4, 5, 9])).loss
    assert_close(with_ids, plain)


@pytest.mark.parametrize("image_ids", [None, torch.tensor([0, 1, 1, 2, 3])])
def test_itc_faithful_vs_connected(image_ids):
    image0 = F.normalize(torch.randn(5, 3, 8), dim=-1)
    text0 = F.normalize(torch.randn(5, 8), dim=-1)

    def run(gather: str):
        image = image0.clone().requires_grad_()
        text = text0.clone().requires_grad_()
        temp = torch.tensor(0.07, requires_grad=True)
        out = itc_loss(image, text, temp, gather=gather, image_ids=image_ids)
        return out, image, text, temp

    faithful, f_image, f_text, f_temp = run("faithful")
    connected, c_image, c_text, c_temp = run("connected")
    assert_close(faithful.loss, connected.loss)

    faithful.loss.backward()
    # Split the connected loss into its two directions (same targets as itc_loss, checked by the sum).
    if image_ids is None:
        targets = torch.arange(5)
        loss_i2t = F.cross_entropy(connected.sim_i2t, targets, label_smoothing=EPS) / 2
        loss_t2i = F.cross_entropy(connected.sim_t2i, targets, label_smoothing=EPS) / 2
    else:
        pos = (image_ids[:, None] == image_ids[None, :]).float()
        soft = 0.9 * pos / pos.sum(1, keepdim=True) + 0.1 / 5
        loss_i2t = -(F.log_softmax(connected.sim_i2t, 1) * soft).sum(1).mean() / 2
        loss_t2i = -(F.log_softmax(connected.sim_t2i, 1) * soft).sum(1).mean() / 2
    assert_close(loss_i2t + loss_t2i, connected.loss)
    i2t_wrt_image = torch.autograd.grad(loss_i2t, c_image, retain_graph=True)[0]
    t2i_wrt_text = torch.autograd.grad(loss_t2i, c_text, retain_graph=True)[0]
    connected.loss.backward()

    # The faithful gradient is exactly the connected gradient of i2t w.r.t. the image features plus that of
    # t2i w.r.t. the text features: each direction sees the other side as a constant.
    assert_close(f_image.grad, i2t_wrt_image)
    assert_close(f_text.grad, t2i_wrt_text)
    # ... which is not the full gradient: the connected mode also trains each side through the other direction.
    assert (c_image.grad - f_image.grad).abs().max() > 1e-3
    assert (c_text.grad - f_text.grad).abs().max() > 1e-3
    # The temperature is never detached.
    assert_close(f_temp.grad, c_temp.grad)


def test_itc_batch_of_one_and_bad_mode():
    out = itc_loss(F.normalize(torch.randn(1, 2, 4), dim=-1), F.normalize(torch.randn(1, 4), dim=-1), 0.1)
    assert out.sim_i2t.shape == (1, 1)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6)  # one column: softmax is 1 whatever the targets
    with pytest.raises(ValueError, match="gather"):
        itc_loss(torch.zeros(1, 2, 4), torch.zeros(1, 4), 0.1, gather="sometimes")


def test_clamp_temperature():
    temp = torch.nn.Parameter(torch.tensor(0.9))
    clamp_temperature_(temp)
    assert temp.item() == pytest.approx(0.5)
    temp.data.fill_(1e-5)
    clamp_temperature_(temp)
    assert temp.item() == pytest.approx(0.001)
    assert temp.requires_grad and temp.grad is None


def draw_counts(sim_i2t, sim_t2i, draws: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, N]` counts of the columns drawn for each row, per direction, over `draws` calls."""
    g = torch.Generator().manual_seed(1234)
    batch, num_cols = sim_i2t.shape
    image_counts = torch.zeros(batch, num_cols)
    text_counts = torch.zeros(batch, num_cols)
    rows = torch.arange(batch)
    for _ in range(draws):
        neg_image, neg_text = hard_negative_indices(sim_i2t, sim_t2i, generator=g, **kwargs)
        image_counts[rows, neg_image] += 1
        text_counts[rows, neg_text] += 1
    return image_counts, text_counts


def test_hard_negatives_follow_softmax_and_skip_positive():
    sim_i2t = torch.randn(4, 4) * 2
    sim_t2i = torch.randn(4, 4) * 2
    sim_i2t.fill_diagonal_(50.0)  # a positive that would win every draw if it were not excluded
    draws = 4000
    image_counts, text_counts = draw_counts(sim_i2t, sim_t2i, draws)
    for sim, counts in ((sim_t2i, image_counts), (sim_i2t, text_counts)):
        assert counts.diagonal().sum() == 0
        expected = torch.softmax(sim.masked_fill(torch.eye(4, dtype=torch.bool), float("-inf")), dim=1)
        freq = counts / draws
        # Binomial standard error per cell; 5 sigma keeps the seeded test far from flaky.
        tol = 5 * (expected * (1 - expected) / draws).sqrt() + 1e-3
        assert ((freq - expected).abs() <= tol).all(), (freq, expected)
        # The comparison has teeth: the unmasked softmax would differ by far more than the tolerance.
        assert ((freq - torch.softmax(sim, dim=1)).abs() > tol).any()


def test_hard_negatives_skip_same_image():
    sim = torch.zeros(4, 4)
    image_counts, text_counts = draw_counts(sim, sim.clone(), 1000, image_ids=torch.tensor([1, 1, 2, 3]))
    same = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    for counts in (image_counts, text_counts):
        assert counts[same].sum() == 0
        assert (counts[~same] > 0).all()  # uniform over the rest: every allowed column shows up


def test_hard_negatives_all_same_image_falls_back_to_other_columns():
    sim = torch.randn(3, 3)
    image_counts, text_counts = draw_counts(sim, sim.clone(), 600, image_ids=torch.tensor([5, 5, 5]))
    for counts in (image_counts, text_counts):
        assert counts.diagonal().sum() == 0  # never the own pair
        off = ~torch.eye(3, dtype=torch.bool)
        assert (counts[off] > 200).all()  # uniform over the other two columns: about 300 each

    # A single column: the only choice is the pair itself, and it must not fail.
    neg_image, neg_text = hard_negative_indices(torch.randn(1, 1), torch.randn(1, 1), image_ids=torch.tensor([0]))
    assert neg_image.tolist() == [0] and neg_text.tolist() == [0]


def test_hard_negatives_fp16_huge_similarities():
    # 6e4 is near fp16's maximum; divided by a small temperature it becomes inf, and NaN can follow.
    sim = (torch.rand(4, 6) * 6e4).half()
    sim[:, 1] = 6e4
    sim[0, 5] = float("inf")
    sim[1, 2] = float("nan")
    sim[2] = float("-inf")  # a row with no usable score at all
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        neg_image, neg_text = hard_negative_indices(sim, sim, generator=g)
        for neg in (neg_image, neg_text):
            assert ((neg >= 0) & (neg < 6)).all()
            assert (neg != torch.arange(4)).all()
            assert neg[0] == 5  # +inf dominates its row
            assert neg[1] != 2  # NaN is never a candidate


def test_itm_labels_and_loss():
    labels = itm_labels(2, "cpu")
    assert labels.tolist() == [1, 1, 0, 0, 0, 0]  # (pos, pos), (text, neg image), (neg text, image)
    logits = torch.randn(6, 2)
    expected = (
        sum(-(logits[i, int(y)] - torch.logsumexp(logits[i], 0)).item() for i, y in enumerate(labels.tolist())) / 6
    )
    assert itm_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError):
        itm_loss(torch.randn(4, 2))


def test_itg_labels():
    ids = torch.tensor([[101, 7, 8, 102, 0], [101, 9, 102, 0, 0]])
    decoder_ids, labels = itg_labels(ids, pad_token_id=0, bos_token_id=30522)
    assert decoder_ids.tolist() == [[30522, 7, 8, 102, 0], [30522, 9, 102, 0, 0]]
    assert labels.tolist() == [[30522, 7, 8, 102, -100], [30522, 9, 102, -100, -100]]
    assert ids[0, 0] == 101  # the input is not modified


def test_itg_loss_matches_explicit_smoothed_ce():
    vocab = 11
    ids = torch.tensor([[101 % vocab, 3, 4, 5, 0], [101 % vocab, 6, 2, 0, 0]])
    _, labels = itg_labels(ids, pad_token_id=0, bos_token_id=10)
    logits = torch.randn(2, 5, vocab) * 3
    # Explicit: position t predicts label t+1; smoothed CE = (1-eps) * -logp[y] + eps * mean_v(-logp[v]).
    terms = []
    for b in range(2):
        for t in range(4):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            row = logits[b, t].tolist()
            lse = math.log(sum(math.exp(x) for x in row))
            logp = [x - lse for x in row]
            terms.append((1 - EPS) * -logp[y] + EPS * -sum(logp) / vocab)
    assert len(terms) == 5
    assert itg_loss(logits, labels).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)

    # No scored token at all: zero, not NaN, and still differentiable.
    empty = torch.full_like(labels, -100)
    logits.requires_grad_()
    loss = itg_loss(logits, empty)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()
