"""A run's output folder: one run at a time (`run.lock`), and its `log.jsonl` (fresh or resumed, strict JSON).

The lock is a file created exclusively in `output_dir`, holding the pid, host and start time of the process that
took it; under torchrun only rank 0 takes it. A lock whose holder is gone (a SIGKILLed run) is taken over with a
warning; this is decided only on the holder's own host: from another host the lock is respected, and the message
says how to remove it. `log.jsonl` is strict JSON (non-finite numbers are written as null). A fresh run moves an
existing log aside (`log-<its last write time>.jsonl`) rather than appending to it; a resumed run keeps the lines
up to the step it resumes from and appends its own.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from tasks.dist import on_rank0

logger = logging.getLogger(__name__)

__all__ = ["LOCK_NAME", "RunFolderBusy", "RunLock", "json_line", "lock_run_folder", "start_log", "truncate_log"]

LOCK_NAME = "run.lock"


class RunFolderBusy(ValueError):
    """Another live run holds the output folder (a ValueError: the CLI prints it as one line)."""


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, Linux), to tell a live holder from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in (...) may hold spaces
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, start_ticks: int | None) -> bool:
    """Whether `pid` on this host is still the process that wrote the lock."""
    if pid == os.getpid():  # our own pid in a lock we did not take: a dead run's, its pid reused by us
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    now = _start_ticks(pid)
    return start_ticks is None or now is None or now == start_ticks


class RunLock:
    """`output_dir/run.lock`, held by this process until `release`."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def acquire(cls, folder: Path) -> RunLock:
        """Create `folder` if needed and lock it; raise RunFolderBusy when a live run holds it."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_NAME
        pid = os.getpid()
        me = {"pid": pid, "host": socket.gethostname(), "start_ticks": _start_ticks(pid), "time": time.time()}
        for _ in range(3):  # a stale lock is removed, then created again exclusively
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(path)
                if holder is None:  # gone, or being written by a run that is starting right now
                    time.sleep(0.2)
                    holder = _read(path)
                if holder is None:
                    if path.exists():
                        raise RunFolderBusy(
                            f"{folder} is locked by {path}, which cannot be read; if no run is using this folder, "
                            "delete it"
                        ) from None
                    continue
                if holder.get("host") != me["host"] or _alive(holder["pid"], holder.get("start_ticks")):
                    raise RunFolderBusy(
                        f"{folder} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
                        f"since {_when(holder.get('time'))}); wait for it to end or choose another output_dir "
                        f"(if that run is gone, delete {path})"
                    ) from None
                logger.warning(
                    "%s: taking over the lock of pid %s on %s, which is no longer running",
                    folder,
                    holder.get("pid"),
                    holder.get("host"),
                )
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            return cls(path)
        raise RunFolderBusy(f"{folder}: could not take {path}: another run is taking it at the same time")

    def release(self) -> None:
        """Remove the lock if it is still ours (a lock taken over from us is left to its new holder)."""
        holder = _read(self.path)
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)


def _read(path: Path) -> dict | None:
    """The holder a lock file names, or None if it cannot be read (a pid must be a positive int: kill(-1) is all)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(holder, dict) and isinstance(holder.get("pid"), int) and holder["pid"] > 0
    return holder if ok else None


def _when(stamp: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if isinstance(stamp, (int, float)) else "?"


def lock_run_folder(folder: Path) -> RunLock | None:
    """Rank 0 locks `folder` (the other ranks get None, and rank 0's refusal as a RuntimeError)."""
    return on_rank0(lambda: RunLock.acquire(folder), f"locking {folder}")


# -- log.jsonl ------------------------------------------------------------------------------------------------------


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def json_line(record: dict) -> str:
    """One strict-JSON line: NaN and ±inf become null (json.dumps would write the non-standard NaN/Infinity)."""
    return json.dumps({k: _finite_or_none(v) for k, v in record.items()}, allow_nan=False) + "\n"


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step (written after the checkpoint, before the crash)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


def start_log(path: Path, resumed_at: int | None) -> None:
    """Get `path` ready for appending: a resumed run keeps the lines up to `resumed_at`; a fresh run (None) moves an
    existing log aside under a name that is not taken, named after its last write."""
    if resumed_at is not None:
        truncate_log(path, resumed_at)
        return
    if not path.is_file() or path.stat().st_size == 0:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    kept = path.with_name(f"{path.stem}-{stamp}{path.suffix}")
    n = 1
    while kept.exists():
        n += 1
        kept = path.with_name(f"{path.stem}-{stamp}-{n}{path.suffix}")
    path.rename(kept)
    logger.info("a fresh run: the previous %s is kept as %s", path.name, kept.name)
