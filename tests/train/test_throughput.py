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


def test_loader_selects_and_counts_on_the_host(corpus_cache):
    """The loader's loss targets and counts are the model's and batch_counts' own; the step uses
    them only when its token ids agree; dropping rows recomputes them."""
    from lcl_fast.data import build_train_loader, get_tokenizer
    from lcl_fast.data.packing import add_targets, drop_rows, sample_token_counts
    from lcl_fast.training.step import prepare_batch

    torch.manual_seed(0)
    model = lcl_fast.create_model("LCL_tiny")
    tok = get_tokenizer(context_length=64)
    common = dict(num_img_token=model.num_img_token, image_size=32, decoder="pil", cache_dir=str(corpus_cache))
    pairs = build_train_loader("synthetic", None, tok, batch_size=6, context_length=64, **common)
    docs = build_train_loader("synthetic", "interleaved", tok, batch_size=2, context_length=64, pack=True, **common)
    batches = [b for loader in (pairs, docs) for _, b in zip(range(2), loader)]
    assert any(b["doc_ids"] is not None for b in batches) and any(b["doc_ids"] is None for b in batches)
    for batch in batches:
        assert batch["target_token_ids"] == model.target_token_ids
        expected = model.batch_targets(batch["text_ids"], batch["doc_ids"], batch["position_ids"])
        assert expected["pair_text_index"].numel() > 0 and expected["gen_index"].numel() > 0
        for key, value in expected.items():
            assert torch.equal(batch["targets"][key], value), key
        assert batch["counts"] == sample_token_counts(batch["text_ids"], batch["doc_ids"])
        assert batch_counts(batch) == batch["counts"]
        # another pad id: counted from the tensors, not taken from the loader
        assert batch_counts(batch, pad_id=5) == sample_token_counts(batch["text_ids"], batch["doc_ids"], 5)
        inputs = prepare_batch(model, batch)
        assert inputs["gen_index"] is batch["targets"]["gen_index"]  # the loader's, not recomputed
        other = dict(batch, target_token_ids=(1, 2, 3, 0), targets={k: v[:0] for k, v in expected.items()})
        assert torch.equal(prepare_batch(model, other)["gen_index"], expected["gen_index"])  # recomputed

    raw = collate([[Row([49409, 49408, 49410, 320, 321])], [Row([320, 49409, 49408, 49410, 322])]], 8, packed=False)
    add_targets(raw, tok)
    kept = drop_rows(raw, [0])
    assert torch.equal(kept["targets"]["pair_text_index"], torch.tensor([1]))
    assert torch.equal(kept["targets"]["pair_image_index"], torch.tensor([0]))
