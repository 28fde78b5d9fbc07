"""The training loop for stage 1 and stage 2: `python -m tasks.train CONFIG [key=value ...]` (or `qformer train`).

Runs as plain python or under torchrun (one node or many; NCCL on GPU, gloo on CPU). DDP wraps only the trainable
modules; the frozen ViT and LLM stay outside it. Checkpoints (every `save_every` steps and at the end) hold the
trainable weights, optimizer, scaler, step, data position and every rank's RNG states; `resume=auto` continues
from the newest complete one and reproduces the uninterrupted run.

Outputs in `output_dir`: `log.jsonl` (one line per `log_every` steps), `tb/` (TensorBoard), `checkpoints/ckpt-*`,
`final/` (a checkpoint folder for evaluation, conversion, or stage 2's `init_from`), `config.yaml`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from qformer.dist import get_rank, get_world_size
from tasks.config import ConfigError, TrainConfig, load_config, to_yaml
from tasks.train_data import build_loader

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# -- set-up ---------------------------------------------------------------------------------------------------------


def setup_distributed() -> torch.device:
    """Join the process group torchrun describes (if any); returns this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


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

    model = Blip2Stage2(cfg.model)
    if cfg.init_from:
        from qformer.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_state_dict

        stage = json.loads((Path(cfg.init_from) / CONFIG_NAME).read_text())["stage"]
        if stage == "stage2":  # fine-tuning a stage-2 model (e.g. COCO captioning)
            _load_same_stage(model, cfg.init_from)
        else:
            init_from_stage1(model, read_state_dict(Path(cfg.init_from) / WEIGHTS_NAME), source=cfg.init_from)
    else:
        logger.warning("stage 2 without init_from: the Q-Former starts from its random initialisation")
    return model, model.tokenizer


def _load_same_stage(model: nn.Module, folder: str) -> None:
    """Every weight of a checkpoint of the same stage, strictly; the frozen ViT and LLM come from their own files
    (so a ViT at another image size, e.g. 364 px fine-tuning, is resampled from `model.vision.weights`)."""
    from qformer.checkpoint import WEIGHTS_NAME, read_state_dict
    from qformer.convert import check_state_dict

    state = read_state_dict(Path(folder) / WEIGHTS_NAME)
    state = {k: v for k, v in state.items() if not k.startswith(("visual.", "llm."))}
    check_state_dict(model, state, source=folder, allowed_missing=["visual.", "llm."])
    model.load_state_dict(state, strict=False)
    logger.info("initialised from %s (%d tensors)", folder, len(state))


def freeze_redundant(model: nn.Module) -> None:
    """Key biases cannot change any output (softmax is shift-invariant per row), so their true gradient is zero:
    freeze them rather than let Adam turn rounding noise into steps, and let DDP see no unused parameter."""
    for name, module in model.named_modules():
        if name.endswith(("self_attn", "cross_attn")) and hasattr(module, "k"):
            module.k.bias.requires_grad_(False)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms and 1-D parameters; layer-wise lr decay on an unfrozen ViT."""
    optim = cfg.optim
    visual = getattr(model, "visual", None)
    depth = getattr(visual, "depth", 0) if visual is not None else 0
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or name.endswith(".bias") or "norm" in name or "ln_vision" in name
        scale = 1.0
        if name.startswith("visual."):
            scale = optim.vit_lr_scale
            if optim.layer_decay != 1.0 and depth:
                layer = _vit_layer(name, depth)
                scale *= optim.layer_decay ** (depth + 1 - layer)
        groups.setdefault((no_decay, scale), []).append(p)
    return [
        {"params": ps, "weight_decay": 0.0 if nd else optim.weight_decay, "lr_scale": s}
        for (nd, s), ps in sorted(groups.items(), key=lambda kv: kv[0])
    ]


def _vit_layer(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for anything after the blocks."""
    parts = name.split(".")
    if "blocks" in parts:
        return int(parts[parts.index("blocks") + 1]) + 1
    if any(k in name for k in ("patch_embed", "pos_embed", "cls_token", "norm_pre")):
        return 0
    return depth + 1


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup from warmup_lr to lr, then a per-step cosine down to min_lr at total_steps."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.warmup_lr + (o.lr - o.warmup_lr) * step / max(1, o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / max(1, o.total_steps - o.warmup_steps))
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))


