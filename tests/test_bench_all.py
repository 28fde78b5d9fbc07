"""`scripts/bench_all.py --smoke`: every benchmark section runs at tiny size on the CPU and lands in the JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("qformer", "stage1", "stage2_opt", "stage2_t5", "generate", "retrieval")


def test_bench_all_smoke_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "scripts/bench_all.py", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "smoke" and set(report["sections"]) == set(SECTIONS)
    sections = report["sections"]
    assert not [name for name, r in sections.items() if "error" in r]
    for phase in ("eval", "train"):
        assert sections["qformer"][phase]["ours_ms"] > 0 and sections["qformer"][phase]["ratio"] > 0
    for step in ("stage1", "stage2_opt", "stage2_t5"):
        r = sections[step]
        assert r["samples_per_s"] > 0 and r["tflops_per_s"] > 0 and r["peak_gib"] > 0, r
        assert r["mfu"] is None  # no peak known for a CPU
    assert {"captions", "vqa"} <= set(sections["generate"])
    retrieval = sections["retrieval"]
    assert retrieval["pairs"] > 1 and math.isfinite(retrieval["max_score_difference"])
    assert retrieval["max_score_difference"] < 1e-4
    for section in SECTIONS:  # the summary table names every section
        assert f"\n{section} " in proc.stdout
