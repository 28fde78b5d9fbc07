"""`qformer.cpu_malloc.keep_large_blocks`: after it, blocks of the Q-Former's intermediate sizes (8-30 MB) are
reused from the heap instead of mapped afresh and page-faulted in at every allocation. Run in fresh processes: the
setting is process-wide and only ever raised.

The pattern measured is the one glibc maps every time: each block larger than the one freed before it (glibc's
dynamic threshold rises only to the size of the block just freed). Measured on the dev box: every page of every block
faulted in (1.00 faults a page) left as glibc has it; 0.17-0.25 once the thresholds are raised (only the heap's
growth faults). A real paper-size forward (`scripts/bench_qformer.py`) went from ~50,000 faults to 38."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import torch

    if sys.argv[1] == "keep":
        from qformer.cpu_malloc import keep_large_blocks
        assert keep_large_blocks() and keep_large_blocks()  # once per process, True again after
    elif sys.argv[1] == "qformer":
        from qformer import QFormer, QFormerConfig
        cfg = QFormerConfig.preset("tiny")
        QFormer(cfg)(image_embeds=torch.randn(1, 3, cfg.encoder_width))  # a CPU pass with an image sets it
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    sizes = range(8, 32, 2)  # MB
    for mb in sizes:
        torch.ones(mb * 2**20 // 4)  # written in full, then freed
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / sum(mb * 256 for mb in sizes))
    """
)


def _faults_per_page(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_large_blocks_are_reused_instead_of_remapped():
    assert _faults_per_page("none") > 0.9
    assert _faults_per_page("keep") < 0.5
    assert _faults_per_page("qformer") < 0.5
