"""keep_freed_memory: freed host memory serves the next allocation instead of fresh pages."""

import subprocess
import sys

import pytest

_PROBE = r"""
import resource, sys, torch
from lcl_fast.training.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
for _ in range(8):  # warm: the first rounds fault pages in while the heap settles
    torch.ones(48 * 2**20 // 4).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # 48 MiB, allocated, written and freed: above glibc's largest mmap threshold
    torch.ones(48 * 2**20 // 4).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_freed_memory_is_reused_without_page_faults():
    pages = 20 * 48 * 2**20 // 4096  # what fresh pages every round would fault in
    default, kept = _faults("default"), _faults("keep")
    assert default > pages // 2, f"the probe should fault with the default policy ({default} faults)"
    assert kept < pages // 5, f"{kept} page faults with freed memory kept (default: {default})"
