"""The end of a run: ``summary.json`` and the few lines printed for the user."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from . import distributed as D
from .loop import WINDOW, Trainer


def _mean(rows: list, col: int) -> float:
    return float(np.mean([r[col] for r in rows])) if rows else math.nan


def _steady(s) -> dict:
    """Throughput without the steps that compiled (``--torchcompile``), and the warm-up they took."""
    seconds = s.train_seconds - s.warmup_seconds
    return {
        "steady_samples_per_s": (s.samples - s.warmup_samples) / seconds if seconds > 0 else 0.0,
        "steady_tokens_per_s": (s.tokens - s.warmup_tokens) / seconds if seconds > 0 else 0.0,
        "warmup_seconds": s.warmup_seconds,
        "compilations": s.compilations,
    }


def summarize(
    trainer: Trainer, before: dict, after: dict, env: D.DistEnv, wall: float, stopped: Optional[str]
) -> dict:
    s = trainer.state
    summary = {
        "run": trainer.run_dir.name,
        "model": trainer.cfg.model,
        "steps": s.step,
        "total_steps": trainer.total_steps,
        "world_size": env.world_size,
        "device": str(env.device),
        "loss_first": _mean(s.first_losses, 0),
        "loss_last": _mean(s.last_losses, 0),
        "contrastive_loss_first": _mean(s.first_losses, 1),
        "contrastive_loss_last": _mean(s.last_losses, 1),
        "caption_loss_first": _mean(s.first_losses, 2),
        "caption_loss_last": _mean(s.last_losses, 2),
        "retrieval_top1_before": before.get("retrieval_top1"),
        "retrieval_top1_after": after.get("retrieval_top1"),
        "chance": before.get("chance", after.get("chance")),
        "retrieval_before": before,
        "retrieval_after": after,
        "samples_per_s": s.samples / s.train_seconds if s.train_seconds else 0.0,
        "tokens_per_s": s.tokens / s.train_seconds if s.train_seconds else 0.0,
        "samples": s.samples,
        **_steady(s),
        "compile_seconds": trainer.compile_seconds(),
        "tokens": s.tokens,
        "train_seconds": s.train_seconds,
        "wall_seconds": wall,
        "skipped": {"nonfinite_steps": s.skipped_nonfinite, "data": trainer.data_skips()},
        "padding_fraction": trainer.loader.padding_fraction,
        "checkpoint": str(trainer.last_checkpoint) if trainer.last_checkpoint else None,
        "stopped_by": stopped,
    }
    for key in ("probe_top1", "cider"):  # the demo run's transfer measures (built-in corpus)
        if key in before or key in after:
            summary[f"{key}_before"], summary[f"{key}_after"] = before.get(key), after.get(key)
    if "caption_examples" in after:
        summary["caption_examples"] = after["caption_examples"]
    if "zeroshot_top1" in after:
        summary["zeroshot_top1_after"] = after["zeroshot_top1"]
    return summary


def print_summary(summary: dict, run_dir: Path) -> None:
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = [
        f"LCL training {'stopped by ' + summary['stopped_by'] if summary['stopped_by'] else 'finished'}: "
        f"{summary['steps']} steps in {summary['wall_seconds']:.0f} s on "
        f"{summary['world_size']} x {summary['device']}",
        f"  loss (mean of first/last {WINDOW} steps): {summary['loss_first']:.3f} -> "
        f"{summary['loss_last']:.3f}"
        f"  (generation {summary['caption_loss_first']:.3f} -> {summary['caption_loss_last']:.3f}, "
        f"contrastive {summary['contrastive_loss_first']:.3f} -> {summary['contrastive_loss_last']:.3f})",
    ]
    if summary["retrieval_top1_before"] is not None:
        lines.append(
            f"  held-out retrieval top-1: {pct(summary['retrieval_top1_before'])} -> "
            f"{pct(summary['retrieval_top1_after'])}  (chance {pct(summary['chance'])}, "
            f"{summary['retrieval_before'].get('num_pairs')} pairs)"
        )
    if "probe_top1_before" in summary:
        lines.append(
            f"  attentive probe top-1 (colour x shape): {pct(summary['probe_top1_before'])} -> "
            f"{pct(summary['probe_top1_after'])}  (chance {pct(summary['retrieval_before'].get('probe_chance'))})"
        )
    if "cider_before" in summary:
        num = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"  held-out captions CIDEr: {num(summary['cider_before'])} -> {num(summary['cider_after'])}")
    for generated, reference in summary.get("caption_examples", []):
        lines.append(f"    caption: {generated!r}  (reference: {reference!r})")
    if "zeroshot_top1_after" in summary:
        lines.append(f"  zero-shot top-1: {pct(summary['zeroshot_top1_after'])}")
    lines.append(
        f"  throughput: {summary['samples_per_s']:.1f} samples/s, {summary['tokens_per_s']:.0f} tokens/s "
        f"(padding {100 * summary['padding_fraction']:.0f}%); skipped: {summary['skipped']}"
    )
    if summary["compilations"]:
        lines.append(
            f"  torch.compile: {summary['compilations']} graph(s) in {summary['warmup_seconds']:.1f} s of warm-up "
            f"({summary['compile_seconds']:.1f} s compiling before step 1); "
            f"steady state {summary['steady_samples_per_s']:.1f} samples/s"
        )
    lines.append(f"  run folder: {run_dir}  (out.log, metrics.jsonl, summary.json, curves.png, checkpoints/)")
    print("\n".join(lines), flush=True)
