"""Gathers, the ITC loss and the runner's sharding helpers across real processes: 2 ranks over gloo on CPU, file
rendezvous.

One spawn runs every distributed check (spawning costs seconds); each rank saves its results to a file in
`tmp_path` and the tests compare them with single-process computations over the whole global batch.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.testing import assert_close

from qformer.dist import (
    all_gather_no_grad,
    all_gather_with_grad,
    gather_rows,
    get_rank,
    get_world_size,
    is_distributed,
)
from qformer.losses import hard_negative_indices, itc_loss
from tasks.dist import gather_strided, on_rank0, run_sharded, shard, shard_indices, teardown_distributed

WORLD = 2
B, Q, D, P = 3, 2, 5, 4  # per-rank batch, queries, hidden width, projection width
MODES = ("faithful", "connected")
# Image ids of the global batch, with a repeated image across the rank boundary (rows 0 and 3, 1 and 5).
GLOBAL_IMAGE_IDS = torch.tensor([10, 11, 12, 10, 13, 11])
# Rows each rank asks gather_rows for: different lengths, repeats, rows of both owners, unsorted.
REQUESTS = {0: torch.tensor([4, 0, 5, 4, 2]), 1: torch.tensor([1, 3])}
N_ITEMS = 5  # items split across the ranks by tasks.dist: an odd count, so the shares differ in size


def global_inputs() -> dict[str, torch.Tensor]:
    """The same global batch and weights in every process."""
    g = torch.Generator().manual_seed(42)
    return {
        "image_hidden": torch.randn(WORLD * B, Q, D, generator=g),
        "text_hidden": torch.randn(WORLD * B, D, generator=g),
        "vision_proj": torch.randn(P, D, generator=g),
        "text_proj": torch.randn(P, D, generator=g),
        "rows": torch.randn(WORLD * B, 3, 2, generator=g),
        "row_weights": torch.randn(8, 3, 2, generator=g),
    }


def strided_weights(rank: int) -> torch.Tensor:
    """`[W * B, 2, 3]` weights for the transposed gathered rows, different on each rank."""
    return torch.arange(WORLD * B * 6, dtype=torch.float32).reshape(WORLD * B, 2, 3) * (rank + 1)


def itc_step(rows: slice, mode: str, image_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Tiny projections -> normalised features -> itc_loss -> backward, on the rows `rows` of the global batch."""
    data = global_inputs()
    vision_proj = data["vision_proj"].clone().requires_grad_()
    text_proj = data["text_proj"].clone().requires_grad_()
    temp = torch.tensor(0.1, requires_grad=True)
    image_feats = F.normalize(data["image_hidden"][rows] @ vision_proj.T, dim=-1)
    text_feats = F.normalize(data["text_hidden"][rows] @ text_proj.T, dim=-1)
    image_feats.retain_grad()
    text_feats.retain_grad()
    ids = None if image_ids is None else image_ids[rows]
    out = itc_loss(image_feats, text_feats, temp, gather=mode, image_ids=ids)
    out.loss.backward()
    return {
        "loss": out.loss.detach(),
        "image_feats": image_feats.grad,
        "text_feats": text_feats.grad,
        "vision_proj": vision_proj.grad,
        "text_proj": text_proj.grad,
        "temp": temp.grad,
    }


