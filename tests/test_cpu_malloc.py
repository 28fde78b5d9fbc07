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


FREED_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import torch

    from qformer.cpu_malloc import keep_freed_memory, keep_large_blocks

    if "large" in sys.argv[1]:
        assert keep_large_blocks()
    if "freed" in sys.argv[1]:
        assert keep_freed_memory() and keep_freed_memory()
    if "qformer" in sys.argv[1]:  # a Q-Former pass after it (keep_large_blocks) must not undo it
        from qformer import QFormer, QFormerConfig
        cfg = QFormerConfig.preset("tiny")
        QFormer(cfg)(image_embeds=torch.randn(1, 3, cfg.encoder_width))
    block = lambda: torch.ones(64 * 2**20 // 4)  # 64 MB, above glibc's 32 MiB mmap ceiling; written, then freed
    for _ in range(4):  # the heap settles (it grows over the first few)
        block()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(6):  # as a training step makes its vocabulary-sized gradients again
        block()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (6 * 64 * 256))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_training_processes_reuse_blocks_above_the_mmap_ceiling():
    """`keep_freed_memory` (the trainer's, on a CPU): 64 MB blocks, freed and made again as a training step's
    vocabulary-sized gradients are, are reused once the heap has grown. Measured: 1.00 faults a page as glibc has it
    and after `keep_large_blocks` (the block is above what it can keep), 0.00 after `keep_freed_memory`."""
    run = lambda mode: float(  # noqa: E731
        subprocess.run([sys.executable, "-c", FREED_SCRIPT, mode], capture_output=True, text=True, check=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    assert run("none") > 0.9
    assert run("large") > 0.9
    assert run("freed") < 0.1
    assert run("large,freed") < 0.1
    assert run("freed,qformer") < 0.1
