"""``torchrun --nproc_per_node=2 -m lcl_fast.train``: two gloo ranks on the CPU, DDP, one checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from lcl_fast.training.checkpoint import latest_checkpoint, load_checkpoint_file


def test_torchrun_two_gloo_ranks(corpus_cache, tmp_path):
    # --logs-dir, not --logs: torchrun's own --logs-specs makes the latter an ambiguous abbreviation.
    logs = tmp_path / "logs"
    env = {**os.environ, "LCL_FAST_CACHE": str(corpus_cache), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "lcl_fast.train",
        "--steps",
        "6",
        "--batch-size",
        "8",
        "--val-pairs",
        "24",
        "--log-every-n-steps",
        "1",
        "--logs-dir",
        str(logs),
        "--name",
        "ddp",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = logs / "ddp"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6 and summary["skipped"]["nonfinite_steps"] == 0
    assert summary["retrieval_top1_before"] is not None and summary["chance"] == 1 / 24
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 7))
    assert all(r["loss"] is not None and r["samples_per_s"] > 0 for r in lines)
    assert "[rank 1]" not in (run / "out.log").read_text()  # only rank 0 writes the log
    ckpt = load_checkpoint_file(latest_checkpoint(run))
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and len(ckpt["data"]) == 2
    assert [d["config"]["rank"] for d in ckpt["data"]] == [0, 1]  # each rank's own data position
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
