"""Turn a ``pytest --benchmark-json`` file into ``RESULTS.md`` and the contrastive memory plot.

    python -m benchmarks.report results.json [--out benchmarks/RESULTS.md]
        [--plot benchmarks/contrastive_memory.png] [--note "what machine / why"]

The Markdown has the machine, the torch/triton versions, the date and commit, a summary (one line
per group: the best lcl-fast contender against ``reference``) and one table per component; the
PNG plots the contrastive loss's peak memory against the batch size for every contender
(log-log: the reference's full logits grow quadratically, lcl-fast's chunks linearly).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SECTIONS = [
    ("contrastive", "Contrastive loss (forward + backward)"),
    ("attention", "Attention (forward + backward)"),
    ("generation_loss", "Generation loss: LM head + cross-entropy (forward + backward)"),
    ("model_fwd_bwd", "Model forward + backward (both losses)"),
    ("train_step", "Full training step (forward, loss, backward, AdamW, logit-scale clamp)"),
    ("data_path", "Data path (JPEG bytes to a normalised batch)"),
]
LCL_IMPLS = ("torch", "triton", "pil", "dali")
MEMORY_METHODS = {
    "cuda_max_memory_allocated": "CUDA peak allocation (`torch.cuda.max_memory_allocated`, reset before the call)",
    "torch_profiler_alloc_peak": "peak of the running sum of CPU tensor allocations (torch.profiler, "
    "`profile_memory=True`)",
    "rss_hwm_delta": "resident-set high-water-mark delta (`/proc/self/status` VmHWM, reset through "
    "`/proc/self/clear_refs`)",
    "subprocess_rss_hwm_delta": "resident-set high-water-mark growth of a fresh process during one cold call "
    "(data path: decoder buffers are not tensors)",
}


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def fmt_num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}×"


def load(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as f:
        data = json.load(f)
    if "benchmarks" not in data:
        raise ValueError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' key)")
    return data


def _ratios(entries: list[dict[str, Any]]) -> None:
    """Fill missing ratio keys from each group's reference (older JSON files may lack them)."""
    by_group: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in entries:
        by_group[e["group"]].append(e)
    for members in by_group.values():
        ref = next((m["extra_info"] for m in members if m["extra_info"].get("impl") == "reference"), None)
        for m in members:
            info = m["extra_info"]
            if ref and info.get("speedup_vs_reference") is None and info.get("time_median_s"):
                info["speedup_vs_reference"] = ref["time_median_s"] / info["time_median_s"]
            if ref and info.get("memory_vs_reference") is None and info.get("peak_memory_bytes") and ref.get(
                "peak_memory_bytes"
            ):
                info["memory_vs_reference"] = ref["peak_memory_bytes"] / info["peak_memory_bytes"]


def machine_line(data: dict[str, Any]) -> str:
    mi = data.get("machine_info", {})
    cpu = mi.get("cpu", {})
    parts = []
    if mi.get("gpu"):
        parts.append(f"GPU {mi['gpu']} (CUDA {mi.get('cuda')})")
    parts.append(f"CPU {cpu.get('brand_raw', mi.get('processor') or mi.get('machine', '?'))}, "
                 f"{mi.get('cpu_count') or cpu.get('count', '?')} cores, torch threads {mi.get('torch_threads', '?')}")
    start, end = mi.get("load_average_1_5_15min_start"), mi.get("load_average_1_5_15min_end")
    if start and end:
        parts.append(f"load average (1 min) {start[0]:.1f} at the start, {end[0]:.1f} at the end")
    return "; ".join(parts)


def header(data: dict[str, Any], note: str | None) -> list[str]:
    mi, ci = data.get("machine_info", {}), data.get("commit_info", {})
    competitors = {k: v for k, v in (mi.get("competitors") or {}).items() if v}
    lines = [
        "# lcl-fast benchmark results",
        "",
        f"- **Date**: {data.get('datetime', '?')}",
        f"- **Machine**: {machine_line(data)}",
        f"- **Software**: torch {mi.get('torch', '?')}, triton {mi.get('triton') or 'not installed'}, "
        f"Python {mi.get('python_version', '?')}, pytest-benchmark {data.get('version', '?')}; "
        f"competitors installed: {', '.join(f'{k} {v}' for k, v in competitors.items()) or 'none'}",
        f"- **Commit**: `{str(ci.get('id', '?'))[:12]}`{' (uncommitted changes)' if ci.get('dirty') else ''}",
        f"- **Scale**: `LCL_BENCH_SCALE={mi.get('lcl_bench_scale', '?')}`",
    ]
    if note:
        lines.append(f"- **Note**: {note}")
    methods = sorted({b["extra_info"].get("memory_method") for b in data["benchmarks"]} - {None})
    lines += [
        "",
        "Produced by `pytest benchmarks/ --benchmark-only --benchmark-json=results.json` and "
        "`python -m benchmarks.report results.json`. Times are medians over the rounds shown; "
        "ratios are **reference ÷ this**, measured in the same session (above 1: faster / leaner). "
        "Peak memory is above what was allocated before the call (inputs excluded, gradients and "
        "everything the call allocates included): "
        + "; ".join(f"`{m}`: {MEMORY_METHODS.get(m, m)}" for m in methods)
        + ".",
        "",
    ]
    return lines


