"""Bad input ends in one line naming the file or flag, a non-zero exit and no traceback; ``--debug`` shows it.

The command lines run in subprocesses (what a user sees on stderr), each failing before any training.
Under torchrun the same line is each failing rank's last output before torchrun's summary; a two-rank
run takes ~25 s on a 2-core machine, so that was checked by hand (2026-12-08), not here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lcl_fast
from lcl_fast.errors import CheckpointError, UserError, one_line


def _cli(module: str, *args, cwd, env_extra: dict | None = None) -> tuple[int, list[str], str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LCL_FAST_DEBUG", None)
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    return proc.returncode, proc.stderr.splitlines(), proc.stdout


@pytest.fixture
def junk(tmp_path):
    path = tmp_path / "epoch_32.pt"
    path.write_bytes(b"<html>404 not found</html>\n")
    return path


# ------------------------------------------------------------------------------------- argument errors
@pytest.mark.parametrize("args, needle", [
    (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    (["--batch-size", "0"], "--batch-size must be > 0, got 0"),
])  # fmt: skip
def test_train_flag_error_is_one_line(args, needle, tmp_path):
    code, err, out = _cli("lcl_fast.train", *args, "--logs-dir", tmp_path / "logs", cwd=tmp_path)
    assert code == 2 and len(err) == 1, err  # no 42-line usage block
    assert needle in err[0] and "--help" in err[0] and err[0].startswith("python -m lcl_fast.train: error:")
    assert out == "" and not (tmp_path / "logs").exists()


# ------------------------------------------------------------------------------------- checkpoints
def test_eval_corrupt_checkpoint_is_one_line(junk, tmp_path):
    code, err, _ = _cli("lcl_fast.eval", "retrieval", "--pretrained", junk, cwd=tmp_path)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("lcl_fast.eval: error: ") and f"{junk} is not a PyTorch checkpoint" in err[0]
    assert "weights_only" not in err[0]


def test_debug_shows_the_traceback(junk, tmp_path):
    code, err, _ = _cli("lcl_fast.eval", "retrieval", "--pretrained", junk, "--debug", cwd=tmp_path)
    assert code == 1 and err[0] == "Traceback (most recent call last):"
    assert err[-1].startswith("lcl_fast.errors.CheckpointError: ") and str(junk) in err[-1]
    code, err, _ = _cli("lcl_fast.eval", "retrieval", "--pretrained", junk, cwd=tmp_path,
                        env_extra={"LCL_FAST_DEBUG": "1"})  # fmt: skip
    assert code == 1 and "Traceback (most recent call last):" in err


def test_export_tells_a_corrupt_file_from_a_mismatch(junk, tmp_path, capsys):
    from lcl_fast.export.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--model", "LCL_tiny", "--pretrained", junk, "--format", "open_clip", "--output", tmp_path / "x"])
    last = capsys.readouterr().err.splitlines()[-1]
    assert exc.value.code == 2 and last.startswith("lcl_fast.export: error: ")
    assert f"{junk} is not a PyTorch checkpoint" in last and "does not match" not in last
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("content, needle", [
    (None, "checkpoint {path}: no such file"),
    (b"", "{path} is empty, not a PyTorch checkpoint"),
    (b"GIF89a....", "{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle"),
    ("truncated", "{path} is not a readable PyTorch checkpoint (a truncated or corrupt zip archive"),
])  # fmt: skip
def test_create_model_says_what_is_wrong_with_the_file(content, needle, tmp_path):
    path = tmp_path / "epoch_32.pt"
    if content == "truncated":
        torch.save({"w": torch.zeros(64)}, path)
        path.write_bytes(path.read_bytes()[:200])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as exc:
        lcl_fast.create_model("LCL_tiny", pretrained=path)
    message = str(exc.value)
    assert needle.format(path=path) in message and "\n" not in message
    assert "weights_only" not in message  # torch's advice is for files it refused, not for these


def test_a_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        lcl_fast.create_model("LCL_tiny", pretrained=tmp_path)


class _NotAllowed:
    pass


def test_only_a_weights_only_refusal_keeps_the_advice(tmp_path, capsys):
    path = tmp_path / "objects.pt"
    torch.save({"state_dict": {}, "extra": _NotAllowed()}, path)
    with pytest.raises(CheckpointError) as exc:
        lcl_fast.create_model("LCL_tiny", pretrained=path)
    message = str(exc.value)
    assert "weights_only loading refuses" in message and "_NotAllowed" in message
    assert message.endswith("if you trust this file, pass weights_only=False") and "\n" not in message
    from lcl_fast.export.__main__ import main

    with pytest.raises(SystemExit) as exc:  # the export command line names its own switch
        main(["--model", "LCL_tiny", "--pretrained", path, "--format", "open_clip", "--output", tmp_path / "x"])
    assert exc.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(
        "if you trust this file, pass --trust-checkpoint"
    )


# ------------------------------------------------------------------------------------- the mechanism
def test_one_line_of_errors():
    assert one_line(FileNotFoundError(2, "No such file or directory", "shards/000.tar")) == (
        "shards/000.tar: no such file or directory"
    )
    assert one_line(UserError("first\n  second")) == "first; second"
    wrapped = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                         "call last):\n  File \"x.py\", line 1\nValueError: shard a.tar cannot be read")  # fmt: skip
    assert one_line(wrapped) == "shard a.tar cannot be read"


def test_a_bug_keeps_its_traceback():
    from lcl_fast.errors import report

    with pytest.raises(KeyError):
        report(KeyError("a bug"), "prog", [])
    with pytest.raises(UserError):
        report(UserError("bad file"), "prog", ["--debug"])


def test_eval_model_config_error_names_the_file(tmp_path):
    bad = tmp_path / "my_model.json"
    bad.write_text("{not json")
    code, err, _ = _cli("lcl_fast.eval", "retrieval", "--model", bad, cwd=tmp_path)
    assert code == 2 and len(err) == 1 and f"model config {bad} is not valid JSON" in err[0], err


def test_a_rank_whose_peer_failed_says_so_in_one_line(monkeypatch, capsys):
    from lcl_fast.errors import report

    broken = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:30862. This is ...")
    with pytest.raises(RuntimeError):  # outside torchrun it is not explained away
        report(broken, "prog", [])
    monkeypatch.setenv("RANK", "0")
    assert report(broken, "prog", []) == 1
    assert capsys.readouterr().err == "prog: rank 0 stopped: another rank failed (see its error)\n"
    with pytest.raises(RuntimeError):
        report(RuntimeError("CUDA error: an illegal memory access"), "prog", [])
