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