class TrainStep(nn.Module):
    """What DDP wraps: only trainable submodules are registered, the frozen ViT and LLM stay outside."""

    def __init__(self, model: nn.Module, stage: str, tokenizer, max_text_length: int, use_image_ids: bool):
        super().__init__()
        self.trainable = nn.ModuleDict(
            {n: m for n, m in model.named_children() if any(p.requires_grad for p in m.parameters())}
        )
        self.direct = nn.ParameterDict(
            {n: p for n, p in model.named_parameters(recurse=False) if p.requires_grad}
        )  # e.g. the ITC temperature
        object.__setattr__(self, "model", model)  # not registered: DDP must not see the frozen parts
        self.stage = stage
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length
        self.use_image_ids = use_image_ids

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        if self.stage == "stage2":
            return {"loss": self.model(batch["text_input"], images=images)["loss"]}
        from tasks.stage1 import stage1_losses

        # LAVIS pads every caption to max_text_length; padding to the batch's longest gives the same losses (pad
        # keys are masked out of attention, pad labels ignored) at a fraction of the text passes' cost.
        enc = self.tokenizer(
            batch["text_input"],
            padding="longest",
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
        ).to(images.device)
        return stage1_losses(
            self.model,
            enc.input_ids,
            enc.attention_mask,
            images=images,
            image_ids=batch["image_id"].to(images.device) if self.use_image_ids else None,
            bos_token_id=self.tokenizer.bos_token_id,
        )


# -- checkpoints ----------------------------------------------------------------------------------------------------


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def save_checkpoint(out: Path, step: int, model, optimizer, scaler, loader_state: dict, cfg: TrainConfig) -> Path:
    """`checkpoints/ckpt-STEP`: written under a temporary name by every rank, renamed by rank 0 once complete."""
    rank, world = get_rank(), get_world_size()
    final = out / "checkpoints" / f"ckpt-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    torch.save({"rng": _rng_state(), "data": loader_state}, tmp / f"rank{rank}.pt")
    if rank == 0:
        trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, tmp / "trainable.safetensors")
        torch.save(
            {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None, "step": step},
            tmp / "state.pt",
        )
        (tmp / "config.yaml").write_text(to_yaml(cfg))
        meta = {"step": step, "world_size": world, "git_commit": git_commit(), "time": time.time()}
        (tmp / "meta.json").write_text(json.dumps(meta))
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        kept = sorted(p for p in final.parent.glob("ckpt-*") if not p.name.endswith(".tmp"))
        for old in kept[: -cfg.keep_last] if cfg.keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _valid(ckpt: Path, world: int) -> bool:
    """A checkpoint is used only if every file is there and readable (a truncated file means a crash mid-write)."""
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
        if meta["world_size"] != world:
            logger.warning("%s was written by %d processes, this run has %d", ckpt, meta["world_size"], world)
            return False
        load_file(ckpt / "trainable.safetensors")
        torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
        for r in range(world):
            torch.load(ckpt / f"rank{r}.pt", map_location="cpu", weights_only=False)
        return True
    except Exception as e:  # any damage: fall back to the previous checkpoint
        logger.warning("checkpoint %s is not usable (%s: %s); trying an older one", ckpt, type(e).__name__, e)
        return False


