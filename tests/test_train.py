"""The real training entry point on tiny data written here: stage 1 then stage 2, exact resume after SIGKILL,
torchrun with 2 CPU processes, bad images, and config errors. Runs are subprocesses, as a user starts them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tasks.train import CRASH_AT_STEP_ENV, LOG_SAMPLE_IDS_ENV
from tests.llm_helpers import tiny_opt_folder, tiny_t5_folder
from tests.train_helpers import (
    assert_same_run,
    caption_dataset,
    read_log,
    tiny_bert_folder,
    tiny_stage1_config,
    write_config,
)

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], check: bool = True, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`env`: extra environment variables (the test-only hooks of tasks.train)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def train(config: Path, *overrides: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "tasks.train", str(config), *overrides], check=check, env=env)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("assets")
    return {"bert": tiny_bert_folder(tmp / "bert"), "ann": caption_dataset(tmp / "data", n=24), "tmp": tmp}


def falls(log: list[dict]) -> bool:
    first = sum(r["loss"] for r in log[:3]) / 3
    last = sum(r["loss"] for r in log[-3:]) / 3
    return last < first - 0.05


def test_stage1_then_stage2_from_its_checkpoint(assets, tmp_path):
    out1 = tmp_path / "stage1"
    cfg = write_config(
        tmp_path / "s1.yaml", **tiny_stage1_config(tmp_path, assets["ann"], out1, assets["bert"], save_every=100)
    )
    proc = train(cfg)
    assert "glibc keeps freed memory" in proc.stderr  # qformer.cpu_malloc.keep_freed_memory, set on a CPU
    log = read_log(out1)
    assert [r["step"] for r in log] == list(range(1, 13)) and falls(log), log
    assert {"loss_itc", "loss_itm", "loss_itg", "lr", "samples_per_s"} <= log[0].keys()
    assert (out1 / "final" / "model.safetensors").is_file() and (out1 / "final" / "tokenizer").is_dir()

    opt = tiny_opt_folder(tmp_path / "opt")
    out2 = tmp_path / "stage2"
    s2 = tiny_stage1_config(
        tmp_path, assets["ann"], out2, assets["bert"], save_every=100, init_from=str(out1 / "final")
    )
    s2.update(stage="stage2", bert="")
    s2["model"]["llm"] = {"path": str(opt), "dtype": "fp32"}
    train(write_config(tmp_path / "s2.yaml", **s2))
    log2 = read_log(out2)
    assert len(log2) == 12 and falls(log2), log2
    # stage 2 really started from stage 1's query path
    s1 = load_file(out1 / "final" / "model.safetensors")
    s2_init = load_file(out2 / "checkpoints" / "ckpt-00000012" / "trainable.safetensors")
    assert (
        "qformer.query_tokens" in s2_init and s2_init["qformer.query_tokens"].shape == s1["qformer.query_tokens"].shape
    )


def write_shards(ann: Path, shards: Path) -> str:
    """The caption dataset `ann` as two webdataset shards; returns their brace spec."""
    import webdataset as wds

    anns = json.loads(ann.read_text())
    shards.mkdir()
    for s in range(2):
        with wds.TarWriter(str(shards / f"{s:05d}.tar")) as sink:
            for i, item in enumerate(anns[s::2]):
                jpg = (ann.parent / item["image"]).read_bytes()
                sink.write({"__key__": f"{s}_{i:04d}", "jpg": jpg, "txt": item["caption"]})
    return str(shards / "{00000..00001}.tar")


def test_webdataset_shards_train(assets, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_stage1_config(tmp_path, assets["ann"], out, assets["bert"], save_every=100)
    cfg["data"]["datasets"] = [{"shards": write_shards(assets["ann"], tmp_path / "shards")}]
    train(write_config(tmp_path / "wds.yaml", **cfg))
    log = read_log(out)
    assert len(log) == 12 and falls(log), log


@pytest.mark.parametrize("resume_after", [4, 6])  # mid-epoch, and the epoch's last batch
def test_webdataset_loader_resumes_the_same_augmented_images(assets, tmp_path, resume_after):
    """Shards through 2 DataLoader workers: a loader restored from a saved position yields the batches the
    uninterrupted one does, random crops and flips included (drawn per sample, not from the workers' generators)."""
    from tasks.config import load_config
    from tasks.train_data import build_loader

    cfg = tiny_stage1_config(tmp_path, assets["ann"], tmp_path / "run", assets["bert"])
    cfg["data"].update(datasets=[{"shards": write_shards(assets["ann"], tmp_path / "shards")}], num_workers=2)
    config = load_config(write_config(tmp_path / "wds.yaml", **cfg))

    def take(loader, n: int) -> list[tuple[list[str], torch.Tensor]]:
        batches = iter(loader)
        return [(b["key"], b["image"]) for b in (next(batches) for _ in range(n))]

    whole = take(build_loader(config, 0, 1, seed=0), 8)  # 24 samples, batches of 4: an epoch is 6 batches
    first = build_loader(config, 0, 1, seed=0)
    take(first, resume_after)
    resumed = build_loader(config, 0, 1, seed=0)
    resumed.load_state_dict(first.state_dict())
    for (keys, images), (keys2, images2) in zip(whole[resume_after:], take(resumed, 8 - resume_after), strict=True):
        assert keys == keys2
        assert torch.equal(images, images2), keys


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(assets, tmp_path):
    base = tiny_stage1_config(tmp_path, assets["ann"], tmp_path / "x", assets["bert"], save_every=4)
    base["data"]["num_workers"] = 2  # augmentation in worker processes must replay exactly too
    base["model"]["qformer"] = {"hidden_dropout": 0.1, "attention_dropout": 0.1}  # and dropout masks
    cfg = write_config(tmp_path / "c.yaml", **base)
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    train(cfg, f"output_dir={full}")
    proc = train(cfg, f"output_dir={crashed}", check=False, env={CRASH_AT_STEP_ENV: "10"})
    assert proc.returncode == -9, proc.stderr[-2000:]  # really SIGKILLed, after the step-8 checkpoint
    assert max(r["step"] for r in read_log(crashed)) == 10
    # A checkpoint damaged on disk (as a crash mid-write leaves it) is detected and the previous one used.
    newest = crashed / "checkpoints" / "ckpt-00000008" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    proc = train(cfg, f"output_dir={crashed}")
    assert "ckpt-00000008 is not usable" in proc.stderr and "resumed from" in proc.stderr
    assert "ckpt-00000004" in proc.stderr.split("resumed from")[1].splitlines()[0]

    assert_same_run(full, crashed, 12, ("loss", "loss_itc", "loss_itm", "loss_itg", "lr"))


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_stage2_sigkill_then_resume_reproduces_the_uninterrupted_run(assets, tmp_path, llm):
    """T5 pretrains as a prefix LM: the resumed run must draw the same caption splits as the uninterrupted one."""
    folder = tiny_opt_folder(tmp_path / llm) if llm == "opt" else tiny_t5_folder(tmp_path / llm)
    base = tiny_stage1_config(tmp_path, assets["ann"], tmp_path / "x", assets["bert"], save_every=2)
    base.update(stage="stage2", bert="")
    base["optim"]["total_steps"] = 6
    base["model"]["qformer"] = {"hidden_dropout": 0.1, "attention_dropout": 0.1}  # dropout masks replay too
    # T5: split points and the whole-caption draws both come from the prefix-LM generator.
    extra = {"prefix_lm": True, "prefix_lm_full_caption": 0.5} if llm == "t5" else {}
    base["model"]["llm"] = {"path": str(folder), "dtype": "fp32", **extra}
    cfg = write_config(tmp_path / "c.yaml", **base)
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    train(cfg, f"output_dir={full}")
    proc = train(cfg, f"output_dir={crashed}", check=False, env={CRASH_AT_STEP_ENV: "5"})
    assert proc.returncode == -9, proc.stderr[-2000:]  # really SIGKILLed, after the step-4 checkpoint
    assert max(r["step"] for r in read_log(crashed)) == 5
    proc = train(cfg, f"output_dir={crashed}")
    assert "ckpt-00000004" in proc.stderr.split("resumed from")[1].splitlines()[0]

    assert_same_run(full, crashed, 6, ("loss", "lr"))


def test_resume_on_the_last_batch_of_an_epoch_is_exact_and_counters_continue(assets, tmp_path):
    """A checkpoint taken on an epoch's last batch resumes into the next epoch (DataLoader workers, bad images);
    the skipped-sample and non-finite-step counters continue from the checkpoint instead of restarting at 0."""
    ann = caption_dataset(tmp_path / "bad", n=24, corrupt=1, missing=1)  # 6 steps of 4 per epoch, 2 skipped
    base = tiny_stage1_config(tmp_path, ann, tmp_path / "x", assets["bert"], save_every=6)  # 12 steps: 2 epochs
    base["data"]["num_workers"] = 2
    base["model"]["qformer"] = {"hidden_dropout": 0.1, "attention_dropout": 0.1}
    cfg = write_config(tmp_path / "c.yaml", **base)
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    train(cfg, f"output_dir={full}")
    proc = train(cfg, f"output_dir={crashed}", check=False, env={CRASH_AT_STEP_ENV: "6"})
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILLed right after the checkpoint on the epoch's end
    ckpt = crashed / "checkpoints" / "ckpt-00000006"
    assert read_log(crashed)[-1]["skipped_samples"] == 2
    # The run's counters are in state.pt; a non-zero non-finite count must come back after the resume too.
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["counters"] == {"non_finite_steps": 0}
    state["counters"]["non_finite_steps"] = 3
    torch.save(state, ckpt / "state.pt")
    proc = train(cfg, f"output_dir={crashed}")
    assert "ckpt-00000006" in proc.stderr.split("resumed from")[1].splitlines()[0]

    b = assert_same_run(full, crashed, 12, ("loss", "loss_itc", "loss_itm", "loss_itg", "lr", "skipped_samples"))
    assert [r["non_finite_steps"] for r in b] == [0] * 6 + [3] * 6
    assert b[-1]["skipped_samples"] == 4  # the second epoch's bad images counted on top of the first's


class _Planted:
    """What a planted checkpoint file holds: unpickling it runs code (writes `marker`)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_resume_refuses_a_planted_pickle_without_running_it(assets, tmp_path, capsys):
    from tasks.config import load_config
    from tasks.train import main
    from tasks.train import train as train_in_process

    cfg = tiny_stage1_config(tmp_path, assets["ann"], tmp_path / "run", assets["bert"], save_every=2)
    cfg["optim"]["total_steps"] = 2
    config = write_config(tmp_path / "c.yaml", **cfg)
    train_in_process(load_config(config))
    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-00000002"
    marker = tmp_path / "planted_code_ran"
    for planted, resume in (("rank0.pt", "auto"), ("state.pt", str(ckpt))):  # found, or named: refused either way
        good = (ckpt / planted).read_bytes()
        torch.save({"rng": _Planted(marker)}, ckpt / planted)
        capsys.readouterr()
        assert main([str(config), f"resume={resume}"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert last.startswith("qformer train: error: ") and str(ckpt / planted) in last, last
        assert not marker.exists()
        (ckpt / planted).write_bytes(good)


def test_resume_names_every_key_that_does_not_fit(tmp_path):
    from safetensors.torch import save_file

    from qformer.convert import CheckpointError
    from tasks.checkpointing import resume_from

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    model[1].requires_grad_(False)  # frozen parts are not in a training checkpoint: not missing
    rest = dict(optimizer=None, scaler=None, loader=None, objective=None, device=torch.device("cpu"))
    save_file(
        {"0.weight": torch.zeros(2, 2), "0.bias": torch.zeros(2), "extra": torch.zeros(1)},
        tmp_path / "trainable.safetensors",
    )
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): extra") as err:
        resume_from(tmp_path, model=model, **rest)
    assert "missing" not in str(err.value)
    save_file({"0.weight": torch.zeros(2, 2)}, tmp_path / "trainable.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): 0.bias"):
        resume_from(tmp_path, model=model, **rest)


def test_torchrun_two_processes_see_disjoint_data(assets, tmp_path):
    out = tmp_path / "ddp"
    cfg = tiny_stage1_config(tmp_path, assets["ann"], out, assets["bert"], save_every=100)
    cfg["optim"]["total_steps"] = 4
    cfg["data"]["batch_size"] = 3
    config = write_config(tmp_path / "ddp.yaml", **cfg)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531"]
    run([*torchrun, "-m", "tasks.train", str(config)], env={LOG_SAMPLE_IDS_ENV: "1"})
    seen = {}
    for r in range(2):
        rows = [json.loads(line) for line in (out / f"samples_rank{r}.jsonl").read_text().splitlines()]
        seen[r] = [rows[i]["image_id"] for i in range(len(rows)) if rows[i]["step"] <= 4]
    for step in range(4):
        assert not set(seen[0][step]) & set(seen[1][step]), (step, seen)
    epoch0 = [i for r in range(2) for step in seen[r][: 24 // 6] for i in step]
    assert len(epoch0) == len(set(epoch0))  # within an epoch no sample is used twice across ranks
    assert len(read_log(out)) == 4 and torch.isfinite(torch.tensor(read_log(out)[-1]["loss"]))


def test_bad_images_are_skipped_counted_and_named(assets, tmp_path):
    from tasks.config import load_config
    from tasks.data import TooManyBadSamples
    from tasks.train import train as train_in_process

    data = tmp_path / "bad"
    ann = caption_dataset(data, n=20, corrupt=1, missing=1)
    out = tmp_path / "run"
    cfg = tiny_stage1_config(tmp_path, ann, out, assets["bert"], save_every=100)
    cfg["optim"]["total_steps"] = 5  # one epoch of 20 samples
    train_in_process(load_config(write_config(tmp_path / "bad.yaml", **cfg)))
    report = json.loads((out / "skipped_rank0.json").read_text())
    assert sorted(Path(p).name for p in report["skipped_paths"]) == ["000.jpg", "001.jpg"]
    assert read_log(out)[-1]["skipped_samples"] == 2

    strict = tiny_stage1_config(tmp_path, ann, tmp_path / "strict", assets["bert"])
    strict["data"].update(max_skip_fraction=0.01, min_samples_before_check=4)
    with pytest.raises(TooManyBadSamples, match="0.01") as err:
        train_in_process(load_config(write_config(tmp_path / "strict.yaml", **strict)))
    assert "000.jpg" in str(err.value)


def test_deterministic_turns_on_torchs_deterministic_algorithms(assets, tmp_path, monkeypatch):
    from tasks.config import load_config
    from tasks.train import train as train_in_process

    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: calls.append((a, k)))
    for flag in (False, True):
        cfg = tiny_stage1_config(tmp_path, assets["ann"], tmp_path / f"run_{flag}", assets["bert"], save_every=100)
        cfg["optim"]["total_steps"] = 1
        cfg["deterministic"] = flag
        train_in_process(load_config(write_config(tmp_path / f"det_{flag}.yaml", **cfg)))
    assert calls == [((True,), {"warn_only": True})]


def test_unknown_config_key_fails_before_any_work(assets, tmp_path, capsys):
    from tasks.train import main

    cfg = tiny_stage1_config(tmp_path, assets["ann"], tmp_path / "never", assets["bert"])
    cfg["optim"]["learning_rate"] = 1e-4
    assert main([str(write_config(tmp_path / "typo.yaml", **cfg))]) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    ok = write_config(tmp_path / "ok.yaml", **{**cfg, "optim": {"lr": 1e-4}})
    assert main([str(ok), "data.batch_size=four"]) == 2
    assert "data.batch_size" in capsys.readouterr().err
