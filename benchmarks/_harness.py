"""Shared machinery of the benchmarks: device and sizes, timing, peak memory, ratios to reference.

Every benchmark goes through :func:`measure`, which

1. on CUDA, runs the call once to warm up (Triton compiles and autotunes there, outside any
   measurement);
2. measures peak memory in one run (see below), which on the CPU doubles as the warm-up;
3. times ``rounds`` calls with ``benchmark.pedantic``; on CUDA the timed call synchronises the
   device, so the time is the kernels' time, not the launch time. ``rounds`` adapts to the
   call's cost (one round for a multi-second CPU call, up to 30 for a millisecond GPU call;
   ``LCL_BENCH_ROUNDS`` forces a count);
4. writes throughput, peak memory and the ratios against ``reference`` of the same group into
   ``benchmark.extra_info``.

A call marked ``heavy`` (seconds of work on the CPU: the 8192-row reference losses, the model
steps) runs exactly once on the CPU: the memory-profiled call is the timed one. The profiler
then costs microseconds per op against seconds of work (under 1%), and the suite stays within
its time budget on 2 cores. ``LCL_BENCH_ROUNDS`` turns that off.

Peak memory is the peak, above what was allocated before the call, of:

- CUDA: ``torch.cuda.max_memory_allocated`` (reset before the call): tensor memory, exact.
- CPU (``memory_method="torch_profiler_alloc_peak"``): the running sum of every allocation and
  free of the c10 CPU allocator during the call, read from ``torch.profiler`` with
  ``profile_memory=True``. It counts exactly the tensors (activations, saved tensors,
  gradients, temporaries) and nothing else, with no allocator caching to blur it. One caveat,
  which the benchmarks respect: the profiler cannot see the call free a tensor allocated before
  it (outside a profiled run), so a measured call must not drop pre-existing tensors (the
  training step starts without gradients for that reason). The process's
  resident-set high-water mark delta (``/proc/self/status`` VmHWM, reset through
  ``/proc/self/clear_refs``) is recorded beside it as ``peak_rss_delta_bytes``; it also sees
  non-tensor memory but under-counts in a long-lived process, whose freed heap pages are reused.
- CPU, work that is not tensors (the data path's decoders), ``memory_method=
  "subprocess_rss_hwm_delta"``: the RSS high-water-mark growth of a fresh Python process during
  its one call (``memory_subprocess=``); that call is a cold one, so one-time set-up (thread
  pools, pipelines) is included.
"""

from __future__ import annotations

import gc
import importlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCALES = ("smoke", "small", "full")
REFERENCE = "reference"
RATIO_KEYS = ("speedup_vs_reference", "memory_vs_reference")
# A call of this many FLOPs takes seconds on a 2-core CPU: run it once there (see the module doc).
HEAVY_FLOP = 3e10
# Work units a benchmark can declare, and the throughput key each becomes in extra_info.
THROUGHPUT_KEYS = {
    "samples": ("samples_per_s", "samples/s"),
    "pairs": ("pairs_per_s", "pairs/s"),
    "tokens": ("tokens_per_s", "tokens/s"),
    "images": ("images_per_s", "images/s"),
    "flop": ("tflops", "TFLOP/s"),
}


