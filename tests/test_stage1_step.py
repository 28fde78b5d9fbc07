"""The whole stage-1 step: gradient coverage at world size 1, and 2 ranks x B against 1 process x 2B (gloo, CPU)."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from qformer.blip2 import Blip2Stage1
from qformer.config import Blip2Config
from qformer.flops import stage1_shares_image_kv
from qformer.losses import itc_loss, itg_labels, itg_loss
from tasks.dist import teardown_distributed
from tasks.stage1 import stage1_losses

WORLD, B, T = 2, 3, 6
BOS = 99  # the tiny vocabulary's last id plays [DEC]


def build_model(gather: str = "faithful") -> Blip2Stage1:
    cfg = Blip2Config.preset("tiny")
    cfg = dataclasses.replace(
        cfg, qformer=cfg.qformer.replace(hidden_dropout=0.0, attention_dropout=0.0), itc_gather=gather
    )
    torch.manual_seed(0)
    model = Blip2Stage1(cfg)
    with torch.no_grad():  # move the trainable weights away from their init so nothing is trivially symmetric
        for name, p in model.named_parameters():
            if not name.startswith("visual.") and name != "temp":
                p.add_(torch.randn_like(p) * 0.2)
    return model


def global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 90, (WORLD * B, T), generator=g)
    ids[:, 0] = 1  # [CLS]
    return {"images": torch.randn(WORLD * B, 3, 28, 28, generator=g), "ids": ids, "mask": torch.ones_like(ids)}


def itc_itg_grads(model: Blip2Stage1, rows: slice) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ITC + ITG through the real model on `rows` of the global batch (ITM's random negatives left out)."""
    data = global_batch()
    ids, mask = data["ids"][rows], data["mask"][rows]
    image_embeds = model.encode_image(data["images"][rows])
    image = model.image_features(image_embeds)
    text = model.text_features(ids, mask)
    loss = itc_loss(image.feats, text.feat, model.temp, gather=model.cfg.itc_gather).loss
    decoder_ids, labels = itg_labels(ids, pad_token_id=0, bos_token_id=BOS)
    loss = loss + itg_loss(model.itg_logits(image.cache, decoder_ids, mask), labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_every_trainable_parameter_gets_a_finite_gradient_and_the_vit_none():
    model = build_model()
    data = global_batch()
    losses = stage1_losses(
        model, data["ids"], data["mask"], images=data["images"], bos_token_id=BOS, generator=torch.Generator()
    )
    assert set(losses) == {"loss", "loss_itc", "loss_itm", "loss_itg"}
    assert_close(losses["loss"].detach(), losses["loss_itc"] + losses["loss_itm"] + losses["loss_itg"])
    losses["loss"].backward()
    missing = []
    for name, p in model.named_parameters():
        if name.startswith("visual."):
            assert not p.requires_grad and p.grad is None, name
        elif p.grad is None:
            missing.append(name)
        else:
            assert torch.isfinite(p.grad).all(), name
            # Softmax ignores a key bias: its true gradient is zero; every other gradient is really there.
            if not name.endswith("k.bias"):
                assert p.grad.abs().sum() > 0, name
    assert missing == []


@pytest.mark.parametrize("per_pass", ["absorbed", "direct"])
def test_shared_image_keys_values_equal_attention_per_pass(per_pass, monkeypatch):
    """The step forms each image's cross-attention keys/values once for its ITC pass and its three ITM pairs
    (qformer.flops.stage1_shares_image_kv); every loss and gradient equals the step where each pass attends on its
    own, absorbed or direct (to float32 rounding, with the same hard negatives)."""
    import tasks.stage1

    def step(model: Blip2Stage1) -> tuple[dict, dict]:
        data = global_batch()
        out = stage1_losses(
            model,
            data["ids"],
            data["mask"],
            images=data["images"],
            bos_token_id=BOS,
            generator=torch.Generator().manual_seed(7),
        )
        out["loss"].backward()
        return {k: v.detach() for k, v in out.items()}, {
            n: p.grad for n, p in model.named_parameters() if p.grad is not None
        }

    shared = build_model()
    assert stage1_shares_image_kv(shared.cfg.qformer, 5)  # the tiny ViT's 2 x 2 patches + class token
    losses, grads = step(shared)
    other = build_model()
    for layer in other.qformer.layers:
        if layer.cross_attn is not None:
            layer.cross_attn.impl = per_pass
    monkeypatch.setattr(tasks.stage1, "stage1_shares_image_kv", lambda *a: False)
    expected_losses, expected = step(other)
    for k in losses:
        assert_close(losses[k], expected_losses[k], atol=1e-6, rtol=1e-6, msg=k)
    # The absorbed form never adds the key bias (softmax ignores it): its gradient is zero, not formed.
    absent = {n for n in grads.keys() - expected.keys() if n.endswith("cross_attn.k.bias")}
    assert grads.keys() - absent == expected.keys() and (per_pass == "absorbed") == bool(absent)
    for name in grads:
        want = expected[name] if name in expected else torch.zeros_like(grads[name])
        assert_close(grads[name], want, atol=1e-6, rtol=1e-4, msg=name)


def _worker(rank: int, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/rdzv", rank=rank, world_size=WORLD, timeout=datetime.timedelta(60)
    )
    try:
        rows = slice(rank * B, (rank + 1) * B)
        results = {}
        for gather in ("faithful", "connected"):
            model = build_model(gather)
            loss, grads = itc_itg_grads(model, rows)
            for g in grads.values():  # DDP's average over ranks
                dist.all_reduce(g)
                g /= WORLD
            dist.all_reduce(loss)
            results[gather] = (loss / WORLD, grads)
        # The whole step, ITM included, runs at world size 2 and its gradients agree across ranks after averaging.
        model = build_model()
        data = global_batch()
        out = stage1_losses(
            model,
            data["ids"][rows],
            data["mask"][rows],
            images=data["images"][rows],
            bos_token_id=BOS,
            generator=torch.Generator().manual_seed(rank),
        )
        out["loss"].backward()
        results["step"] = {k: v.detach() for k, v in out.items()}
        results["step_grad_norm"] = torch.stack(
            [p.grad.norm() for p in model.parameters() if p.grad is not None]
        ).norm()
        torch.save(results, tmp_path / f"rank{rank}.pt")
    finally:
        teardown_distributed()


def test_two_ranks_equal_one_process_with_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(tmp_path,), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for gather in ("faithful", "connected"):
        expected_loss, expected = itc_itg_grads(build_model(gather), slice(0, WORLD * B))
        loss, grads = ranks[0][gather]
        assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
        assert grads.keys() == expected.keys()
        for name in expected:
            assert_close(grads[name], expected[name], atol=1e-5, rtol=1e-4, msg=f"{gather}: {name}")
    # Faithful and connected differ exactly in what the no-grad gather cuts: the text side of image->text and
    # the image side of text->image. So the projections' gradients must differ between the two modes.
    f, c = ranks[0]["faithful"][1], ranks[0]["connected"][1]
    assert (f["text_proj.weight"] - c["text_proj.weight"]).abs().max() > 1e-4
    assert (f["vision_proj.weight"] - c["vision_proj.weight"]).abs().max() > 1e-4
    for r in ranks:
        step = r["step"]
        assert all(torch.isfinite(v) for v in step.values())
        assert torch.isfinite(r["step_grad_norm"]) and r["step_grad_norm"] > 0
