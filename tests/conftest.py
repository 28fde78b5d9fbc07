import os

# Nothing in the suite may reach a hub: every checkpoint a test loads, the test makes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from a second thread, and with other processes on the same cores (torchrun ranks,
# DataLoader workers) OpenMP's barriers turn milliseconds into seconds.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shapes_demo(tmp_path_factory):
    """`qformer demo --fast`, run once for the session as a user runs it (a subprocess through the CLI, two threads
    while it holds the machine): its output folder. The stage-0 tests read the components it trained."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("shapes_demo")
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "demo", "--fast", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = proc.stdout + proc.stderr
    (out / "demo.log").write_text(log)
    assert proc.returncode == 0, log[-5000:]
    return out