def find_resume(out: Path, resume: str, world: int) -> Path | None:
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not _valid(path, world):
            raise ValueError(f"resume checkpoint {path} is missing or damaged")
        return path
    for ckpt in sorted((out / "checkpoints").glob("ckpt-*"), reverse=True):
        if not ckpt.name.endswith(".tmp") and _valid(ckpt, world):
            return ckpt
    return None


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# -- the loop -------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> Path:
    device = setup_distributed()
    rank, world = get_rank(), get_world_size()
    out = Path(cfg.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model, tokenizer = build_model(cfg)
    model.to(device)
    freeze_redundant(model)
    if cfg.vit_grad_checkpointing and getattr(model, "visual", None) is not None:
        model.visual.model.set_grad_checkpointing(True)
    step_module = TrainStep(model, cfg.stage, tokenizer, cfg.model.max_text_length, cfg.use_image_ids)
    ddp = step_module
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
    dtype = DTYPES[cfg.precision]
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    loader = build_loader(cfg, rank, world, seed=cfg.seed)

    start = 0
    ckpt = find_resume(out, cfg.resume, world)
    if ckpt is not None:
        trainable = load_file(ckpt / "trainable.safetensors", device=str(device))
        params = dict(model.named_parameters())
        missing = sorted(n for n, p in params.items() if p.requires_grad and n not in trainable)
        if missing or any(n not in params for n in trainable):
            raise ValueError(f"{ckpt} does not fit this model: missing {missing}")
        with torch.no_grad():
            for n, v in trainable.items():
                params[n].copy_(v)
        state = torch.load(ckpt / "state.pt", map_location=device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        mine = torch.load(ckpt / f"rank{rank}.pt", map_location="cpu", weights_only=False)
        loader.load_state_dict(mine["data"])
        _set_rng_state(mine["rng"])
        start = state["step"]
        logger.info("resumed from %s at step %d", ckpt, start)
        if rank == 0:
            _truncate_log(out / "log.jsonl", start)
        if cfg.log_sample_ids:
            _truncate_log(out / f"samples_rank{rank}.jsonl", start)
    else:
        torch.manual_seed(cfg.seed + 1 + rank)  # ranks draw different negatives and dropout masks

    writer = _tensorboard(out, cfg) if rank == 0 else None
    bar = _progress(start, cfg) if rank == 0 else None
    log_file = (out / "log.jsonl").open("a") if rank == 0 else None
    ids_file = (out / f"samples_rank{rank}.jsonl").open("a") if cfg.log_sample_ids else None
    try:
        batches = iter(loader)
        window_t, window_n, non_finite = time.perf_counter(), 0, 0
        model.train()
        for step in range(start + 1, cfg.optim.total_steps + 1):
            lr = lr_at(step - 1, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            totals: dict[str, float] = {}
            for micro in range(cfg.optim.grad_accum):
                batch = next(batches)
                batch["image"] = batch["image"].to(device, non_blocking=True)
                sync = micro == cfg.optim.grad_accum - 1 or world == 1
                ctx = ddp.no_sync() if not sync and world > 1 else _null()
                with ctx, torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    losses = ddp(batch)
                    loss = losses["loss"] / cfg.optim.grad_accum
                (scaler.scale(loss) if scaler else loss).backward()
                for k, v in losses.items():
                    totals[k] = totals.get(k, 0.0) + float(v.detach()) / cfg.optim.grad_accum
                window_n += batch["image"].shape[0] * world
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
            else:
                non_finite += 1
                logger.warning("step %d: non-finite loss %s, update skipped (%d so far)", step, totals, non_finite)
            optimizer.zero_grad(set_to_none=True)

            if rank == 0 and (step % cfg.log_every == 0 or step == cfg.optim.total_steps):
                now = time.perf_counter()
                record = {"step": step, "lr": lr, **totals, "samples_per_s": window_n / max(now - window_t, 1e-9)}
                record.update({"skipped_samples": loader.skipped, "non_finite_steps": non_finite})
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                if writer:
                    for k, v in record.items():
                        if k != "step":
                            writer.add_scalar(f"train/{k}", v, step)
                window_t, window_n = now, 0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{totals['loss']:.3f}", lr=f"{lr:.2e}")
            if step % cfg.save_every == 0 or step == cfg.optim.total_steps:
                save_checkpoint(out, step, model, optimizer, scaler, loader.state_dict(), cfg)
            if cfg.crash_at_step and step == cfg.crash_at_step:
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
    _barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    return final


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step (written after the checkpoint, before the crash)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("usage: python -m tasks.train CONFIG.yaml [key=value ...]")
        return 0 if argv else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config, overrides = (argv[0], argv[1:]) if not argv[0].count("=") else (None, argv)
    try:
        cfg = load_config(config, overrides)  # an unknown key or a bad value stops here, before any work
    except ConfigError as e:
        print(f"qformer train: error: {e}", file=sys.stderr)
        return 2
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
