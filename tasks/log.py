"""Logging setup, the one place: every command gets the same level and line format however it starts
(`qformer X`, `python -m tasks.X`, torchrun)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """Root logging for a command (idempotent: a second call only changes the level)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=FORMAT)
    root.setLevel(level)