# --------------------------------------------------------------------------- device and sizes
def device() -> torch.device:
    """The device the benchmarks run on: the current CUDA device when there is one."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def on_cuda() -> bool:
    return device().type == "cuda"


def scale() -> str:
    """``LCL_BENCH_SCALE`` or the device's default: ``full`` with CUDA, ``small`` on the CPU.

    ``small`` finishes the whole suite in a few minutes on 2 CPU cores; ``full`` uses shapes
    near the published configurations; ``smoke`` is tiny, to check the harness in seconds.
    """
    value = os.environ.get("LCL_BENCH_SCALE") or ("full" if on_cuda() else "small")
    if value not in SCALES:
        raise ValueError(f"LCL_BENCH_SCALE must be one of {SCALES}, got {value!r}")
    return value


def by_scale(smoke: Any, small: Any, full: Any) -> Any:
    """Pick the value for the current scale."""
    return {"smoke": smoke, "small": small, "full": full}[scale()]


def compute_dtype() -> torch.dtype:
    """bfloat16 on CUDA (as the published mixed-precision training), float32 on the CPU."""
    return torch.bfloat16 if on_cuda() else torch.float32


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device()).manual_seed(seed)


def require_impl(impl: str) -> None:
    """Skip impls the current device cannot time meaningfully."""
    if impl == "triton" and not on_cuda():
        pytest.skip("triton needs CUDA (interpreter timings on the CPU would be meaningless)")


def import_or_skip(module: str, attr: str | None = None, reason: str = "") -> Any:
    """Import ``module`` (and ``attr`` of it) or skip the benchmark with the import error as reason."""
    try:
        mod = importlib.import_module(module)
        return getattr(mod, attr) if attr else mod
    except Exception as err:  # ImportError, or a half-written module failing at import
        pytest.skip(f"{module}{'.' + attr if attr else ''} not importable{reason}: {type(err).__name__}: {err}")


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- peak memory
def _rss_bytes(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _profiler_alloc_peak(prof: torch.profiler.profile) -> int | None:
    """Peak of the running allocation sum in a ``profile_memory=True`` trace, or None if unreadable."""
    try:
        events = prof.profiler.kineto_results.events()
        allocs = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except AttributeError:  # the (private) results API moved: fall back to RSS
        return None
    running = peak = 0
    for _, nbytes in allocs:
        running += nbytes
        peak = max(peak, running)
    return peak


def cpu_peak_memory(fn: Callable[[], Any]) -> tuple[int | None, int | None]:
    """(tensor allocation peak, RSS high-water-mark delta) of one call of ``fn`` on the CPU."""
    rss_ok = _reset_rss_peak()
    rss_before = _rss_bytes("VmRSS")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    hwm = _rss_bytes("VmHWM")
    rss_delta = hwm - rss_before if rss_ok and hwm is not None and rss_before is not None else None
    return _profiler_alloc_peak(prof), rss_delta


def subprocess_peak_rss(prepare: str, kwargs: dict[str, Any], timeout_s: float = 600) -> int | None:
    """Peak RSS growth of a fresh process during one call of ``prepare(**kwargs)()``.

    ``prepare`` is ``"module:function"``; the function builds the inputs and returns the call
    (set-up stays outside the measurement). None when the probe fails (reason on stderr).
    """
    code = (
        "import importlib, json, sys\n"
        "from benchmarks import _harness as h\n"
        "module, name = sys.argv[1].split(':')\n"
        "call = getattr(importlib.import_module(module), name)(**json.loads(sys.argv[2]))\n"
        "ok = h._reset_rss_peak()\n"
        "before = h._rss_bytes('VmRSS')\n"
        "call()\n"
        "peak = h._rss_bytes('VmHWM')\n"
        "print('PEAK_RSS_DELTA', peak - before if ok and peak is not None and before is not None else -1)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, prepare, json.dumps(kwargs)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("PEAK_RSS_DELTA "):
            value = int(line.split()[1])
            return value if value >= 0 else None
    sys.stderr.write(f"memory probe {prepare}({kwargs}) failed:\n{proc.stderr[-2000:]}\n")
    return None


def cuda_peak_memory(fn: Callable[[], Any], dev: torch.device) -> tuple[int, float]:
    """(peak CUDA allocation above the allocation before the call, seconds) for one call of ``fn``."""
    release_memory()
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    return torch.cuda.max_memory_allocated(dev) - before, seconds


def is_oom(err: BaseException) -> bool:
    if isinstance(err, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(err)
    return isinstance(err, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text or isinstance(err, MemoryError)
    )


# --------------------------------------------------------------------------- ratios
def ratios(this: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, float | None]:
    """``reference ÷ this`` for time and peak memory (above 1: this is faster / leaner)."""
    out: dict[str, float | None] = dict.fromkeys(RATIO_KEYS)
    if not reference:
        return out
    t, t_ref = this.get("time_median_s"), reference.get("time_median_s")
    m, m_ref = this.get("peak_memory_bytes"), reference.get("peak_memory_bytes")
    if this.get("speedup_by") == "throughput":  # contenders did different work (packed rows): compare rates
        r, r_ref = this.get("throughput"), reference.get("throughput")
        if r and r_ref and this.get("throughput_unit") == reference.get("throughput_unit"):
            out["speedup_vs_reference"] = round(r / r_ref, 4)
    elif t and t_ref:
        out["speedup_vs_reference"] = round(t_ref / t, 4)
    if m and m_ref:
        out["memory_vs_reference"] = round(m_ref / m, 4)
    return out


@dataclass
class SessionResults:
    """What this pytest session measured, group → impl → extra_info (for the ratios)."""

    groups: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    failed: dict[str, dict[str, str]] = field(default_factory=dict)  # group → impl → why (OOM…)

    def add(self, group: str, impl: str, info: dict[str, Any]) -> None:
        self.groups.setdefault(group, {})[impl] = info

    def reference(self, group: str) -> dict[str, Any] | None:
        return self.groups.get(group, {}).get(REFERENCE)


SESSION = SessionResults()


# --------------------------------------------------------------------------- the measurement
def _rounds(seconds_per_call: float) -> int:
    forced = os.environ.get("LCL_BENCH_ROUNDS")
    if forced:
        return max(1, int(forced))
    target, lo, hi = (1.0, 3, 30) if on_cuda() else (2.0, 1, 10)
    return max(lo, min(hi, math.ceil(target / max(seconds_per_call, 1e-6))))


def measure(
    benchmark: Any,
    fn: Callable[[], Any],
    *,
    group: str,
    impl: str,
    work: dict[str, float],
    params: dict[str, Any] | None = None,
    memory_subprocess: tuple[str, dict[str, Any]] | None = None,
    heavy: bool | None = None,
) -> dict[str, Any]:
    """Warm up, measure peak memory, time ``fn`` and record everything in ``benchmark.extra_info``.

    ``work`` declares what one call processes, e.g. ``{"samples": 64, "flop": 3e12}``; the first
    key is the headline throughput. ``memory_subprocess=("module:prepare", kwargs)``: on the
    CPU, the peak memory is a fresh process's RSS growth (for work that is not tensors; see
    :func:`subprocess_peak_rss`). ``heavy``: on the CPU, one call only,
    profiled and timed together (default: when ``work["flop"]`` is at least ``HEAVY_FLOP``).
    Returns the extra_info dict.
    """
    dev = device()
    benchmark.group = group
    info = benchmark.extra_info
    info.update(impl=impl, device=str(dev), scale=scale(), **(params or {}))
    if heavy is None:
        heavy = work.get("flop", 0.0) >= HEAVY_FLOP
    single_cpu_run = dev.type == "cpu" and heavy and not os.environ.get("LCL_BENCH_ROUNDS")
    info["single_profiled_run"] = single_cpu_run
    cpu_peaks: list[tuple[int | None, int | None]] = []
    timed = fn
    if dev.type == "cuda":
        def timed() -> None:
            fn()
            torch.cuda.synchronize(dev)
    elif single_cpu_run:
        def timed() -> None:
            cpu_peaks.append(cpu_peak_memory(fn))

    oom = None
    try:
        if dev.type == "cuda":
            timed()  # warm-up: Triton JIT and autotuning, cuBLAS handles, allocator growth
            info["peak_memory_bytes"], seconds = cuda_peak_memory(fn, dev)
            info["memory_method"] = "cuda_max_memory_allocated"
            rounds = _rounds(seconds)
        elif single_cpu_run:
            rounds = 1
        else:
            start = time.perf_counter()
            cpu_peaks.append(cpu_peak_memory(fn))  # doubles as the warm-up
            rounds = _rounds(time.perf_counter() - start)
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
    except Exception as err:
        if not is_oom(err):
            raise
        oom = (str(err).splitlines() or [""])[0][:200]
    if oom is not None:  # outside the except block: the traceback's frames (and tensors) are gone
        SESSION.failed.setdefault(group, {})[impl] = "out of memory"
        release_memory()
        pytest.skip(f"{impl} ran out of memory in {group!r}: {oom}")

    if cpu_peaks:
        tensor_peak, rss_delta = cpu_peaks[0]
        info["peak_rss_delta_bytes"] = rss_delta
        if memory_subprocess is not None:
            info.update(peak_memory_bytes=subprocess_peak_rss(*memory_subprocess),
                        memory_method="subprocess_rss_hwm_delta", peak_tensor_bytes=tensor_peak)
        elif tensor_peak is None:
            info.update(peak_memory_bytes=rss_delta, memory_method="rss_hwm_delta")
        else:
            info.update(peak_memory_bytes=tensor_peak, memory_method="torch_profiler_alloc_peak")
    median = benchmark.stats.stats.median
    info["time_median_s"] = median
    info["rounds"] = rounds
    if info.get("peak_memory_bytes") is not None:
        info["peak_memory_mib"] = round(info["peak_memory_bytes"] / 2**20, 2)
    first = True
    for unit, amount in work.items():
        key, label = THROUGHPUT_KEYS[unit]
        value = amount / median / (1e12 if unit == "flop" else 1.0)
        info[key] = round(value, 4 if unit == "flop" else 2)
        if first:
            info.update(throughput=info[key], throughput_unit=label)
            first = False
    SESSION.add(group, impl, info)
    info.update(ratios(info, SESSION.reference(group)))
    return info
