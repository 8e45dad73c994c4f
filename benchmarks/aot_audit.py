"""Ahead-of-time audit of the Triton kernels' launch configurations, for GPUs that are not here.

For each target of :data:`lcl_fast.kernels.tiles.AOT_TARGETS` (sm_80, sm_86, sm_89, sm_90)
this compiles, with Triton's bundled ptxas and no GPU, exactly the configuration each launcher
picks on that target (:mod:`lcl_fast.kernels.tiles`, the same pure functions) at the published
models' shapes, and records what the compiler reports::

    python -m benchmarks.aot_audit --json audit.json             # everything (~20 CPU-minutes)
    python -m benchmarks.aot_audit --quick --json audit.json     # the CI subset (a minute or so)
    python -m benchmarks.aot_audit --live --compare benchmarks/aot_audit.json   # on a GPU
    python -m benchmarks.aot_audit --combine a.json b.json --json both.json      # one file, two compilers

The committed ``benchmarks/aot_audit.json`` holds one audit per Triton release (``audits``: the
compiler, its ptxas per target, the summary and problems; the GPU image's Triton 3.6 and the
newest supported), each record naming its ``triton``. ``--live`` compares the device's choices
with the records of the running Triton (else the newest), and compiles them for the device to
compare registers, spills and shared memory too.

One record per kernel × case × target: ``kernel``, ``target``, ``dtype`` (+ ``precision`` for
float32), ``head_dim`` or ``dim``, ``config``, ``regs``, ``spill_bytes`` (ptxas spill stores),
``shared_bytes`` (what the launch needs), ``shared_limit``, ``fits``. Exit status 1 when a
configuration does not compile or fit, or needs more shared memory than the launcher's bound
(:func:`~lcl_fast.kernels.tiles.attention_shared_bytes`, which prunes the autotuner), or spills
at the models' shapes (attention head dim 64 in 16 bits, contrastive and LM head at d
512/768/1024), or spills 1 KiB or more elsewhere (float32 attention, a checking path, need only fit).

Integer arguments are specialised as a real launch would be (strides of 1 become constants,
multiples of 16 are marked divisible): register counts depend on it. The attention kernels are
compiled with every mask flag on (causal, documents, images: the most live registers) at the
interleaved text shape (L = 280, 12 heads); the others' dims only name the case (``d`` is a
runtime argument), so equal compiles are done once.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Iterable

_DTYPES = ("fp16", "bf16", "fp32")
_HEAD_DIMS = (64, 128)
_MODEL_DIMS = (512, 768, 1024)
_ATTN_SHAPE = {"B": 8, "H": 12, "L": 280}  # LCL_ViT-B-16 text: 12 heads of 64 over 280 tokens
_ROWS = {"n": 256, "m": 2048, "T": 8192, "V": 49411}  # a rank's pairs vs the global batch; tokens, vocab


def _prepare_env() -> None:
    """Compile (never interpret), print ptxas's report, and keep the user's cache clean."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="lcl_aot_audit_")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


# ------------------------------------------------------------------------------ the cases


def _attention_cases(targets, dtypes, head_dims) -> list[dict]:
    from lcl_fast.kernels import tiles

    cases = []
    for name in targets:
        target = tiles.AOT_TARGETS[name]
        for dtype in dtypes:
            for head_dim in head_dims:
                base = {"target": name, "dtype": dtype, "head_dim": head_dim}
                for kind in ("fwd", "dkdv", "dq"):
                    tile = tiles.attention_tile(target, kind, dtype, head_dim)
                    est = tiles.attention_shared_bytes(target, kind, tile, dtype, head_dim)
                    cases.append({**base, "kernel": f"attention.{kind}", "config": tile._asdict(),
                                  "shared_estimate": est})
                pre = tiles.delta_tile(target, dtype, head_dim)
                cases.append({**base, "kernel": "attention.delta",
                              "config": {"block_m": pre.block_m, "num_warps": pre.num_warps,
                                         "num_stages": pre.num_stages}})
    return cases


