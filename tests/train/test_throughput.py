"""Throughput counts what users count: pairs or documents (never packed rows), non-padding tokens."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import lcl_fast
from lcl_fast.data.packing import Row, collate
from lcl_fast.train import main
from lcl_fast.training.logging_utils import batch_counts

QUICK = ["--batch-size", "4", "--no-progress", "--report-to", "none", "--val-pairs", "0",
         "--log-every-n-steps", "1", "--save-frequency", "0", "--seed", "3"]


def test_batch_counts_packed_rows_count_documents():
    # three rows: two documents, one document, three documents (6 in all) in rows of 10 slots
    bins = [[Row([5, 6, 7]), Row([8, 9])], [Row([5, 6, 7, 8])], [Row([1]), Row([2, 3]), Row([4])]]
    batch = collate(bins, 10, packed=True)
    assert batch_counts(batch) == (6, 3 + 2 + 4 + 1 + 2 + 1)
    unpacked = collate([[Row([5, 6, 7])], [Row([5, 0, 7, 8])]], 10, packed=False)
    # a pad id inside a row is a token the model reads; only the trailing run is padding
    assert batch_counts(unpacked) == (2, 3 + 4)


def test_packed_run_reports_documents_and_tokens(train_env, tmp_path):
    # LCL_tiny with a 256-token context: several built-in MMC4 documents (~60 tokens) fit in a row
    config = json.loads((Path(lcl_fast.__file__).parent / "model_configs" / "LCL_tiny.json").read_text())
    config["text_cfg"]["context_length"] = 256
    (tmp_path / "tiny256.json").write_text(json.dumps(config))
    steps = 3
    assert main([*QUICK, "--logs", str(train_env), "--name", "packed", "--steps", str(steps),
                 "--model", str(tmp_path / "tiny256.json"), "--train-data", "interleaved", "--pack"]) == 0
    run = train_env / "packed"
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    slots = steps * 4 * 256
    # packing puts several documents in a row: more samples than rows
    assert summary["samples"] > steps * 4, summary
    assert summary["tokens"] == round(slots * (1 - summary["padding_fraction"])), summary
    assert summary["samples_per_s"] == summary["samples"] / summary["train_seconds"]
    assert summary["tokens_per_s"] > summary["samples_per_s"] > 0
    for r in rows:
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and "padding_fraction" in r
    assert torch.tensor([r["step"] for r in rows]).tolist() == list(range(1, steps + 1))
