"""torchrun --max-restarts: after a killed rank the next round forms its process group again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lcl_fast.training import distributed as D


def test_restart_store_only_under_torchrun(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert D.restart_store(0, 1, D.datetime.timedelta(seconds=1)) is None


def test_killed_rank_restarts_and_reconnects(tmp_path):
    # Before the per-round store prefix, round 1 could read the dead round-0 peer's gloo address
    # from torchrun's shared store: "connectFullMesh failed … Connection refused" until the timeout.
    worker = Path(__file__).with_name("_restart_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=2", str(worker)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Connection refused" not in out
    assert "done rank 0 restart 1" in out and "done rank 1 restart 1" in out