def _gemm_cases(targets, dtypes, dims) -> list[dict]:
    from lcl_fast.kernels import linear_cross_entropy, tiles

    cases = []
    for name in targets:
        target = tiles.AOT_TARGETS[name]
        for dtype in dtypes:
            # float32 dots: IEEE by default, TF32 once the user allows it (a different kernel)
            for precision in (("ieee", "tf32") if dtype == "fp32" else ("tf32",)):
                base = {"target": name, "dtype": dtype}
                if dtype == "fp32":
                    base["precision"] = precision
                for dim in dims:
                    tile = tiles.contrastive_tile(target, dtype, dim, precision)
                    for kernel in ("lse", "label_logits", "grad_logits"):
                        cases.append({**base, "kernel": f"contrastive.{kernel}", "dim": dim,
                                      "config": tile._asdict()})
                    for kernel in ("forward", "backward"):
                        blocks = linear_cross_entropy.gpu_blocks(target, kernel, dtype, dim)
                        cases.append({**base, "kernel": f"lm_head.{kernel}", "dim": dim, "config": blocks})
    return cases


def cases(quick: bool = False, targets: Iterable[str] | None = None) -> list[dict]:
    """The audit's cases; ``quick``: the CI subset, bf16 at head dim 64 and d 768.

    The subset covers each table once: attention on sm_80 (the Ampere family's tiles with its
    highest register counts) and sm_90, the GEMM kernels on sm_86 (the Ampere family's smallest
    shared memory) and sm_90.
    """
    if quick:
        attn = [t for t in ("sm_80", "sm_90") if targets is None or t in targets]
        gemm = [t for t in ("sm_86", "sm_90") if targets is None or t in targets]
        return _attention_cases(attn, ("bf16",), (64,)) + _gemm_cases(gemm, ("bf16",), (768,))
    names = list(targets or ("sm_80", "sm_86", "sm_89", "sm_90"))
    return _attention_cases(names, _DTYPES, _HEAD_DIMS) + _gemm_cases(names, _DTYPES, _MODEL_DIMS)


# ------------------------------------------------------------------- compiling one case


