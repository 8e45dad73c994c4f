"""``gpu_check.json``: what ``benchmarks/gpu_check.sh`` found, rewritten (atomically) after every stage.

    python -m benchmarks.gpu_report init OUT.json --mode gpu --plan kernels,model,... [--env ENV.json]
    python -m benchmarks.gpu_report stage OUT.json --name NAME --rc RC --seconds S --budget B
        [--numbers FILE.json] [--bench FILE.json] [--skip REASON] [--expected]
    python -m benchmarks.gpu_report finish OUT.json      # the verdict; exit 0 when it is "pass"

The file: ``verdict`` ("incomplete" until ``finish``, then "pass" or "fail"), ``mode``, ``device``,
``torch``, ``triton``, ``plan`` (the stages in order) and ``stages``: each ``name``, ``status``
(pass / fail / skipped), ``seconds``, ``budget_s``, a ``reason`` unless it passed, and its
numbers. A stage is "fail" when its command exits non-zero; exit 124 or 137 means its budget
killed it. A skipped stage fails the verdict unless skipping it was expected (``--expected``:
what a CPU dry run cannot do). Standard library only: it runs before and between the stages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any


def _read(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def write_atomic(path: str, data: dict[str, Any]) -> None:
    """Write ``path`` through a temporary file in its folder and a rename: a kill leaves the old or the new."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def bench_numbers(path: str) -> dict[str, Any]:
    """The headline numbers of a ``pytest --benchmark-json`` file, one row per benchmark."""
    data = _read(path)
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        row = {"name": bench.get("name"), "group": bench.get("group"), "impl": info.get("impl"),
               "median_s": round(bench.get("stats", {}).get("median", float("nan")), 6)}
        for key in ("throughput", "throughput_unit", "speedup_vs_reference", "memory_vs_reference",
                    "peak_memory_mib", "warmup_s", "compilations", "tflops"):
            if info.get(key) is not None:
                row[key] = info[key]
        rows.append(row)
    return {"benchmarks": rows, "count": len(rows)}


def verdict(report: dict[str, Any]) -> str:
    stages = {s["name"]: s for s in report["stages"]}
    if any(s["status"] == "fail" for s in stages.values()):
        return "fail"
    if any(name not in stages for name in report["plan"]):
        return "incomplete"
    ok = all(s["status"] == "pass" or (s["status"] == "skipped" and s.get("expected")) for s in stages.values())
    return "pass" if ok else "fail"


def cmd_init(args) -> int:
    report = {"verdict": "incomplete", "mode": args.mode, "device": None, "torch": None, "triton": None,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "plan": args.plan.split(","),
              "stages": []}
    if args.env and os.path.exists(args.env):
        report.update(_read(args.env))
    write_atomic(args.out, report)
    return 0


def cmd_stage(args) -> int:
    report = _read(args.out)
    stage: dict[str, Any] = {"name": args.name, "seconds": round(args.seconds, 1), "budget_s": args.budget}
    if args.skip is not None:
        stage.update(status="skipped", reason=args.skip, expected=args.expected)
    elif args.rc == 0:
        stage["status"] = "pass"
    else:
        stage["status"] = "fail"
        stage["reason"] = (f"killed at its budget of {args.budget} s (timeout)" if args.rc in (124, 137)
                           else f"exit status {args.rc}")
    stage["rc"] = args.rc
    for path, reader in ((args.numbers, _read), (args.bench, bench_numbers)):
        if path and os.path.exists(path) and os.path.getsize(path):
            try:
                stage.update(reader(path))
            except (OSError, ValueError) as exc:  # a half-written file after a kill: say so, keep going
                stage.setdefault("notes", []).append(f"could not read {os.path.basename(path)}: {exc}")
    if args.note:
        stage.setdefault("notes", []).append(args.note)
    report["stages"] = [s for s in report["stages"] if s["name"] != args.name] + [stage]
    report["verdict"] = verdict(report) if verdict(report) == "fail" else "incomplete"
    report["elapsed_s"] = round(args.elapsed, 1) if args.elapsed is not None else None
    write_atomic(args.out, report)
    print(f"== {args.name}: {stage['status']} in {stage['seconds']} s" + (f" ({stage['reason']})"
                                                                         if "reason" in stage else ""))
    return 0


def cmd_finish(args) -> int:
    report = _read(args.out)
    report["verdict"] = verdict(report)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if args.elapsed is not None:
        report["elapsed_s"] = round(args.elapsed, 1)
    write_atomic(args.out, report)
    lines = [f"{s['name']:10s} {s['status']:8s} {s['seconds']:7.1f} s  {s.get('reason', '')}" for s in report["stages"]]
    print("\n".join(lines) + f"\nverdict: {report['verdict']}")
    return 0 if report["verdict"] == "pass" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    init = sub.add_parser("init")
    init.add_argument("out")
    init.add_argument("--mode", choices=["gpu", "dry-run"], required=True)
    init.add_argument("--plan", required=True, help="comma-separated stage names, in order")
    init.add_argument("--env", help="JSON with device, torch, triton (written by the check)")
    stage = sub.add_parser("stage")
    stage.add_argument("out")
    stage.add_argument("--name", required=True)
    stage.add_argument("--rc", type=int, default=0)
    stage.add_argument("--seconds", type=float, default=0.0)
    stage.add_argument("--budget", type=int, default=0)
    stage.add_argument("--elapsed", type=float, help="seconds since the check started")
    stage.add_argument("--numbers", help="JSON whose keys join the stage's record")
    stage.add_argument("--bench", help="pytest-benchmark JSON: its headline numbers join the record")
    stage.add_argument("--skip", metavar="REASON", help="the stage did not run, because REASON")
    stage.add_argument("--expected", action="store_true", help="with --skip: by design (the dry run)")
    stage.add_argument("--note")
    finish = sub.add_parser("finish")
    finish.add_argument("out")
    finish.add_argument("--elapsed", type=float)
    args = parser.parse_args(argv)
    return {"init": cmd_init, "stage": cmd_stage, "finish": cmd_finish}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
