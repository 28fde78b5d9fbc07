"""One run per output folder (`run.lock`, stale locks taken over), a fresh log per fresh run, strict-JSON logs, and
the divergence policy (`max_nonfinite_steps`), on the tiny stage-1 twin."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from tasks.config import load_config
from tasks.run_folder import LOCK_NAME, RunFolderBusy, RunLock, _start_ticks, json_line
from tasks.train import TrainingDiverged
from tasks.train import train as train_in_process
from tests.train_helpers import caption_dataset, read_log, tiny_bert_folder, tiny_stage1_config, write_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("assets")
    return {"bert": tiny_bert_folder(tmp / "bert"), "ann": caption_dataset(tmp / "data", n=24)}


def config(assets, tmp_path: Path, out: Path, name: str = "c.yaml", **extra) -> Path:
    return write_config(tmp_path / name, **tiny_stage1_config(tmp_path, assets["ann"], out, assets["bert"], **extra))


def train_cli(cfg: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "tasks.train", str(cfg), *overrides]
    return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def strict(line: str) -> dict:
    """json.loads that refuses the NaN/Infinity tokens strict JSON readers reject."""

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=refuse)


def test_a_second_run_is_refused_and_a_dead_runs_lock_taken_over(assets, tmp_path):
    out = tmp_path / "run"
    cfg = config(assets, tmp_path, out, optim={"total_steps": 2})
    holder = subprocess.Popen(  # a live run's lock, taken by the real code in another process
        [sys.executable, "-c", f"from pathlib import Path; from tasks.run_folder import RunLock; "
         f"RunLock.acquire(Path({str(out)!r})); print('locked', flush=True); input()"],
        cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = train_cli(cfg)
        assert proc.returncode == 2, proc.stderr[-2000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("qformer train: error: ") and "Traceback" not in proc.stderr
        assert str(out) in line and f"pid {holder.pid} on {socket.gethostname()}" in line, line
        assert not (out / "log.jsonl").exists() and not (out / "config.yaml").exists()  # refused before any work
    finally:
        holder.send_signal(signal.SIGKILL)  # dies without releasing: its lock is now stale
        holder.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid
    proc = train_cli(cfg)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"taking over the lock of pid {holder.pid}" in proc.stderr
    assert [r["step"] for r in read_log(out)] == [1, 2]
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_lock_from_another_host_or_a_live_pid_is_respected_a_reused_pid_is_not(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lock_file = out / LOCK_NAME
    lock_file.write_text(json.dumps({"pid": 1, "host": "some-other-host", "time": 0}))
    with pytest.raises(RunFolderBusy, match=r"pid 1 on some-other-host.*delete .*run\.lock"):
        RunLock.acquire(out)
    live = {"pid": os.getppid(), "host": socket.gethostname(), "start_ticks": _start_ticks(os.getppid())}
    lock_file.write_text(json.dumps(live))
    with pytest.raises(RunFolderBusy, match=f"in use by another run \\(pid {os.getppid()} "):
        RunLock.acquire(out)
    if live["start_ticks"] is not None:  # the same pid, but another process than the one that locked: stale
        lock_file.write_text(json.dumps({**live, "start_ticks": live["start_ticks"] - 1}))
        lock = RunLock.acquire(out)
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        lock.release()
        assert not lock_file.exists()
    with pytest.raises(ValueError, match="must be >= 0"):  # the config check fails before any lock is taken
        load_config(None, ["output_dir=" + str(out), "max_nonfinite_steps=-1"])


def test_a_fresh_run_keeps_the_old_log_under_a_new_name(assets, tmp_path):
    out = tmp_path / "run"
    cfg = config(assets, tmp_path, out, optim={"total_steps": 2}, save_every=100)
    train_in_process(load_config(cfg))
    first = (out / "log.jsonl").read_text()
    assert len(first.splitlines()) == 2

    train_in_process(load_config(cfg, ["resume=none"]))  # fresh: the old log is moved aside, not appended to
    assert [r["step"] for r in read_log(out)] == [1, 2]
    kept = sorted(out.glob("log-*.jsonl"))
    assert len(kept) == 1 and kept[0].read_text() == first

    train_in_process(load_config(cfg, ["optim.total_steps=3"]))  # resumed from ckpt-2: appends step 3 only
    assert [r["step"] for r in read_log(out)] == [1, 2, 3] and len(list(out.glob("log-*.jsonl"))) == 1

    for ckpt in (out / "checkpoints").iterdir():  # nothing usable left: resume=auto starts a fresh run
        (ckpt / "meta.json").unlink()
    second = (out / "log.jsonl").read_text()
    train_in_process(load_config(cfg))
    assert [r["step"] for r in read_log(out)] == [1, 2]
    kept = sorted(out.glob("log-*.jsonl"))
    assert len(kept) == 2 and {k.read_text() for k in kept} == {first, second}


def test_non_finite_values_are_logged_as_null():
    line = json_line({"step": 3, "loss": float("nan"), "lr": float("inf"), "x": -float("inf"), "ok": 1.5})
    assert strict(line) == {"step": 3, "loss": None, "lr": None, "x": None, "ok": 1.5}


def test_divergence_stops_the_run_and_leaves_the_last_good_checkpoint(assets, tmp_path):
    """lr 1e6: step 3's update makes the weights non-finite, steps 4-6 are non-finite, the run stops there. With a
    checkpoint every step and keep_last=3, the good ones (steps 1 and 2) are still there."""
    out = tmp_path / "run"
    cfg = config(assets, tmp_path, out, optim={"lr": 1e6}, save_every=1, keep_last=3, max_nonfinite_steps=3)
    proc = train_cli(cfg)
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr and line.startswith("qformer train: error: training diverged"), line
    assert "3 consecutive steps (steps 4-6" in line and "ckpt-00000002" in line, line

    lines = (out / "log.jsonl").read_text().splitlines()
    log = [strict(x) for x in lines]  # every line strict JSON, the NaN losses as null
    assert [r["step"] for r in log] == list(range(1, 7)) and [r["loss"] for r in log[3:]] == [None] * 3
    assert log[-1]["non_finite_steps"] == 3
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["ckpt-00000001", "ckpt-00000002"], kept  # none of non-finite weights or on a non-finite step
    for name in kept:
        weights = load_file(out / "checkpoints" / name / "trainable.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values()), name
    assert not (out / "final").exists() and not (out / LOCK_NAME).exists()

    # The checkpoints left are usable: resumed from step 1 at a sane lr, the run ends normally.
    train_in_process(load_config(cfg, ["optim.lr=1e-3", f"resume={out / 'checkpoints' / 'ckpt-00000001'}"]))
    log = [strict(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13)) and all(r["loss"] is not None for r in log)
    assert (out / "final" / "model.safetensors").is_file()


def test_injected_non_finite_losses_stop_the_run_unless_disabled(assets, tmp_path, monkeypatch):
    """NaN losses from step 6 on (weights intact): stops at step 8; ckpt-4 stays newest and equals an intact run's."""
    import tasks.train

    real = tasks.train.build_objective

    def poisoned(*args, **kwargs):
        return _NanFrom(real(*args, **kwargs), call=6)

    good = tmp_path / "good"
    train_in_process(load_config(config(assets, tmp_path, good, "g.yaml", save_every=4)))
    monkeypatch.setattr(tasks.train, "build_objective", poisoned)
    out = tmp_path / "run"
    cfg = config(assets, tmp_path, out, save_every=4, max_nonfinite_steps=3)
    with pytest.raises(TrainingDiverged, match=r"steps 6-8"):
        train_in_process(load_config(cfg))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-00000004"]
    ours = load_file(out / "checkpoints" / "ckpt-00000004" / "trainable.safetensors")
    theirs = load_file(good / "checkpoints" / "ckpt-00000004" / "trainable.safetensors")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert_close(ours[key], theirs[key], atol=1e-6, rtol=0, msg=key)
    assert not (out / "final").exists() and not (out / LOCK_NAME).exists()

    # max_nonfinite_steps=0: every NaN step skipped and counted, the run goes to the end as before.
    off = tmp_path / "off"
    train_in_process(load_config(config(assets, tmp_path, off, "o.yaml", max_nonfinite_steps=0)))
    assert read_log(off)[-1]["non_finite_steps"] == 7 and (off / "final").is_dir()


class _NanFrom:
    """A real objective whose losses are NaN from its `call`-th call on (the weights stay intact)."""

    def __init__(self, objective, call: int):
        self._objective, self._from, self._calls = objective, call, 0

    def __call__(self, batch: dict) -> dict:
        self._calls += 1
        losses = self._objective(batch)
        return {k: v * float("nan") for k, v in losses.items()} if self._calls >= self._from else losses

    def __getattr__(self, name):  # state_dict, load_state_dict: the real objective's
        return getattr(self._objective, name)