def _int_spec(value: int) -> tuple[str, str]:
    """(type, attribute) exactly as the launcher's JIT specialises a Python int."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    return native_specialize_impl(BaseBackend, value, False, True, True)


def _launch_values(case: dict) -> tuple[Any, dict, dict]:
    """(jit function, runtime argument values, constexprs) of a case, as its launcher passes them."""
    kernel, dtype = case["kernel"], case["dtype"]
    family, name = kernel.split(".")
    cfg = case["config"]
    tl_dtype = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}[dtype]
    if family == "attention":
        from lcl_fast.kernels import attention as mod

        shape = _ATTN_SHAPE
        head_dim = case["head_dim"]
        fn = {"fwd": mod._attn_fwd, "dkdv": mod._attn_bwd_dkdv, "dq": mod._attn_bwd_dq,
              "delta": mod._attn_bwd_delta}[name]
        block_d = max(16, 1 << (head_dim - 1).bit_length())
        consts = {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_M": cfg["block_m"]}
        if name != "delta":
            consts.update(BLOCK_N=cfg["block_n"], IS_CAUSAL=True, HAS_DOC=True, HAS_IMG=True,
                          INPUT_PRECISION="ieee" if dtype == "fp32" else "tf32")
        values = {}
        for arg in fn.arg_names:
            if arg in consts:
                continue
            if arg in ("LSE", "DELTA"):
                values[arg] = "*fp32"
            elif arg == "META":
                values[arg] = "*i32"
            elif arg in ("qk_scale", "sm_scale"):
                values[arg] = "fp32"
            elif arg in ("H", "L"):
                values[arg] = shape[arg]
            elif arg == "stride_mf":
                values[arg] = shape["B"] * shape["L"]
            elif arg == "stride_mb":
                values[arg] = shape["L"]
            elif arg.startswith("stride_"):  # [B, L, 3, H, D] views: unit stride along D
                values[arg] = 1 if arg.endswith("d") else 3 * shape["H"] * head_dim
            else:
                values[arg] = "*" + tl_dtype
        return fn, values, consts
    dot = case.get("precision", "tf32") if dtype == "fp32" else "tf32"
    if family == "contrastive":
        from lcl_fast.kernels import contrastive as mod

        fn = {"lse": mod._lse_kernel, "label_logits": mod._label_logits_kernel,
              "grad_logits": mod._grad_logits_kernel}[name]
        consts = {"EVEN_K": case["dim"] % cfg["block_k"] == 0, "DOT_PRECISION": "ieee" if dtype != "fp32" else dot,
                  "BLOCK_M": cfg["block_m"], "BLOCK_N": cfg["block_n"], "BLOCK_K": cfg["block_k"]}
        if name != "label_logits":
            consts["SYMMETRIC"] = True
        n, m, d = _ROWS["n"], _ROWS["m"], case["dim"]
        ints = {"n": n, "m": m, "d": d, "cols_per_split": 8 * cfg["block_n"], "stride_a": d, "stride_b": d,
                "stride_part": n, "stride_colp": m, "label_offset": n, "col_start": 0, "col_end": m,
                "stride_g": m}
        typed = {"a_ptr": "*" + tl_dtype, "b_ptr": "*" + tl_dtype, "g_ptr": "*" + tl_dtype}
    else:
        from lcl_fast.kernels import linear_cross_entropy as mod

        fn = {"forward": mod._lse_forward_kernel, "backward": mod._backward_kernel}[name]
        consts = {"BLOCK_T": cfg["block_t"], "BLOCK_V": cfg["block_v"], "BLOCK_D": cfg["block_d"],
                  "DOT_PRECISION": dot, "UPCAST": False}
        if name == "backward":
            consts.update(GROUP_T=mod._GROUP_T, COMPUTE_DH=True, COMPUTE_DW=True)
        t, v, d = _ROWS["T"], _ROWS["V"], case["dim"]
        ints = {"T": t, "V": v, "D": d, "vocab_per_split": 48 * cfg["block_v"], "ignore_index": -100,
                "stride_ht": d, "stride_hd": 1, "stride_wv": d, "stride_wd": 1}
        typed = {"h_ptr": "*" + tl_dtype, "w_ptr": "*" + tl_dtype, "labels_ptr": "*i64"}
    values = {}
    for arg in fn.arg_names:
        if arg in consts:
            continue
        values[arg] = ints[arg] if arg in ints else typed.get(arg, "*fp32")
    return fn, values, consts


def _source(fn, values: dict, consts: dict):
    from triton.compiler import ASTSource

    signature, constexprs, attrs = {}, dict(consts), {}
    for i, arg in enumerate(fn.arg_names):
        if arg in consts:
            signature[arg] = "constexpr"
            continue
        value = values[arg]
        if isinstance(value, str):  # a pointer (16-byte aligned, as torch allocates) or a float
            signature[arg] = value
            if value.startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
            continue
        kind, spec = _int_spec(value)
        if kind == "constexpr":
            signature[arg], constexprs[arg] = "constexpr", value
        else:
            signature[arg] = kind
            if spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)


def compile_case(case: dict) -> dict:
    """Compile one case for its target; the case plus regs, spills, shared memory and ``fits``."""
    from lcl_fast.kernels import tiles
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as triton_compile

    target = tiles.AOT_TARGETS[case["target"]]
    out = dict(case, shared_limit=target.shared_limit)
    cfg = case["config"]
    start = time.perf_counter()
    log = io.StringIO()
    try:
        fn, values, consts = _launch_values(case)
        if type(fn).__name__ == "InterpretedFunction":
            raise RuntimeError("the kernels were imported with TRITON_INTERPRET=1: run the audit in a fresh process")
        with contextlib.redirect_stdout(log):
            compiled = triton_compile(_source(fn, values, consts), target=GPUTarget("cuda", target.arch, 32),
                                      options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
        report = log.getvalue()
        regs = re.search(r"Used (\d+) registers", report)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
        if regs is None or spills is None:
            raise RuntimeError(f"no ptxas report in the compiler's output (a cache hit?): {report[-300:]!r}")
        out.update(regs=int(regs.group(1)), spill_bytes=int(spills.group(1)), spill_loads=int(spills.group(2)),
                   shared_bytes=int(compiled.metadata.shared))
        out["fits"] = out["shared_bytes"] <= target.shared_limit
    except Exception as exc:  # a failed compile is a finding, not a crash of the audit
        out.update(regs=None, spill_bytes=None, spill_loads=None, shared_bytes=None, fits=False,
                   error=f"{type(exc).__name__}: {str(exc)[:400]}")
    out["compile_s"] = round(time.perf_counter() - start, 2)
    return out


# -------------------------------------------------------------------------------- checks


def at_model_shape(record: dict) -> bool:
    """Whether spills are forbidden for ``record``: the shapes the published models train at."""
    if record["kernel"].startswith("attention."):
        return record["head_dim"] == 64 and record["dtype"] != "fp32"
    return record.get("dim") in _MODEL_DIMS


def problems(records: list[dict]) -> list[str]:
    """What breaks the audit's rules, one line per record (empty: all is well)."""
    found = []
    for r in records:
        where = (f"{r['kernel']} {r['target']} {r['dtype']}{'/' + r['precision'] if 'precision' in r else ''} "
                 f"{'D=' + str(r['head_dim']) if 'head_dim' in r else 'd=' + str(r.get('dim'))} {r['config']}")
        if r.get("error"):
            found.append(f"{where}: does not compile: {r['error']}")
        elif not r["fits"]:
            found.append(f"{where}: needs {r['shared_bytes']} B of shared memory, the limit is {r['shared_limit']}")
        elif r.get("shared_estimate") is not None and r["shared_bytes"] > r["shared_estimate"]:
            found.append(f"{where}: {r['shared_bytes']} B of shared memory above the launcher's bound "
                         f"{r['shared_estimate']} (the autotune pruning would let misfits through)")
        elif r["kernel"].startswith("attention.") and r["dtype"] == "fp32":
            continue  # the exact float32 path is for checks: it must fit, spills only slow it
        elif r["spill_bytes"] and at_model_shape(r):
            found.append(f"{where}: spills {r['spill_bytes']} B at a model shape")
        elif r["spill_bytes"] >= 1024:
            found.append(f"{where}: spills {r['spill_bytes']} B (1 KiB or more)")
    return found