def _worker(rank: int, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp_path}/rdzv",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results: dict[str, object] = {"rank": get_rank(), "world": get_world_size(), "distributed": is_distributed()}
        local = slice(rank * B, (rank + 1) * B)

        # (a) ITC in both modes, with and without image ids.
        for mode in MODES:
            for ids_name, ids in (("plain", None), ("ids", GLOBAL_IMAGE_IDS)):
                results[f"itc/{mode}/{ids_name}"] = itc_step(local, mode, ids)

        # (b) gather_rows against indexing all_gather_with_grad's result, forward and gradient.
        data = global_inputs()
        x = data["rows"][local].clone().requires_grad_()
        x_ref = data["rows"][local].clone().requires_grad_()
        index = REQUESTS[rank]
        weights = data["row_weights"][: len(index)]
        got = gather_rows(x, index)
        ref = all_gather_with_grad(x_ref)[index]
        # Transposed consumers make the incoming gradients strided, as in real use.
        (got.transpose(1, 2) * weights.transpose(1, 2)).sum().backward()
        (ref.transpose(1, 2) * weights.transpose(1, 2)).sum().backward()
        results["gather_rows"] = {"out": got.detach(), "ref": ref.detach(), "grad": x.grad, "ref_grad": x_ref.grad}

        # all_gather_with_grad under a consumer whose gradient is strided (a transpose): the gloo backward
        # used to permute such gradients silently.
        x = data["rows"][local].clone().requires_grad_()
        gathered = all_gather_with_grad(x)
        (gathered.transpose(1, 2) * strided_weights(rank)).sum().backward()
        results["with_grad"] = {"out": gathered.detach(), "grad": x.grad}

        # all_gather_no_grad: every rank's rows, detached (own rows included).
        gathered = all_gather_no_grad(x * 1.0)
        results["no_grad"] = {"out": gathered, "requires_grad": gathered.requires_grad}

        # Hard negatives at rank > 0: the positive is column rank * B + b, not b.
        sim = torch.zeros(B, WORLD * B)
        sim[torch.arange(B), rank * B + torch.arange(B)] = 1e4  # would win every draw if not excluded
        g = torch.Generator().manual_seed(rank)
        picks = torch.stack([torch.stack(hard_negative_indices(sim, sim, generator=g)) for _ in range(200)])
        results["negatives"] = picks  # [draws, 2, B]

        results["sharding"] = sharding_checks(rank)

        torch.save(results, tmp_path / f"rank{rank}.pt")
    finally:
        teardown_distributed()


