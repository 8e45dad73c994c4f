"""Run by tests/train/test_distributed_compile.py under torchrun: four short runs in one pair of ranks.

``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/train/_compile_ranks.py LOGS``
trains DDP eager, DDP ``--torchcompile``, FSDP2 eager and FSDP2 ``--torchcompile`` one after the other,
in the same processes (one start-up and one process group instead of four: the group stays up
between the runs and is destroyed once at the end). Exits with the first failing run's status.
"""

from __future__ import annotations

import sys

from lcl_fast.train import main
from lcl_fast.training import distributed as D

RUNS = {
    "ddp_eager": [],
    "ddp_compiled": ["--torchcompile"],
    "fsdp_eager": ["--fsdp"],
    "fsdp_compiled": ["--fsdp", "--torchcompile"],
}


def run_all(logs: str) -> int:
    common = ["--steps", "10", "--batch-size", "8", "--val-pairs", "0", "--log-every-n-steps", "1",
              "--logs-dir", logs, "--no-progress"]  # fmt: skip
    cleanup, D.cleanup = D.cleanup, lambda drain=False: None  # keep the group for the next run
    try:
        for name, extra in RUNS.items():
            status = main(common + ["--name", name] + extra)
            if status:
                return status
        cleanup(drain=True)
        return 0
    finally:
        D.cleanup = cleanup


if __name__ == "__main__":
    sys.exit(run_all(sys.argv[1]))