def summary(records: list[dict]) -> str:
    """A Markdown table: per target, configurations compiled, fitting, spilling (and the worst spill)."""
    lines = ["| target | shared limit | configs | fit | no spills | spills (max B) | max regs |",
             "|---|---|---|---|---|---|---|"]
    for target in sorted({r["target"] for r in records}):
        rs = [r for r in records if r["target"] == target]
        spilled = [r["spill_bytes"] for r in rs if r.get("spill_bytes")]
        regs = max((r["regs"] or 0) for r in rs)
        lines.append(f"| {target} | {rs[0]['shared_limit']} | {len(rs)} | {sum(r['fits'] for r in rs)} | "
                     f"{sum(r.get('spill_bytes') == 0 for r in rs)} | {len(spilled)} ({max(spilled, default=0)}) "
                     f"| {regs} |")
    return "\n".join(lines)


def _compile_key(case: dict) -> str:
    """What the compiler sees: cases equal in it (dims that are only runtime values) compile once."""
    fn, values, consts = _launch_values(case)
    cfg = case["config"]
    return f"{_source(fn, values, consts).hash()}-{case['target']}-{cfg['num_warps']}-{cfg['num_stages']}"


def case_id(record: dict) -> tuple:
    """A record's case, whatever its target: (kernel, dtype, precision, head dim or dim)."""
    return record["kernel"], record["dtype"], record.get("precision"), record.get("head_dim"), record.get("dim")