def section_table(entries: list[dict[str, Any]]) -> list[str]:
    has_tflops = any(e["extra_info"].get("tflops") is not None for e in entries)
    cols = ["case", "impl", "median time", "rounds", "throughput"] + (["TFLOP/s"] if has_tflops else [])
    cols += ["peak memory", "speedup vs reference", "memory vs reference"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for e in entries:
        info = e["extra_info"]
        row = [
            e["group"],
            f"`{info.get('impl')}`",
            fmt_time(info.get("time_median_s")),
            str(info.get("rounds", e["stats"].get("rounds", "?"))),
            f"{fmt_num(info.get('throughput'))} {info.get('throughput_unit', '')}",
        ]
        if has_tflops:
            row.append(fmt_num(info.get("tflops")))
        row += [
            fmt_bytes(info.get("peak_memory_bytes")),
            fmt_ratio(info.get("speedup_vs_reference")),
            fmt_ratio(info.get("memory_vs_reference")),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def summary_table(entries: list[dict[str, Any]]) -> list[str]:
    """One line per group: every lcl-fast contender against reference."""
    lines = [
        "| component / case | lcl-fast impl | time | speedup vs reference | peak memory | memory vs reference |",
        "|---|---|---|---|---|---|",
    ]
    for e in entries:
        info = e["extra_info"]
        if info.get("impl") not in LCL_IMPLS:
            continue
        lines.append(
            f"| {e['group']} | `{info['impl']}` | {fmt_time(info.get('time_median_s'))} | "
            f"{fmt_ratio(info.get('speedup_vs_reference'))} | {fmt_bytes(info.get('peak_memory_bytes'))} | "
            f"{fmt_ratio(info.get('memory_vs_reference'))} |"
        )
    return lines


# The kernel issues' targets, checked wherever the run has the entries: (what, where, impl, check).
# A check gets this impl's extra_info and {impl: extra_info} of its group; it returns (shown, ok).
def _time_ratio_at_most(limit: float):
    def check(info, group):
        s = info.get("speedup_vs_reference")
        return (f"{1 / s:.2f}× the reference's time" if s else "-"), (s is not None and 1 / s <= limit)
    return check


def _memory_ratio_at_least(limit: float):
    def check(info, group):
        m = info.get("memory_vs_reference")
        return (f"{m:.1f}× less memory" if m else "-"), (m is not None and m >= limit)
    return check


def _speedup_at_least(limit: float, against: str = "reference"):
    def check(info, group):
        other = group.get(against, {}).get("time_median_s")
        if not other or not info.get("time_median_s"):
            return f"no {against} timing", None
        s = other / info["time_median_s"]
        return f"{s:.2f}× faster than {against}", s >= limit
    return check


def _peak_below(limit_bytes: float):
    def check(info, group):
        m = info.get("peak_memory_bytes")
        return fmt_bytes(m), (m is not None and m < limit_bytes)
    return check


TARGETS = [
    ("contrastive, CPU, n=m=8192 d=512 fp32: memory ≥ 20× below reference",
     {"op": "contrastive", "device": "cpu", "n": 8192, "d": 512}, "torch", _memory_ratio_at_least(20)),
    ("contrastive, CPU, n=m=8192 d=512 fp32: time ≤ 1.2× reference",
     {"op": "contrastive", "device": "cpu", "n": 8192, "d": 512}, "torch", _time_ratio_at_most(1.2)),
    ("contrastive, GPU, batch 64k d=768 bf16: loss memory < 1 GB",
     {"op": "contrastive", "n": 65536, "d": 768}, "triton", _peak_below(1e9)),
    ("contrastive, GPU, batch 64k d=768 bf16: ≥ 3× faster than Inf-CL",
     {"op": "contrastive", "n": 65536, "d": 768}, "triton", _speedup_at_least(3.0, "inf_cl")),
    ("contrastive, GPU, batch 16k d=768 bf16: at least as fast as reference",
     {"op": "contrastive", "n": 16384, "d": 768}, "triton", _speedup_at_least(1.0)),
    ("attention, CPU, L=2048 4 docs/row fwd+bwd: ≥ 2× faster than reference",
     {"op": "attention", "device": "cpu", "case": "mmc4", "length": 2048}, "torch", _speedup_at_least(2.0)),
    ("generation loss, CPU, T=8192 D=512 V=49411: memory ≥ 20× below reference",
     {"op": "generation_loss", "device": "cpu", "tokens": 8192, "vocab": 49411}, "torch", _memory_ratio_at_least(20)),
    ("generation loss, CPU, T=8192 D=512 V=49411: time ≤ 1.3× reference",
     {"op": "generation_loss", "device": "cpu", "tokens": 8192, "vocab": 49411}, "torch", _time_ratio_at_most(1.3)),
]


def targets_table(entries: list[dict[str, Any]]) -> list[str]:
    lines = ["| target | impl | measured | met |", "|---|---|---|---|"]
    for what, where, impl, check in TARGETS:
        matches = [e for e in entries if all(e["extra_info"].get(k) == v for k, v in where.items())]
        group = {e["extra_info"].get("impl"): e["extra_info"] for e in matches}
        if impl not in group:
            continue
        shown, ok = check(group[impl], group)
        lines.append(f"| {what} | `{impl}` | {shown} | {'-' if ok is None else 'yes' if ok else '**no**'} |")
    return lines if len(lines) > 2 else []


def _sorted(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """By component (the sections' order), case (batch sizes numerically), then reference first."""
    sections = {op: i for i, (op, _) in enumerate(SECTIONS)}
    impls = {"reference": 0, "torch": 1, "triton": 2, "pil": 1, "dali": 2}

    def key(e: dict[str, Any]) -> tuple:
        info = e["extra_info"]
        size = info.get("n") or info.get("tokens") or info.get("length") or 0
        order = sections.get(info.get("op"), len(sections))
        return (order, size, e["group"], impls.get(info.get("impl"), 9), e["name"])

    return sorted(entries, key=key)


def plot_contrastive_memory(entries: list[dict[str, Any]], path: str | os.PathLike) -> bool:
    """Peak memory against batch size, one line per contender (log-log). False if nothing to plot."""
    points: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for e in entries:
        info = e["extra_info"]
        if info.get("op") == "contrastive" and info.get("peak_memory_bytes"):
            points[info["impl"]].append((info["n"], info["peak_memory_bytes"] / 2**20))
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(e["extra_info"] for e in entries if e["extra_info"].get("op") == "contrastive")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for impl in sorted(points, key=lambda i: (i != "reference", i)):
        xs, ys = zip(*sorted(points[impl]))
        ax.plot(xs, ys, marker="o", label=impl, linestyle="--" if impl == "reference" else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size n (= m)")
    ax.set_ylabel("peak memory, forward + backward (MiB)")
    ax.set_title(f"Contrastive loss memory, d={first.get('d')} {first.get('dtype')} on {first.get('device')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def render(data: dict[str, Any], note: str | None = None, plot_name: str | None = None) -> str:
    entries = _sorted(data["benchmarks"])
    _ratios(entries)
    lines = header(data, note)
    lines += ["## Summary: lcl-fast against the reference", ""] + summary_table(entries) + [""]
    targets = targets_table(entries)
    if targets:
        lines += ["## The kernel issues' targets", ""] + targets + [""]
    by_op: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in entries:
        by_op[e["extra_info"].get("op", "other")].append(e)
    known = [op for op, _ in SECTIONS]
    for op, title in SECTIONS + [(op, op) for op in by_op if op not in known]:
        if op not in by_op:
            continue
        lines += [f"## {title}", ""] + section_table(by_op[op]) + [""]
        if op == "contrastive" and plot_name:
            lines += [f"![contrastive loss peak memory against batch size]({plot_name})", ""]
    reasons: dict[str, list[str]] = defaultdict(list)
    for skip in data.get("lcl_skipped") or []:
        reason = " ".join(str(skip["reason"]).split()).replace("|", "\\|")
        reasons[reason].append(f"`{skip['test'].split('::')[-1]}`")
    if reasons:
        lines += ["## Not measured in this run", "", "| why | benchmarks |", "|---|---|"]
        lines += [f"| {reason} | {', '.join(tests)} |" for reason, tests in reasons.items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="file written by pytest --benchmark-json")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"), help="Markdown to write (default: %(default)s)")
    parser.add_argument("--plot", default=None,
                        help="PNG to write (default: contrastive_memory.png beside --out)")
    parser.add_argument("--note", default=None, help="a line about the run (machine load, why it was run)")
    args = parser.parse_args(argv)
    data = load(args.json)
    out = Path(args.out)
    plot = Path(args.plot) if args.plot else out.with_name("contrastive_memory.png")
    plotted = plot_contrastive_memory(data["benchmarks"], plot)
    rel = os.path.relpath(plot, out.parent) if plotted else None
    out.write_text(render(data, args.note, rel))
    print(f"wrote {out}" + (f" and {plot}" if plotted else " (no contrastive results: no plot)"))


if __name__ == "__main__":
    main()
