"""The demo run end to end, on a short schedule: it must learn, and leave what a user reads behind."""

from __future__ import annotations

import json

import lcl_fast
from lcl_fast.train import main
from lcl_fast.training.checkpoint import latest_checkpoint

# The demo's pipeline (built-in corpus, LCL_tiny, held-out retrieval before/after) on a short
# schedule. The published contrastive weight (0.1) needs a few hundred steps before retrieval
# leaves chance (the demo's 6 epochs do); weight 1.0 gets there within a test's budget.
SHORT = [
    "--steps",
    "{steps}",
    "--lcl-contrastive-loss-weight",
    "1.0",
    "--val-pairs",
    "50",
    "--log-every-n-steps",
    "10",
    "--seed",
    "0",
]
STEPS = 160


def test_default_run_learns_and_reports(train_env, capsys):
    args = [a.replace("{steps}", str(STEPS)) for a in SHORT]
    assert main([*args, "--logs", str(train_env), "--name", "demo"]) == 0
    run = train_env / "demo"
    summary = json.loads((run / "summary.json").read_text())

    # Learning, with margins a model that does not learn cannot meet: the generation loss falls from
    # ln(49411) ≈ 10.8 at initialisation, held-out retrieval leaves chance (1/50) well behind.
    assert summary["loss_last"] < 0.5 * summary["loss_first"], summary
    before, after = summary["retrieval_before"], summary["retrieval_after"]
    assert summary["chance"] == 1 / 50
    assert summary["retrieval_top1_after"] >= summary["retrieval_top1_before"] + 0.04, summary
    assert summary["retrieval_top1_after"] >= 3 * summary["chance"], summary
    chance_rank = (50 + 1) / 2
    for way in ("image_to_text", "text_to_image"):
        assert after[f"{way}_mean_rank"] < 0.6 * chance_rank < before[f"{way}_mean_rank"], (before, after)

    # What LCL pre-trains, measured as the paper does (frozen probe, captions), beats the untrained model:
    # an attentive probe on colour x shape (18 classes) and held-out CIDEr (0 for untrained babble).
    assert summary["probe_top1_after"] >= summary["probe_top1_before"] + 0.05, summary
    assert summary["cider_after"] >= summary["cider_before"] + 0.2, summary
    assert len(summary["caption_examples"]) == 3

    # What a user reads: the summary on stdout, the run folder's files.
    out = capsys.readouterr()
    assert "held-out retrieval top-1" in out.out and "samples/s" in out.out
    assert "probe top-1" in out.out and "CIDEr" in out.out and out.out.count("caption: ") == 3
    assert "train:" in out.err  # the progress bar
    for key in (
        "retrieval_top1_before",
        "retrieval_top1_after",
        "probe_top1_before",
        "probe_top1_after",
        "cider_before",
        "cider_after",
        "chance",
        "loss_first",
        "loss_last",
        "samples_per_s",
        "skipped",
    ):
        assert key in summary
    assert summary["samples_per_s"] > 0 and summary["skipped"] == {"nonfinite_steps": 0, "data": {}}
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(10, STEPS + 1, 10))
    for r in rows:
        assert {"step", "loss", "contrastive_loss", "caption_loss", "lr", "samples_per_s"} <= set(r)
    evals = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
    assert evals[0]["when"] == "before" and evals[-1]["when"] == "after" and evals[-1]["step"] == STEPS
    assert "eval (after" in (run / "out.log").read_text()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = lcl_fast.create_model("LCL_tiny", pretrained=latest_checkpoint(run))
    assert model.logit_scale.item() <= 4.6052  # clamped to ln 100 at most
