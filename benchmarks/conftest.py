"""pytest wiring of the benchmarks.

- Collects ``bench_*.py`` (not ``test_*.py``), so ``python -m pytest tests/`` never sees them,
  and marks them skipped unless ``--benchmark-only`` is given, so a plain ``pytest`` from the
  repository root does not spend minutes timing things.
- Adds torch/triton/CUDA versions and the scale to the JSON's ``machine_info``.
- Fills ``speedup_vs_reference`` / ``memory_vs_reference`` for every benchmark of a group once
  the session is over (whatever order they ran in), in the JSON and in a terminal summary.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import _harness as h

HERE = Path(__file__).resolve().parent
# Timings on a shared machine mean little without the load they were taken under.
_LOAD_AT_START = os.getloadavg() if hasattr(os, "getloadavg") else None


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    # A file named on the command line is collected by pytest itself whatever its name.
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and HERE in file_path.parents:
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("benchmark_only", default=False):
        return
    skip = pytest.mark.skip(reason="benchmarks run with `pytest benchmarks/ --benchmark-only`")
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _free_memory_between_benchmarks() -> Any:
    h.release_memory()
    yield
    h.release_memory()


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return h.device()


@pytest.fixture(scope="session")
def bench_scale() -> str:
    return h.scale()


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return getattr(__import__(module), "__version__", "unknown")
    except Exception as err:  # a broken install should not break the benchmark JSON
        return f"unimportable ({type(err).__name__})"


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    machine_info.update(
        torch=torch.__version__,
        triton=_version("triton"),
        cuda=torch.version.cuda,
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        torch_threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        lcl_bench_scale=h.scale(),
        load_average_1_5_15min_start=_LOAD_AT_START,
        load_average_1_5_15min_end=os.getloadavg() if hasattr(os, "getloadavg") else None,
        platform=platform.platform(),
        competitors={
            name: _version(name)
            for name in ("flash_attn", "xformers", "inf_cl", "liger_kernel", "cut_cross_entropy")
        },
    )


def _fill_ratios(entries: list[dict[str, Any]]) -> None:
    """Set the ratio keys of every entry from its group's ``reference`` entry (in place)."""
    for group in {e.get("group") for e in entries}:
        members = [e for e in entries if e.get("group") == group]
        ref = next((e["extra_info"] for e in members if e["extra_info"].get("impl") == h.REFERENCE), None)
        for entry in members:
            entry["extra_info"].update(h.ratios(entry["extra_info"], ref))


_SKIPPED: list[dict[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Remember why a contender was skipped (not installed, no CUDA, out of memory…) for the report."""
    if report.skipped and report.when in ("setup", "call") and "benchmarks/" in report.nodeid.replace("\\", "/"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append({"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")})


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: list, output_json: dict[str, Any]) -> None:
    _fill_ratios(output_json.get("benchmarks", []))
    output_json["lcl_skipped"] = list(_SKIPPED)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not h.SESSION.groups and not h.SESSION.failed:
        return
    entries = [
        {"group": group, "extra_info": info} for group, impls in h.SESSION.groups.items() for info in impls.values()
    ]
    _fill_ratios(entries)
    tr = terminalreporter
    tr.section("lcl-fast vs reference (ratios: reference ÷ this, above 1 is better)")
    tr.write_line(f"{'group':<52} {'impl':<16} {'median s':>10} {'throughput':>22} {'peak MiB':>10} "
                  f"{'speedup':>8} {'memory':>8}")
    for group in sorted(set(h.SESSION.groups) | set(h.SESSION.failed)):
        for impl, info in h.SESSION.groups.get(group, {}).items():
            throughput = f"{info.get('throughput', 0):.4g} {info.get('throughput_unit', '')}"
            tr.write_line(
                f"{group:<52} {impl:<16} {_fmt(info.get('time_median_s'), '.4g'):>10} {throughput:>22} "
                f"{_fmt(info.get('peak_memory_mib'), '.1f'):>10} "
                f"{_fmt(info.get('speedup_vs_reference'), '.2f'):>8} "
                f"{_fmt(info.get('memory_vs_reference'), '.2f'):>8}"
            )
        for impl, why in h.SESSION.failed.get(group, {}).items():
            tr.write_line(f"{group:<52} {impl:<16} {why}")