def run(case_list: list[dict], jobs: int) -> list[dict]:
    """Compile the cases (each distinct compile once, ``jobs`` processes) in the given order."""
    keys = [_compile_key(case) for case in case_list]
    unique: dict[str, dict] = {}
    for key, case in zip(keys, case_list):
        unique.setdefault(key, case)
    results: dict[str, dict] = {}
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of lcl-fast
        tqdm = None
    todo = list(unique.items())
    if jobs <= 1:
        iterator = (compile_case(case) for _, case in todo)
    else:
        pool = ProcessPoolExecutor(jobs)
        iterator = pool.map(compile_case, [case for _, case in todo])
    if tqdm is not None:
        iterator = tqdm(iterator, total=len(todo), desc="compiling", unit="kernel", file=sys.stderr)
    for (key, _), result in zip(todo, iterator):
        results[key] = result
    if jobs > 1:
        pool.shutdown()
    return [dict(results[key], **case) for key, case in zip(keys, case_list)]


# ---------------------------------------------------------------------------- the audit file


def _version_key(version: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version or "0")[:3])


def load_audit(path: str) -> tuple[list[dict], list[dict]]:
    """(audits, records) of an audit file; a file of one compiler (``meta``) reads as one audit."""
    with open(path) as f:
        data = json.load(f)
    if "audits" in data:
        return data["audits"], data["records"]
    meta = dict(data.get("meta", {}), summary=data.get("summary", ""))
    return [meta], [dict(r, triton=r.get("triton", meta.get("triton"))) for r in data["records"]]


def write_audit(path: str, audits: list[dict], records: list[dict]) -> None:
    """One file, newest Triton first; a record per line."""
    audits = sorted(audits, key=lambda a: _version_key(a.get("triton")), reverse=True)
    order = {a.get("triton"): i for i, a in enumerate(audits)}
    records = sorted(records, key=lambda r: order.get(r.get("triton"), len(order)))
    with open(path, "w") as f:
        f.write('{\n "audits": ' + json.dumps(audits, indent=1).replace("\n", "\n ") + ',\n "records": [\n')
        f.write(",\n".join(json.dumps(r, sort_keys=True) for r in records) + "\n ]\n}\n")


def records_of(records: list[dict], version: str) -> tuple[str, list[dict]]:
    """(the Triton release used, its records): ``version``'s when audited, else the newest audited."""
    versions = sorted({r.get("triton") for r in records}, key=_version_key)
    use = version if version in versions else (versions[-1] if versions else version)
    return use, [r for r in records if r.get("triton") == use]


# --------------------------------------------------------------------- the live device


