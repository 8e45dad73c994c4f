"""Checkpoint files: atomic under an injected crash (soft and hard), last K kept, weights_only-safe state."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from lcl_fast.training import checkpoint as ckpt


def _payload(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"step": step, "state_dict": {"w": torch.randn(64, 64, generator=g)}}


def test_safe_state_round_trip_and_weights_only(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    state = ckpt.rng_state()
    expected = (random.random(), np.random.rand(3), torch.rand(3))
    torch.save(
        {"rng": state, "data": ckpt.to_safe({"pos": np.arange(5, dtype=np.int64), "t": (1, 2)})},
        tmp_path / "s.pt",
    )
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)  # only plain containers inside
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    ckpt.set_rng_state(loaded["rng"])
    assert random.random() == expected[0]
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    torch.testing.assert_close(torch.rand(3), expected[2], rtol=0, atol=0)
    data = ckpt.from_safe(loaded["data"])
    assert data["t"] == (1, 2) and data["pos"].dtype == np.int64 and data["pos"].tolist() == [0, 1, 2, 3, 4]


def test_keeps_last_k(tmp_path):
    for step in range(1, 6):
        ckpt.save_checkpoint(_payload(step), tmp_path, step, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000004.pt", "step_00000005.pt"]
    assert ckpt.load_checkpoint_file(ckpt.latest_checkpoint(tmp_path))["step"] == 5


def test_crash_while_writing_keeps_previous_latest(tmp_path, monkeypatch):
    ckpt.save_checkpoint(_payload(1), tmp_path, 1, keep=3)
    real_save = torch.save

    def dying_save(obj, f):  # half a file reaches the disk, then the writer dies
        import io

        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_checkpoint(_payload(2), tmp_path, 2, keep=3)
    monkeypatch.undo()
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_00000001.pt"
    torch.testing.assert_close(
        ckpt.load_checkpoint_file(latest)["state_dict"]["w"], _payload(1)["state_dict"]["w"]
    )
    assert sorted(p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir()) == ["step_00000001.pt"]


def test_hard_kill_mid_write_leaves_no_corrupt_latest(tmp_path):
    # A process killed mid-write (no exception handler runs) leaves only its temporary file behind.
    script = textwrap.dedent(f"""
        import os, torch
        from lcl_fast.training import checkpoint as ckpt
        ckpt.save_checkpoint({{"step": 1, "w": torch.ones(3)}}, {str(tmp_path)!r}, 1, keep=3)
        def killed(obj, f):
            f.write(b"PK\\x03\\x04 half a zip")
            f.flush()
            os._exit(9)
        ckpt.torch.save = killed
        ckpt.save_checkpoint({{"step": 2, "w": torch.zeros(3)}}, {str(tmp_path)!r}, 2, keep=3)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    names = sorted(p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir())
    assert names[0].startswith(".step_00000002.pt.") and names[0].endswith(".tmp") and len(names) == 2
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_00000001.pt"
    assert ckpt.load_checkpoint_file(latest)["w"].tolist() == [1.0, 1.0, 1.0]
    ckpt.save_checkpoint(_payload(3), tmp_path, 3, keep=3)  # the next save clears the debris
    assert [p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir() if p.name.endswith(".tmp")] == []


def test_not_a_training_checkpoint(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a lcl_fast training checkpoint"):
        ckpt.load_checkpoint_file(tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pt is not a PyTorch checkpoint"):
        ckpt.load_checkpoint_file(tmp_path / "junk.pt")
