"""``--torchcompile`` on two gloo ranks, under DDP and under FSDP2: 10 steps with eager's losses.

Dynamo cannot trace a DDP or FSDP2 wrapper with ``fullgraph=True``; the trainer compiles what the
wrapper calls (the LCL module under DDP, each residual block under FSDP2) and lets the wrapper's
hooks run outside the graphs. The ``aot_eager`` backend (``LCL_FAST_COMPILE_BACKEND``) traces the
forward and backward as inductor would, without its code generation (minutes on two cores).
The four runs share one torchrun launch (``_compile_ranks.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_torchcompile_on_two_ranks_matches_eager_under_ddp_and_fsdp(corpus_cache, tmp_path):
    logs = tmp_path / "logs"
    env = {**os.environ, "LCL_FAST_CACHE": str(corpus_cache), "OMP_NUM_THREADS": "1",
           "LCL_FAST_COMPILE_BACKEND": "aot_eager"}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "_compile_ranks.py"), str(logs)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for wrapper in ("ddp", "fsdp"):
        eager, compiled = _losses(logs / f"{wrapper}_eager"), _losses(logs / f"{wrapper}_compiled")
        assert len(eager) == len(compiled) == 10
        for step, (want, got) in enumerate(zip(eager, compiled), 1):
            assert abs(got - want) <= 1e-5, (wrapper, step, got, want)
        summary = json.loads((logs / f"{wrapper}_compiled" / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == 10
        assert summary["compilations"] >= 1 and summary["compile_seconds"] > 0  # the compile time before step 1
        assert json.loads((logs / f"{wrapper}_eager" / "summary.json").read_text())["compile_seconds"] == 0