def _error(fn) -> str | None:
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def sharding_checks(rank: int) -> dict[str, object]:
    """tasks.dist on this rank: its share, the strided gather, the merge by key, errors reported to every rank."""
    items = [f"item{i}" for i in range(N_ITEMS)]
    rows = torch.arange(N_ITEMS * 3, dtype=torch.float32).reshape(N_ITEMS, 3)
    mine = list(shard_indices(N_ITEMS))
    return {
        "indices": mine,
        "items": shard(items),
        "gathered": gather_strided(rows[mine], N_ITEMS),
        "merged": run_sharded(lambda: {item: rank for item in shard(items)}, "merge"),
        "twice": _error(lambda: run_sharded(lambda: {"same": rank}, "twice")),
        "fails": _error(lambda: run_sharded(lambda: {} if rank == 0 else {}[f"boom{rank}"], "work")),
        "rank0": on_rank0(lambda: f"from rank {rank}", "rank0", share=True),
        "rank0_only": on_rank0(lambda: f"from rank {rank}", "rank0"),
        "rank0_fails": _error(lambda: on_rank0(lambda: 1 / 0, "rank-0 job")),
    }


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    tmp_path = tmp_path_factory.mktemp("dist")
    mp.start_processes(_worker, args=(tmp_path,), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_process_group_seen(rank_results):
    for rank, res in enumerate(rank_results):
        assert (res["rank"], res["world"], res["distributed"]) == (rank, WORLD, True)


@pytest.mark.parametrize("ids_name", ["plain", "ids"])
@pytest.mark.parametrize("mode", MODES)
def test_itc_two_ranks_equal_one_process(rank_results, mode, ids_name):
    ids = None if ids_name == "plain" else GLOBAL_IMAGE_IDS
    single = itc_step(slice(None), mode, ids)  # 1 process x 2B, same mode
    per_rank = [res[f"itc/{mode}/{ids_name}"] for res in rank_results]

    assert_close(sum(r["loss"] for r in per_rank) / WORLD, single["loss"])
    # Each rank's loss is a mean over B rows, not B * W, so its local gradients are W times the global ones;
    # DDP's averaging over ranks divides by W again. Parameters: average over ranks, like DDP.
    for name in ("image_feats", "text_feats"):
        assert_close(torch.cat([r[name] for r in per_rank]) / WORLD, single[name])
    for name in ("vision_proj", "text_proj", "temp"):
        assert_close(sum(r[name] for r in per_rank) / WORLD, single[name])


def test_itc_modes_differ_in_gradient_only(rank_results):
    faithful, connected = (rank_results[0][f"itc/{mode}/plain"] for mode in MODES)
    assert_close(faithful["loss"], connected["loss"])
    assert (faithful["vision_proj"] - connected["vision_proj"]).abs().max() > 1e-4


def test_gather_rows_matches_all_gather_with_grad(rank_results):
    data = global_inputs()
    x_global = data["rows"].clone().requires_grad_()
    total = 0
    for rank, res in enumerate(rank_results):
        got = res["gather_rows"]
        assert_close(got["out"], got["ref"])
        assert_close(got["grad"], got["ref_grad"])
        assert_close(got["out"], data["rows"][REQUESTS[rank]])
        total = total + (x_global[REQUESTS[rank]] * data["row_weights"][: len(REQUESTS[rank])]).sum()
    total.backward()
    # Row gradients land on the owning rank, summed over every rank that asked for the row.
    assert_close(torch.cat([res["gather_rows"]["grad"] for res in rank_results]), x_global.grad)


def test_all_gather_with_grad_strided_gradient(rank_results):
    data = global_inputs()
    x_global = data["rows"].clone().requires_grad_()
    sum((x_global.transpose(1, 2) * strided_weights(rank)).sum() for rank in range(WORLD)).backward()
    for rank, res in enumerate(rank_results):
        assert_close(res["with_grad"]["out"], data["rows"])
        # Each rank's rows collect the gradient of every rank's loss.
        assert_close(res["with_grad"]["grad"], x_global.grad[rank * B : (rank + 1) * B])


def test_all_gather_no_grad(rank_results):
    data = global_inputs()
    for res in rank_results:
        assert_close(res["no_grad"]["out"], data["rows"])
        assert res["no_grad"]["requires_grad"] is False


def test_hard_negatives_offset_by_rank(rank_results):
    for rank, res in enumerate(rank_results):
        picks = res["negatives"]
        own = rank * B + torch.arange(B)
        assert (picks != own).all()
        assert ((picks >= 0) & (picks < WORLD * B)).all()


def test_world_size_one_without_process_group():
    assert not is_distributed()
    assert (get_rank(), get_world_size()) == (0, 1)
    x = torch.randn(4, 3, requires_grad=True)
    index = torch.tensor([3, 0, 3])
    out = gather_rows(x, index)
    assert_close(out, x[index])
    out.sum().backward()
    assert_close(x.grad, torch.tensor([1.0, 0.0, 0.0, 2.0])[:, None].expand(4, 3))
    assert all_gather_with_grad(x) is x
    detached = all_gather_no_grad(x)
    assert not detached.requires_grad and detached.data_ptr() == x.data_ptr()


def test_sharding_is_strided_and_merges_back(rank_results):
    rows = torch.arange(N_ITEMS * 3, dtype=torch.float32).reshape(N_ITEMS, 3)
    shares = [res["sharding"] for res in rank_results]
    assert [s["indices"] for s in shares] == [[0, 2, 4], [1, 3]]
    assert [s["items"] for s in shares] == [["item0", "item2", "item4"], ["item1", "item3"]]
    for s in shares:
        assert_close(s["gathered"], rows, atol=0, rtol=0)  # global order, whatever the split
        assert s["merged"] == {f"item{i}": i % WORLD for i in range(N_ITEMS)}


def test_sharded_errors_reach_every_rank(rank_results):
    shares = [res["sharding"] for res in rank_results]
    for s in shares:
        assert s["twice"] == "RuntimeError: twice: 'same' was produced by two ranks (the second is rank 1)"
    assert shares[1]["fails"] == "KeyError: 'boom1'"  # the failing rank: its own exception
    assert shares[0]["fails"].startswith("RuntimeError: work failed on another rank: rank 1: KeyError")
    assert shares[0]["rank0_fails"].startswith("ZeroDivisionError")
    assert shares[1]["rank0_fails"].startswith("RuntimeError: rank-0 job failed on rank 0: ZeroDivisionError")


def test_rank0_jobs_run_once_and_share_on_request(rank_results):
    shares = [res["sharding"] for res in rank_results]
    assert [s["rank0"] for s in shares] == ["from rank 0", "from rank 0"]
    assert [s["rank0_only"] for s in shares] == ["from rank 0", None]


def test_sharding_without_process_group_is_the_identity():
    items = list("abcde")
    assert shard(items) == items and list(shard_indices(5)) == [0, 1, 2, 3, 4]
    assert shard(items, rank=1, world=3) == ["b", "e"]
    x = torch.randn(5, 2)
    assert_close(gather_strided(x, 5), x, atol=0, rtol=0)
    assert run_sharded(lambda: {"a": 1}, "work") == {"a": 1}
    assert on_rank0(lambda: 7, "job") == 7