def compare_live(audit_path: str, live=None, measure=None, quick: bool = False, jobs: int = 1,
                 report: dict | None = None) -> int:
    """Print the live GPU's chosen configurations and whether the audit recorded the same ones.

    ``live``: a :class:`~lcl_fast.kernels.tiles.Target` standing in for the device (tests, the
    dry run). ``measure(cases) -> records`` compiles the chosen configurations for the device
    (:func:`run`): their spills and shared memory are compared with the record too (by default
    on a real device only). Compared with the records of the running Triton when it was
    audited, else the newest audited. Exit status 1 when an audited target's choice, spills or
    shared memory differ from (or are missing in) the record, or a choice spills at a model shape.
    ``report``: filled with the numbers (what ``gpu_check.sh`` records).
    """
    import torch
    import triton
    from lcl_fast.kernels import tiles

    if live is None:
        if not torch.cuda.is_available():
            print("no CUDA device: nothing live to compare")
            return 2
        live = tiles.device_target()
        print(f"live device: {torch.cuda.get_device_name()}")
        if measure is None:
            measure = lambda todo: run(todo, jobs)
    print(f"target {live.name}, {live.shared_limit} B of shared memory per block")
    _, recorded = load_audit(audit_path)
    version, recorded = records_of(recorded, triton.__version__)
    print(f"Triton {triton.__version__} here; comparing with the records of Triton {version}"
          + ("" if version == triton.__version__ else " (this release was not audited)"))
    same_target = [name for name, t in tiles.AOT_TARGETS.items() if t == live]
    if not same_target:
        print(f"{live} is not an audited target: its tiles were not compiled ahead of time; "
              "showing the nearest audited target's records")
    names = same_target or [min(tiles.AOT_TARGETS, key=lambda n: abs(tiles.AOT_TARGETS[n].arch - live.arch))]
    by_case = {case_id(r): r for r in recorded if r["target"] == names[0]}
    todo = cases(quick=quick, targets=names)
    chosen = [dict(case, config=_live_config(case, live)) for case in todo]
    measured = None
    if measure is not None and same_target:
        measured = measure(chosen)
    mismatches, rows = 0, []
    for i, case in enumerate(chosen):
        rec = by_case.get(case_id(case))
        status = "no record" if rec is None else ("match" if rec["config"] == case["config"] else "DIFFERS")
        extra = "" if rec is None else f" (audit {rec['target']}: regs {rec['regs']}, spills {rec['spill_bytes']} B"
        if measured is not None:
            m = measured[i]
            extra += f"; here: regs {m['regs']}, spills {m['spill_bytes']} B, shared {m['shared_bytes']} B"
            if m.get("error") or (m["spill_bytes"] and at_model_shape(m)):
                status = "SPILLS" if not m.get("error") else "DOES NOT COMPILE"
            elif rec is not None and status == "match" and (m["spill_bytes"], m["shared_bytes"]) != (
                    rec["spill_bytes"], rec["shared_bytes"]):
                status = "DIFFERS (spills/shared)"
        extra += ")" if rec is not None else ""
        mismatches += status != "match"
        dims = f"D={case['head_dim']}" if "head_dim" in case else f"d={case['dim']}"
        dtype = case["dtype"] + ("/" + case["precision"] if "precision" in case else "")
        print(f"{case['kernel']:26s} {dtype:9s} {dims:7s} {case['config']} {status}{extra}")
        if status != "match":
            rows.append(f"{case['kernel']} {dtype} {dims} {case['config']}: {status}{extra}")
    print(f"{mismatches} configuration(s) differ from or are missing in {audit_path}"
          + ("" if measured is None else " (choices, spills and shared memory compared)"))
    if report is not None:
        spills = [m["spill_bytes"] for m in measured or [] if m.get("spill_bytes") is not None]
        report.update(target=live.name, triton_here=triton.__version__, records_of_triton=version,
                      compared=len(chosen), mismatches=mismatches, differing=rows[:40],
                      spills_and_shared_compared=measured is not None,
                      max_spill_bytes=max(spills, default=None), max_regs=max(
                          (m["regs"] or 0 for m in measured or []), default=None))
    return 1 if mismatches and same_target else 0


def _live_config(case: dict, live) -> dict:
    """The configuration the launchers pick for ``case`` on the live target."""
    from lcl_fast.kernels import linear_cross_entropy, tiles

    family, name = case["kernel"].split(".")
    if family == "attention" and name == "delta":
        t = tiles.delta_tile(live, case["dtype"], case["head_dim"])
        return {"block_m": t.block_m, "num_warps": t.num_warps, "num_stages": t.num_stages}
    if family == "attention":
        return tiles.attention_tile(live, name, case["dtype"], case["head_dim"])._asdict()
    if family == "contrastive":
        return tiles.contrastive_tile(live, case["dtype"], case["dim"], case.get("precision", "tf32"))._asdict()
    return linear_cross_entropy.gpu_blocks(live, name, case["dtype"], case["dim"])


