"""The training loop for stage 1 and stage 2: `python -m tasks.train CONFIG [key=value ...]` (or `qformer train`).

Runs as plain python or under torchrun (one node or many; NCCL on GPU, gloo on CPU). DDP wraps only the trainable
modules; the frozen ViT and LLM stay outside it. The step never asks which stage it runs: `tasks/stage1.py` and
`tasks/stage2.py` turn a batch into named losses. Checkpoints (every `save_every` steps and at the end;
`tasks/checkpointing.py`) let `resume=auto` continue from the newest complete one and reproduce the uninterrupted
run; the optimizer groups and lr schedule are `tasks/optim.py`'s.

Outputs in `output_dir`: `log.jsonl` (one line per `log_every` steps), `tb/` (TensorBoard), `checkpoints/ckpt-*`,
`final/` (a checkpoint folder for evaluation, conversion, or stage 2's `init_from`), `config.yaml`, and `run.lock`
while the run lasts (one run per folder; `log.jsonl` and the lock are `tasks/run_folder.py`'s). After
`max_nonfinite_steps` consecutive non-finite steps the run stops with `TrainingDiverged`, without `final/`.

Test-only hooks, set through the environment so that they never appear in a run's config:
`QFORMER_TEST_CRASH_AT_STEP=N` SIGKILLs the process after step N (resume tests); `QFORMER_TEST_LOG_SAMPLE_IDS=1`
has each rank write the image ids of every step to `samples_rankR.jsonl` (data-sharding tests).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from qformer.cpu_malloc import keep_freed_memory
from qformer.dist import get_rank, get_world_size
from qformer.dtypes import to_dtype
from tasks import command
from tasks.checkpointing import find_resume, resume_from, save_checkpoint
from tasks.command import add_config_arguments, config_and_overrides
from tasks.config import TrainConfig, load_config, to_yaml
from tasks.dist import setup_distributed, teardown_distributed
from tasks.optim import build_optimizer, set_lr
from tasks.run_folder import json_line, lock_run_folder, start_log, truncate_log
from tasks.throughput import device_peak_tflops, throughput_fields, train_flops_per_sample
from tasks.train_data import build_loader

logger = logging.getLogger(__name__)

CRASH_AT_STEP_ENV = "QFORMER_TEST_CRASH_AT_STEP"
LOG_SAMPLE_IDS_ENV = "QFORMER_TEST_LOG_SAMPLE_IDS"


class TrainingDiverged(command.RunFailed):
    """`max_nonfinite_steps` consecutive steps had a non-finite loss: the run stops (one line, exit code 1)."""


# -- set-up ---------------------------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig):
    """(model, tokenizer) for the configured stage: stage 1 from a BERT folder, stage 2 from a stage-1 checkpoint."""
    from qformer.bert import init_from_bert, load_tokenizer

    if cfg.stage == "stage1":
        from qformer.blip2 import Blip2Stage1

        if not cfg.bert:
            raise ValueError("stage 1 needs `bert`: a BERT folder for the tokenizer and the text-side initialisation")
        tokenizer = load_tokenizer(cfg.bert)
        if len(tokenizer) != cfg.model.qformer.vocab_size:
            raise ValueError(
                f"model.qformer.vocab_size={cfg.model.qformer.vocab_size} but the tokenizer of {cfg.bert} "
                f"has {len(tokenizer)} entries ([DEC] included)"
            )
        model = Blip2Stage1(cfg.model)
        if cfg.init_from:  # fine-tuning: start from a stage-1 checkpoint of ours rather than from BERT
            _load_same_stage(model, cfg.init_from)
        else:
            init_from_bert(model.qformer, cfg.bert)
        return model, tokenizer
    from qformer.stage2 import Blip2Stage2, init_from_stage1

    qformer_tokenizer = None
    if cfg.model.llm.qformer_instruction:  # the Q-Former reads instructions in its own (BERT) tokens
        if not cfg.bert:
            raise ValueError("llm.qformer_instruction needs `bert`: the BERT folder of the Q-Former's tokenizer")
        qformer_tokenizer = load_tokenizer(cfg.bert)
    model = Blip2Stage2(cfg.model, qformer_tokenizer=qformer_tokenizer)
    if cfg.init_from:
        from qformer.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_state_dict

        stage = json.loads((Path(cfg.init_from) / CONFIG_NAME).read_text())["stage"]
        if stage == "stage2":  # fine-tuning a stage-2 model (e.g. COCO captioning)
            _load_same_stage(model, cfg.init_from, text_from=cfg.init_text_from)
        else:
            init_from_stage1(model, read_state_dict(Path(cfg.init_from) / WEIGHTS_NAME), source=cfg.init_from)
    else:
        logger.warning("stage 2 without init_from: the Q-Former starts from its random initialisation")
    return model, model.tokenizer


def _load_same_stage(model: nn.Module, folder: str, text_from: str = "") -> None:
    """Every weight of a checkpoint of the same stage, strictly; the frozen ViT and LLM come from their own files
    (so a ViT at another image size, e.g. 364 px fine-tuning, is resampled from `model.vision.weights`).
    text_from: a stage-1 checkpoint whose Q-Former text side (embeddings, text FFN) fills what a plain stage-2
    checkpoint lacks, for an instruction-aware model fine-tuned from it (BLIP-2 VQA fine-tuning, InstructBLIP)."""
    from qformer.checkpoint import WEIGHTS_NAME, read_state_dict
    from qformer.convert import check_state_dict

    state = read_state_dict(Path(folder) / WEIGHTS_NAME)
    state = {k: v for k, v in state.items() if not k.startswith(("visual.", "llm."))}
    if text_from:
        wanted = {k for k in model.state_dict() if k.startswith("qformer.")} - set(state)
        text = {k: v for k, v in read_state_dict(Path(text_from) / WEIGHTS_NAME).items() if k in wanted}
        logger.info("%d Q-Former text-side tensors from %s", len(text), text_from)
        state.update(text)
    check_state_dict(model, state, source=folder, allowed_missing=["visual.", "llm."])
    model.load_state_dict(state, strict=False)
    logger.info("initialised from %s (%d tensors)", folder, len(state))


def freeze_redundant(model: nn.Module) -> None:
    """Key biases cannot change any output (softmax is shift-invariant per row), so their true gradient is zero:
    freeze them rather than let Adam turn rounding noise into steps, and let DDP see no unused parameter."""
    for name, module in model.named_modules():
        if name.endswith(("self_attn", "cross_attn")) and hasattr(module, "k"):
            module.k.bias.requires_grad_(False)


def build_objective(cfg: TrainConfig, model: nn.Module, tokenizer, rank: int = 0):
    """What turns a batch into named losses for the configured stage (`Stage1Objective` or `Stage2Objective`: a
    call on a batch, and `state_dict`/`load_state_dict` for what it must carry across a resume)."""
    if cfg.stage == "stage1":
        from tasks.stage1 import Stage1Objective

        return Stage1Objective(
            model,
            tokenizer,
            max_text_length=cfg.model.max_text_length,
            use_image_ids=cfg.use_image_ids,
            temp_clamp=tuple(cfg.itc_temp_clamp) if cfg.itc_temp_clamp is not None else None,
        )
    from tasks.stage2 import Stage2Objective

    return Stage2Objective(model, seed=cfg.seed + rank)  # each rank its own prefix-LM split sequence


class TrainStep(nn.Module):
    """What DDP wraps: only trainable submodules are registered, the frozen ViT and LLM stay outside."""

    def __init__(self, model: nn.Module, objective):
        super().__init__()
        self.trainable = nn.ModuleDict(
            {n: m for n, m in model.named_children() if any(p.requires_grad for p in m.parameters())}
        )
        self.direct = nn.ParameterDict(
            {n: p for n, p in model.named_parameters(recurse=False) if p.requires_grad}
        )  # e.g. the ITC temperature
        object.__setattr__(self, "model", model)  # not registered: DDP must not see the frozen parts
        self.objective = objective

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.objective(batch)


# -- the loop -------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> Path:
    """Run training as `cfg` says; returns the `final/` folder. One run per `output_dir`: its lock is held
    throughout (rank 0) and released however the run ends."""
    device = setup_distributed()
    if device.type == "cpu":
        keep_freed_memory()  # each step frees and makes again the same large blocks: reuse them (qformer.cpu_malloc)
    out = Path(cfg.output_dir)
    lock = lock_run_folder(out)
    try:
        return _train(cfg, device, out)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, device: torch.device, out: Path) -> Path:
    rank, world = get_rank(), get_world_size()
    if rank == 0:
        (out / "config.yaml").write_text(to_yaml(cfg))
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model, tokenizer = build_model(cfg)
    model.to(device)
    freeze_redundant(model)
    if cfg.vit_grad_checkpointing and getattr(model, "visual", None) is not None:
        model.visual.model.set_grad_checkpointing(True)
    objective = build_objective(cfg, model, tokenizer, rank)
    flops = train_flops_per_sample(cfg, model, world)
    peak = device_peak_tflops(device, cfg.peak_tflops)
    logger.info("model FLOPs per sample (training): %s; peak %s TFLOP/s", flops.describe(), peak)
    step_module = TrainStep(model, objective)
    ddp = step_module
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = build_optimizer(model, cfg)
    dtype = to_dtype(cfg.precision)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    loader = build_loader(cfg, rank, world, seed=cfg.seed)

    crash_at_step = int(os.environ.get(CRASH_AT_STEP_ENV, "0"))
    log_sample_ids = os.environ.get(LOG_SAMPLE_IDS_ENV, "") == "1"

    start, counters = 0, {}
    ckpt = find_resume(out, cfg.resume, world)
    if ckpt is not None:
        start, counters = resume_from(
            ckpt, model=model, optimizer=optimizer, scaler=scaler, loader=loader, objective=objective, device=device
        )
        if log_sample_ids:
            truncate_log(out / f"samples_rank{rank}.jsonl", start)
    else:
        torch.manual_seed(cfg.seed + 1 + rank)  # ranks draw different negatives and dropout masks

    if rank == 0:  # a resumed run keeps the lines up to `start`; a fresh one starts a fresh log
        start_log(out / "log.jsonl", resumed_at=start if ckpt is not None else None)
    writer = _tensorboard(out, cfg) if rank == 0 else None
    bar = _progress(start, cfg) if rank == 0 else None
    log_file = (out / "log.jsonl").open("a") if rank == 0 else None
    ids_file = (out / f"samples_rank{rank}.jsonl").open("a") if log_sample_ids else None
    try:
        batches = iter(loader)
        window_t, window_n, non_finite = time.perf_counter(), 0, counters.get("non_finite_steps", 0)
        streak = 0  # consecutive non-finite steps, for the divergence policy
        speed: dict[str, float] = {}
        model.train()
        for step in range(start + 1, cfg.optim.total_steps + 1):
            lr = set_lr(optimizer, step, cfg)
            totals: dict[str, float] = {}
            for micro in range(cfg.optim.grad_accum):
                batch = next(batches)
                batch["image"] = batch["image"].to(device, non_blocking=True)
                sync = micro == cfg.optim.grad_accum - 1 or world == 1
                ctx = ddp.no_sync() if not sync and world > 1 else contextlib.nullcontext()
                with ctx, torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    losses = ddp(batch)
                    loss = losses["loss"] / cfg.optim.grad_accum
                (scaler.scale(loss) if scaler else loss).backward()
                for k, v in losses.items():
                    totals[k] = totals.get(k, 0.0) + float(v.detach()) / cfg.optim.grad_accum
                window_n += batch["image"].shape[0]  # this rank's
                if ids_file:
                    ids_file.write(json.dumps({"step": step, "image_id": batch["image_id"].tolist()}) + "\n")
            finite = torch.tensor(float(math.isfinite(totals["loss"])), device=device)
            if world > 1:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() == 1.0:
                if scaler:
                    scaler.unscale_(optimizer)
                if cfg.optim.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(
                        [p for p in model.parameters() if p.requires_grad], cfg.optim.clip_grad
                    )
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                streak = 0
            else:
                streak += 1
                non_finite += 1
                logger.warning("step %d: non-finite loss %s, update skipped (%d so far)", step, totals, non_finite)
            optimizer.zero_grad(set_to_none=True)

            if rank == 0 and (step % cfg.log_every == 0 or step == cfg.optim.total_steps):
                now = time.perf_counter()
                speed = throughput_fields(window_n, now - window_t, world, flops.total, peak)
                record = {"step": step, "lr": lr, **totals, **speed}
                record.update({"skipped_samples": loader.skipped, "non_finite_steps": non_finite})
                log_file.write(json_line(record))
                log_file.flush()
                if writer:
                    for k, v in record.items():
                        if k != "step":
                            writer.add_scalar(f"train/{k}", v, step)
                window_t, window_n = now, 0
            if bar is not None:
                bar.update(1)
                shown = {k: f"{speed[k]:.3g}" for k in ("samples_per_s_total", "tflops_per_s", "mfu") if k in speed}
                bar.set_postfix(loss=f"{totals['loss']:.3f}", lr=f"{lr:.2e}", **shown)
            if streak and cfg.max_nonfinite_steps and streak >= cfg.max_nonfinite_steps:
                raise TrainingDiverged(_diverged(out, step, streak, totals["loss"], cfg))
            # No checkpoint of non-finite weights, nor on a non-finite step (but at the end): with keep_last they
            # would push the good ones out.
            save = (step % cfg.save_every == 0 and not streak) or step == cfg.optim.total_steps
            if save and not _finite_weights(model, device):
                logger.warning("step %d: the trainable weights are not finite; no checkpoint written", step)
            elif save:
                rank_state = {"data": loader.state_dict(), "objective": objective.state_dict()}
                save_checkpoint(
                    out, step, model, optimizer, scaler, cfg, rank_state, counters={"non_finite_steps": non_finite}
                )
            if crash_at_step and step == crash_at_step:
                for f in (log_file, ids_file):
                    if f:
                        f.flush()
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection: the real thing, no clean-up

    finally:  # also when a step raises (too many bad images, a NaN-free but failing batch, Ctrl-C)
        if bar is not None:
            bar.close()
        for f in (log_file, ids_file):
            if f:
                f.close()
        loader.write_skipped(out)
        if writer:
            writer.close()
    final = out / "final"
    if rank == 0:
        from qformer.checkpoint import save_pretrained

        save_pretrained(model, final, tokenizer=tokenizer if cfg.stage == "stage1" else None)
        logger.info("%s; %d non-finite steps skipped", loader.skip_summary(), non_finite)
    teardown_distributed()
    return final


def _finite_weights(model: nn.Module, device: torch.device) -> bool:
    """Whether every trainable weight is finite, on every rank (so that all ranks agree on saving)."""
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)
    flag = torch.tensor(float(finite), device=device)
    if get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.item() == 1.0


def _diverged(out: Path, step: int, streak: int, loss: float, cfg: TrainConfig) -> str:
    """The one line a diverged run ends with: where, and what is left to resume from."""
    kept = sorted(p.name for p in (out / "checkpoints").glob("ckpt-*") if not p.name.endswith(".tmp"))
    left = f"the newest checkpoint is {out / 'checkpoints' / kept[-1]}" if kept else "no checkpoint was written"
    return (
        f"training diverged: the loss was not finite ({loss}) for {streak} consecutive steps "
        f"(steps {step - streak + 1}-{step}, max_nonfinite_steps={cfg.max_nonfinite_steps}); {left}. "
        "Lower optim.lr (or raise optim.warmup_steps, set optim.clip_grad), or set max_nonfinite_steps=0 to go on"
    )


def _tensorboard(out: Path, cfg: TrainConfig):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.warning("tensorboard is not installed: logging to log.jsonl only")
        return None
    return SummaryWriter(str(out / "tb"))


def _progress(start: int, cfg: TrainConfig):
    from tqdm import tqdm

    return tqdm(total=cfg.optim.total_steps, initial=start, desc=cfg.stage, unit="step", dynamic_ncols=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `qformer train` and `python -m tasks.train`."""
    add_config_arguments(parser, "configs/stage1_vitg.yaml", "optim.lr=5e-5 data.batch_size=64")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(*config_and_overrides(args))  # an unknown key or a bad value stops here, before any work
    if getattr(args, "print_config", False):
        print(to_yaml(cfg), end="")
        return 0
    train(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    return command.main("train", add_arguments, run, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
