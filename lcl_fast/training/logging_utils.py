"""What a run shows: ``out.log``, ``metrics.jsonl``, ``eval.jsonl``, TensorBoard events, progress bar, PNG.

Only rank 0 writes files and draws the bar; other ranks log warnings to the console, tagged
with their rank.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from ..data.packing import sample_token_counts
from .distributed import DistEnv

LOGGER_NAME = "lcl_fast.train"
log = logging.getLogger(LOGGER_NAME)


class _TqdmHandler(logging.StreamHandler):
    """Console logging that does not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def setup_logging(run_dir: Optional[Path], env: DistEnv) -> logging.Logger:
    """Console (+ ``out.log`` on rank 0). Replaces handlers a previous run in this process left."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.propagate = False
    log.setLevel(logging.INFO)
    console = _TqdmHandler()
    prefix = f"[rank {env.rank}] " if env.distributed else ""
    console.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S"))
    console.setLevel(logging.INFO if env.is_main else logging.WARNING)
    log.addHandler(console)
    if run_dir is not None and env.is_main:
        handler = logging.FileHandler(run_dir / "out.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(handler)
    return log


def close_logging() -> None:
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def _json_value(v: Any) -> Any:
    """JSON has no NaN/inf: non-finite numbers are written as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop lines past ``max_step`` (a run resumed from an earlier checkpoint rewrites them)."""
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= max_step
    ]
    path.write_text("".join(line + "\n" for line in kept))


class RunRecorder:
    """Metrics sink of one run: jsonl files, TensorBoard, progress bar (rank 0 only; a no-op elsewhere)."""

    def __init__(self, run_dir: Path, env: DistEnv, *, tensorboard: bool, progress: bool):
        self.run_dir = run_dir
        self.active = env.is_main
        self.tensorboard = tensorboard and self.active
        self.show_progress = progress and self.active
        self._writer = None
        self._bar = None

    # ------------------------------------------------------------------ files
    def start(self, resume_step: int) -> None:
        if not self.active:
            return
        if resume_step >= 0:
            for name in ("metrics.jsonl", "eval.jsonl"):
                truncate_jsonl(self.run_dir / name, resume_step)
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard is not installed: no TensorBoard events (pip install tensorboard)")
                return
            purge = max(resume_step, 0) or None  # a resumed run rewrites the steps after its checkpoint
            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge)

    def _append(self, name: str, record: dict) -> None:
        with open(self.run_dir / name, "a") as f:
            f.write(json.dumps({k: _json_value(v) for k, v in record.items()}) + "\n")

    def _scalars(self, prefix: str, step: int, values: dict) -> None:
        if self._writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                self._writer.add_scalar(f"{prefix}/{k}", v, step)

    def train_metrics(self, record: dict) -> None:
        if self.active:
            self._append("metrics.jsonl", record)
            self._scalars("train", record["step"], record)

    def eval_metrics(self, record: dict) -> None:
        if self.active:
            self._append("eval.jsonl", record)
            self._scalars("eval", record["step"], record)

    def write_json(self, name: str, payload: dict) -> None:
        if self.active:
            (self.run_dir / name).write_text(
                json.dumps({k: _json_value(v) for k, v in payload.items()}, indent=2) + "\n"
            )

    # ------------------------------------------------------------------ progress bar
    def open_bar(self, total: int, initial: int) -> None:
        if self.show_progress:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                mininterval=1.0,
                file=sys.stderr,
            )

    def advance(self, postfix: dict) -> None:
        if self._bar is not None:
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(run_dir: Path, chance: Optional[float] = None) -> Optional[Path]:
    """``curves.png``: the losses and held-out retrieval recall against the step. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no curves.png (pip install matplotlib)")
        return None
    train, evals = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (
        ("loss", "total"),
        ("caption_loss", "generation"),
        ("contrastive_loss", "contrastive"),
    ):
        pts = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if pts:
            ax_loss.plot(*zip(*pts), label=label)
    ax_loss.set(xlabel="step", ylabel="loss (weighted)", title="training loss")
    if ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend()
    for key, label, style in (
        ("image_to_text_R@1", "image→text R@1", "o-"),
        ("text_to_image_R@1", "text→image R@1", "o-"),
        ("image_to_text_R@5", "image→text R@5", "s:"),
        ("text_to_image_R@5", "text→image R@5", "s:"),
        ("zeroshot_top1", "zero-shot top-1", "^-"),
    ):
        pts = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
        if pts:
            ax_acc.plot(*zip(*pts), style, label=label)
    if chance:
        ax_acc.axhline(chance, color="gray", linestyle="--", label="chance (top-1)")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="held-out evaluation")
    ax_acc.set_ylim(bottom=0)
    if ax_acc.get_legend_handles_labels()[0]:
        ax_acc.legend()
    else:
        ax_acc.text(
            0.5, 0.5, "no evaluation in this run", ha="center", va="center", transform=ax_acc.transAxes
        )
    fig.tight_layout()
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def batch_counts(batch: dict, pad_id: int = 0) -> tuple[int, int]:
    """(samples, tokens) of one loader batch (:func:`lcl_fast.data.packing.sample_token_counts`):
    pairs or documents, never rows; non-padding tokens. The loader counts on the host
    (``batch["counts"]``, with the pad id in ``target_token_ids``); other batches are counted here."""
    counted = batch.get("counts")
    if counted is not None and (batch.get("target_token_ids") or (None,) * 4)[3] == pad_id:
        return int(counted[0]), int(counted[1])
    return sample_token_counts(batch["text_ids"], batch.get("doc_ids"), pad_id)


class Throughput:
    """Samples and tokens per second over the steps since the last reading."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._t0 = time.perf_counter()
        self._samples = 0
        self._tokens = 0

    def add(self, samples: int, tokens: int = 0) -> None:
        self._samples += samples
        self._tokens += tokens

    def read(self) -> tuple[float, float]:
        """(samples/s, tokens/s) since the last reading; starts a new window."""
        elapsed = time.perf_counter() - self._t0
        rates = (self._samples / elapsed, self._tokens / elapsed) if elapsed > 0 else (0.0, 0.0)
        self.reset()
        return rates


def default_run_name(model: str) -> str:
    stamp = time.strftime("%Y_%m_%d-%H_%M_%S")
    return f"{stamp}-{Path(model).stem}-{os.getpid()}"
