"""End-to-end runs of ``lcl_fast.train.main`` in this process: exact resume after SIGTERM, NaN faults."""

from __future__ import annotations

import json
import os
import random
import signal

import numpy as np
import torch

import lcl_fast
from lcl_fast.loss import LCLLoss
from lcl_fast.train import main
from lcl_fast.training import loop
from lcl_fast.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint_file

QUICK = [
    "--batch-size",
    "4",
    "--no-progress",
    "--report-to",
    "none",
    "--val-pairs",
    "0",
    "--log-every-n-steps",
    "1",
    "--save-frequency",
    "0",
    "--seed",
    "7",
]


def _run(logs, name, *args) -> int:
    return main([*QUICK, "--logs", str(logs), "--name", name, *args])


def _metrics(logs, name) -> list[dict]:
    return [json.loads(x) for x in (logs / name / "metrics.jsonl").read_text().splitlines()]


def _scramble_global_rng() -> None:
    random.seed(12345)
    np.random.seed(12345)
    torch.manual_seed(12345)


def test_sigterm_then_resume_latest_continues_exactly(train_env, monkeypatch):
    args = ("--steps", "12", "--accum-freq", "2", "--keep-checkpoints", "2", "--save-every-n-steps", "4")
    assert _run(train_env, "whole", *args) == 0
    whole = _metrics(train_env, "whole")
    assert [r["step"] for r in whole] == list(range(1, 13))

    # Same run, but SIGTERM arrives while step 6 is computed: it finishes the step, saves, exits cleanly.
    real_step, calls = loop.Trainer.train_step, []

    def step_then_signal(self, batches):
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, batches)

    monkeypatch.setattr(loop.Trainer, "train_step", step_then_signal)
    assert _run(train_env, "cut", *args) == 0
    monkeypatch.undo()
    summary = json.loads((train_env / "cut" / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == 6
    assert [p.name for p in list_checkpoints(train_env / "cut")] == ["step_00000004.pt", "step_00000006.pt"]

    _scramble_global_rng()  # the checkpoint, not this process's history, must decide what comes next
    assert _run(train_env, "cut", *args, "--resume", "latest") == 0
    cut = _metrics(train_env, "cut")
    assert [r["step"] for r in cut] == list(range(1, 13))
    for key in ("loss", "contrastive_loss", "caption_loss", "lr", "grad_norm"):
        np.testing.assert_allclose(
            [r[key] for r in cut], [r[key] for r in whole], rtol=1e-6, atol=1e-6, err_msg=key
        )

    # The final checkpoints agree bit for bit, and create_model(pretrained=...) loads them.
    final_whole = load_checkpoint_file(latest_checkpoint(train_env / "whole"))
    final_cut = load_checkpoint_file(latest_checkpoint(train_env / "cut"))
    assert final_cut["step"] == final_whole["step"] == 12
    for k, v in final_whole["state_dict"].items():
        torch.testing.assert_close(final_cut["state_dict"][k], v, rtol=1e-6, atol=1e-6, msg=k)
    model = lcl_fast.create_model("LCL_tiny", pretrained=latest_checkpoint(train_env / "cut"))
    torch.testing.assert_close(
        model.lm_head[1].weight, final_cut["state_dict"]["lm_head.1.weight"], rtol=0, atol=0
    )


def _poison(monkeypatch, bad_calls):
    """LCLLoss returns a NaN generation loss on the given (1-based) calls."""
    real_forward, calls = LCLLoss.forward, []

    def forward(self, *args, **kwargs):
        calls.append(1)
        out = real_forward(self, *args, **kwargs)
        if len(calls) in bad_calls:
            out["caption_loss"] = out["caption_loss"] * float("nan")
        return out

    monkeypatch.setattr(LCLLoss, "forward", forward)


def test_nan_loss_skips_the_step(train_env, monkeypatch):
    _poison(monkeypatch, {3, 4})
    assert _run(train_env, "nan", "--steps", "7") == 0
    rows = _metrics(train_env, "nan")
    assert [r.get("skipped", False) for r in rows] == [False, False, True, True, False, False, False]
    assert (
        rows[2]["loss"] is None and rows[2]["skipped_nonfinite"] == 1 and rows[-1]["skipped_nonfinite"] == 2
    )
    assert all(r["loss"] is not None for i, r in enumerate(rows) if i not in (2, 3))
    summary = json.loads((train_env / "nan" / "summary.json").read_text())
    assert summary["skipped"]["nonfinite_steps"] == 2
    final = load_checkpoint_file(latest_checkpoint(train_env / "nan"))
    assert all(torch.isfinite(v).all() for v in final["state_dict"].values())
    # Only the five good steps updated the weights (AdamW counts its updates per parameter).
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {5}
    assert "non-finite loss or gradient" in (train_env / "nan" / "out.log").read_text()


def test_nan_losses_in_a_row_stop_the_run_with_a_checkpoint(train_env, monkeypatch, capsys):
    _poison(monkeypatch, set(range(3, 100)))
    assert _run(train_env, "halt", "--steps", "50", "--max-nonfinite-steps", "3") == 1
    saved = load_checkpoint_file(latest_checkpoint(train_env / "halt"))
    assert saved["step"] == 5 and all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    log = (train_env / "halt" / "out.log").read_text()
    assert "stopping: 3 non-finite losses in a row (steps 3–5; --max-nonfinite-steps 3)" in log


def test_resume_latest_without_checkpoints_starts_fresh(train_env):
    # `--resume latest` on a run without checkpoints starts at step 0 (a preemptible job's first start).
    assert _run(train_env, "fresh", "--steps", "2", "--resume", "latest") == 0
    assert load_checkpoint_file(latest_checkpoint(train_env / "fresh"))["step"] == 2
