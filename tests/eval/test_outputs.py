"""Where evaluation results go: ``--output``, else the run folder of a run's checkpoint, never the current folder."""

from __future__ import annotations

import json

import pytest
import torch

import lcl_fast
from lcl_fast.eval import main

pytest.importorskip("pycocoevalcap", reason="captioning scores need the 'eval' extra (pycocoevalcap)")

FAST = ["--device", "cpu", "--workers", "0", "--no-progress", "--batch-size", "4", "--max-images", "2",
        "--max-new-tokens", "3"]  # fmt: skip


def test_caption_without_output_writes_nothing_here(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = main(["caption", *FAST])
    assert list(tmp_path.iterdir()) == []  # was: captions_results.json in the current folder
    assert out["results_file"] is None
    assert "captions not written (give --output or --results-file to keep them)" in capsys.readouterr().out


def test_results_of_a_run_checkpoint_go_to_the_run_folder(tmp_path, monkeypatch, capsys):
    run = tmp_path / "logs" / "run1"
    (run / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    ckpt = run / "checkpoints" / "step_00000004.pt"
    torch.save({"state_dict": lcl_fast.create_model("LCL_tiny").state_dict()}, ckpt)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    main(["caption", "--pretrained", str(ckpt), *FAST])
    assert list(here.iterdir()) == []
    results = json.loads((run / "eval" / "caption_step_00000004.json").read_text())
    assert results["command"] == "caption" and results["pretrained"] == str(ckpt)
    assert results["results_file"] == str(run / "eval" / "caption_step_00000004_captions.json")
    assert len(json.loads((run / "eval" / "caption_step_00000004_captions.json").read_text())) == 2
    assert f"results written to {run / 'eval' / 'caption_step_00000004.json'}" in capsys.readouterr().out
