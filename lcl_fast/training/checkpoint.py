"""Training checkpoints: atomic writes, the last K kept, everything needed to continue exactly.

A checkpoint is one ``torch.save`` file ``<run>/checkpoints/step_<N>.pt``, a dict with the model
weights under ``state_dict`` (unwrapped key names: ``lcl_fast.create_model(..., pretrained=path)``
loads it), plus ``optimizer``, ``scheduler``, ``scaler``, ``step``, ``epoch``, every rank's RNG
states and data-loader position, the run's counters and its config. Everything is plain
tensors/lists/dicts/numbers, so ``torch.load(weights_only=True)`` reads it.

Writes go to a temporary file in the same folder, are flushed and fsync'ed, then renamed over
the final name (atomic on POSIX) and the folder is fsync'ed: a crash mid-write leaves the
previous checkpoints intact and at most a ``*.tmp`` file, which :func:`latest_checkpoint`
ignores and the next save removes.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from ..errors import CheckpointError

FORMAT = "lcl_fast.train/1"
_NAME = re.compile(r"^step_(\d+)\.pt$")


# ---------------------------------------------------------------------- weights_only-safe state
def to_safe(obj: Any) -> Any:
    """Numpy arrays and scalars → tagged lists / Python numbers, tuples → tagged lists (for weights_only)."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_safe(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_safe(v) for v in obj]}
    if isinstance(obj, list):
        return [to_safe(v) for v in obj]
    return obj


def from_safe(obj: Any) -> Any:
    """Inverse of :func:`to_safe`."""
    if isinstance(obj, dict):
        if "__ndarray__" in obj and set(obj) == {"__ndarray__", "dtype"}:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        if set(obj) == {"__tuple__"}:
            return tuple(from_safe(v) for v in obj["__tuple__"])
        return {k: from_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_safe(v) for v in obj]
    return obj


def rng_state() -> dict:
    """This process's Python, numpy and torch (CPU and CUDA) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return to_safe(state)


def set_rng_state(state: dict) -> None:
    state = from_safe(state)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------- files
def checkpoint_dir(run_dir: Union[str, os.PathLike]) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: Union[str, os.PathLike], step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: Union[str, os.PathLike]) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files are not listed)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Union[str, os.PathLike]) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: Union[str, os.PathLike]) -> Path:
    """``torch.save`` to a temporary file, fsync, rename over ``path``, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def prune(run_dir: Union[str, os.PathLike], keep: int) -> None:
    """Remove all but the ``keep`` newest checkpoints, and temporary files left by a crash."""
    for p in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        p.unlink(missing_ok=True)
    for p in checkpoint_dir(run_dir).glob(".step_*.tmp"):
        p.unlink(missing_ok=True)


def save_checkpoint(payload: dict, run_dir: Union[str, os.PathLike], step: int, keep: int) -> Path:
    """Write ``payload`` as the checkpoint of ``step`` and keep the ``keep`` newest."""
    path = atomic_save({"format": FORMAT, **payload}, checkpoint_path(run_dir, step))
    prune(run_dir, keep)
    return path


def load_checkpoint_file(path: Union[str, os.PathLike]) -> dict:
    """Read a training checkpoint (weights_only); a one-line :class:`~lcl_fast.errors.CheckpointError`
    (a ``ValueError``) if it is not one."""
    from ..factory import read_checkpoint

    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a lcl_fast training checkpoint (no format {FORMAT!r}); "
            "to start from its weights use --pretrained"
        )
    return ckpt