def _ptxas_version(arch: int) -> str:
    """The release (``V12.9.86``) of the bundled ptxas Triton uses for ``arch``, or why it is unknown."""
    import subprocess

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        out = subprocess.run([get_ptxas(arch).path, "--version"], capture_output=True, text=True, timeout=30).stdout
        found = re.search(r"V(\d+\.\d+\.\d+)", out)
        return found.group(0) if found else out.strip()[-60:]
    except Exception as exc:  # the version is a label: never fail the audit for it
        return f"unknown ({type(exc).__name__})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.aot_audit", description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="OUT", help="write the records (and the summary) to this file")
    parser.add_argument("--quick", action="store_true", help="the CI subset: sm_80/86/90, bf16, D 64, d 768")
    parser.add_argument("--targets", help="comma-separated subset of sm_80,sm_86,sm_89,sm_90")
    parser.add_argument("--only", help="comma-separated kernel families to compile (attention,contrastive,lm_head)")
    parser.add_argument("--merge", metavar="OLD_JSON",
                        help="keep OLD_JSON's records (of this Triton) that were not compiled now (re-audit a part)")
    parser.add_argument("--combine", nargs="+", metavar="AUDIT_JSON",
                        help="with --json: one file holding these audits (a later file wins for one Triton release)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compiling processes")
    parser.add_argument("--live", action="store_true", help="compare the live GPU's choices with --compare")
    parser.add_argument("--compare", metavar="AUDIT_JSON", default="benchmarks/aot_audit.json")
    parser.add_argument("--as-target", metavar="SM", help="with --live: compile for this audited target "
                        "instead of a device (the dry run without a GPU)")
    parser.add_argument("--report-json", metavar="OUT", help="with --live: the comparison's numbers as JSON")
    args = parser.parse_args(argv)
    _prepare_env()
    from lcl_fast.kernels import tiles

    if args.combine:
        if not args.json:
            parser.error("--combine needs --json (the combined file)")
        audits, by_version = {}, {}
        for path in args.combine:  # a later file replaces an earlier one's audit of the same release
            file_audits, file_records = load_audit(path)
            for audit in file_audits:
                version = audit.get("triton")
                audits[version] = audit
                by_version[version] = [r for r in file_records if r.get("triton") == version]
        kept = [r for version_records in by_version.values() for r in version_records]
        write_audit(args.json, list(audits.values()), kept)
        print(f"{args.json}: Triton {', '.join(sorted(audits, key=_version_key))}, {len(kept)} records")
        return 0
    if args.live:
        report: dict = {}
        if args.as_target:
            if args.as_target not in tiles.AOT_TARGETS:
                parser.error(f"--as-target: unknown target {args.as_target!r}; known: {', '.join(tiles.AOT_TARGETS)}")
            status = compare_live(args.compare, live=tiles.AOT_TARGETS[args.as_target],
                                  measure=lambda todo: run(todo, args.jobs), quick=args.quick, report=report)
        else:
            status = compare_live(args.compare, quick=args.quick, jobs=args.jobs, report=report)
        if args.report_json:
            with open(args.report_json, "w") as f:
                json.dump(report, f, indent=1)
        return status
    targets = args.targets.split(",") if args.targets else None
    for name in targets or ():
        if name not in tiles.AOT_TARGETS:
            parser.error(f"--targets: unknown target {name!r}; known: {', '.join(tiles.AOT_TARGETS)}")
    only = set(args.only.split(",")) if args.only else None
    if only and not only <= {"attention", "contrastive", "lm_head"}:
        parser.error(f"--only: unknown families {sorted(only - {'attention', 'contrastive', 'lm_head'})}")
    import triton

    start = time.perf_counter()
    todo = [c for c in cases(quick=args.quick, targets=targets) if not only or c["kernel"].split(".")[0] in only]
    records = [dict(r, triton=triton.__version__) for r in run(todo, args.jobs)]
    if args.merge:
        done = {(r["target"], case_id(r)) for r in records}
        _, old = records_of(load_audit(args.merge)[1], triton.__version__)
        kept = [r for r in old if r.get("triton") == triton.__version__ and (r["target"], case_id(r)) not in done]
        records = kept + records
    found = problems(records)
    table = summary(records)
    print(table)
    print("\n".join(found) if found else "every configuration fits, no spills at the models' shapes")
    if args.json:
        ptxas = {name: _ptxas_version(tiles.AOT_TARGETS[name].arch) for name in sorted({r["target"] for r in records})}
        meta = {"triton": triton.__version__, "ptxas": ptxas,
                "date": time.strftime("%Y-%m-%d", time.gmtime()),
                "quick": args.quick, "wall_s": round(time.perf_counter() - start, 1), "problems": found,
                "summary": table}
        if args.merge:
            meta["merged"] = f"{len(todo)} cases compiled now; the others' records from {args.merge}"
        write_audit(args.json, [meta], records)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
