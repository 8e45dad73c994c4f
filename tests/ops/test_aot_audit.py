"""Device-aware tiles (:mod:`lcl_fast.kernels.tiles`) and the ahead-of-time audit (``benchmarks.aot_audit``).

The selection functions are pure and checked here directly; the reduced audit compiles the
launchers' choices for sm_80, sm_86 and sm_90 with the wheel's ptxas in a subprocess (the test
process interprets the kernels: ``TRITON_INTERPRET=1``) and fails on a configuration that does not
fit or spills at the models' shapes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lcl_fast._impl import triton_available, triton_interpreter

REPO = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
DTYPES = ("fp16", "bf16", "fp32")


@needs_triton
def test_attention_tiles_fit_every_target():
    from lcl_fast.kernels import tiles

    for target in tiles.AOT_TARGETS.values():
        for kind in ("fwd", "dkdv", "dq"):
            for dtype in DTYPES:
                for head_dim in (16, 32, 64, 80, 96, 128, 256):
                    cands = tiles.attention_candidates(target, kind, dtype, head_dim)
                    assert cands and len(set(cands)) == len(cands)
                    assert tiles.attention_tile(target, kind, dtype, head_dim) == cands[0]
                    for t in cands:
                        assert tiles.attention_shared_bytes(target, kind, t, dtype, head_dim) <= target.shared_limit
                    # pure: torch dtypes and names give the same answer, every time
                    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
                    assert tiles.attention_candidates(target, kind, torch_dtype, head_dim) == cands
        pre = tiles.delta_tile(target, "bf16", 64)
        assert pre.block_m >= 16 and pre.num_warps == 4


@needs_triton
def test_smaller_shared_memory_gets_smaller_tiles():
    """sm_86's 99 KiB drops the head-dim-128 tiles that sm_80 and sm_90 keep; an unknown small GPU still runs."""
    from lcl_fast.kernels import tiles

    sm80, sm86 = tiles.AOT_TARGETS["sm_80"], tiles.AOT_TARGETS["sm_86"]
    for kind in ("fwd", "dkdv", "dq"):
        big = tiles.attention_candidates(sm80, kind, "bf16", 128)
        small = tiles.attention_candidates(sm86, kind, "bf16", 128)
        assert set(small) <= set(big)
    turing = tiles.Target(75, 64 * 1024)  # not audited, but its tiles must still fit
    for kind in ("fwd", "dkdv", "dq"):
        for dtype in DTYPES:
            t = tiles.attention_tile(turing, kind, dtype, 128)
            assert tiles.attention_shared_bytes(turing, kind, t, dtype, 128) <= turing.shared_limit
    with pytest.raises(ValueError, match="kind"):
        tiles.attention_candidates(sm80, "bwd", "bf16", 64)
    with pytest.raises(ValueError, match="float16"):
        tiles.dtype_name(torch.float64)


@needs_triton
def test_gemm_tiles_per_target():
    from lcl_fast.kernels import linear_cross_entropy, tiles

    block_n = {}
    for name, target in tiles.AOT_TARGETS.items():
        for dtype in DTYPES:
            for precision in ("ieee", "tf32"):
                t = tiles.contrastive_tile(target, dtype, 768, precision)
                assert tiles.gemm_shared_bytes(t, dtype) <= target.shared_limit
                # the loss aligns its column chunks to block_n: one value per dtype on every target
                assert block_n.setdefault((dtype, precision), t.block_n) == t.block_n, name
            for kernel in ("forward", "backward"):
                blocks = linear_cross_entropy.gpu_blocks(target, kernel, dtype, 768)
                t = tiles.GemmTile(blocks["block_t"], blocks["block_v"], blocks["block_d"], blocks["num_warps"],
                                   blocks["num_stages"])
                assert t == tiles.lm_head_tile(target, kernel, dtype, 768)
                assert tiles.gemm_shared_bytes(t, dtype) <= target.shared_limit


@needs_triton
@pytest.mark.skipif(not triton_interpreter(), reason="CPU tensors with impl='triton' need TRITON_INTERPRET=1")
def test_attention_grid_folds_batch_heads(monkeypatch):
    """B·H above 65535 (grid dimension 1's limit): one 1-D grid, tile index fastest."""
    import lcl_fast.kernels.attention_launch as launch
    import triton

    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(launch, "_attn_fwd", Recorder())
    batch, heads, length = 2, 40000, 20
    q = torch.zeros(1, 1, 1, 16).expand(batch, heads, length, 16)  # no memory behind it
    meta = launch.prepare_metadata(None, None, True, length)
    launch.attention_forward(q, q, q, meta, 0.25, blocks=(16, 32))
    assert grids == [(triton.cdiv(length, 16) * batch * heads,)]


def _record(**kw):
    base = {"kernel": "attention.dkdv", "target": "sm_86", "dtype": "bf16", "head_dim": 64,
            "config": {"block_m": 32}, "regs": 200, "spill_bytes": 0, "shared_bytes": 50000,
            "shared_limit": 101376, "fits": True, "shared_estimate": 60000}
    return {**base, **kw}


def test_audit_rules_catch_what_they_should():
    from benchmarks import aot_audit

    assert aot_audit.problems([_record(), _record(head_dim=128, spill_bytes=512),
                               _record(dtype="fp32", spill_bytes=4096)]) == []
    bad = [
        _record(spill_bytes=8),  # at the model's head dim, 16-bit
        _record(head_dim=128, spill_bytes=1024),
        _record(fits=False, shared_bytes=120000),
        _record(shared_bytes=70000),  # above the launcher's bound
        _record(kernel="lm_head.backward", dim=768, spill_bytes=4, head_dim=None, shared_estimate=None),
        _record(error="out of resource", fits=False, regs=None, spill_bytes=None),
    ]
    found = aot_audit.problems(bad)
    assert len(found) == len(bad), found
    assert "spills 8 B at a model shape" in found[0] and "does not compile" in found[-1]
    table = aot_audit.summary([_record(), _record(spill_bytes=8)])
    assert "| sm_86 | 101376 | 2 | 2 | 1 | 1 (8) | 200 |" in table


@pytest.mark.timeout(400)
@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA: the compiled tests run the kernels themselves")
def test_reduced_audit_compiles_the_chosen_configs(tmp_path):
    out = tmp_path / "audit.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "benchmarks.aot_audit", "--quick", "--json", str(out)]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=390)
    assert run.returncode == 0, f"the reduced audit failed:\n{run.stdout[-4000:]}\n{run.stderr[-3000:]}"
    records = json.loads(out.read_text())["records"]
    assert {r["target"] for r in records} == {"sm_80", "sm_86", "sm_90"}
    kernels = {r["kernel"] for r in records}
    assert {"attention.fwd", "attention.dkdv", "attention.dq", "attention.delta"} <= kernels
    assert {"contrastive.lse", "contrastive.grad_logits", "lm_head.forward", "lm_head.backward"} <= kernels
    for r in records:
        assert r["fits"] and r["spill_bytes"] == 0 and r["regs"] <= 255, r


@needs_triton
def test_live_comparison_reports_matches_and_differences(tmp_path, capsys):
    from lcl_fast.kernels import tiles

    from benchmarks import aot_audit

    sm86 = tiles.AOT_TARGETS["sm_86"]
    records = [dict(case, regs=100, spill_bytes=0) for case in aot_audit.cases(targets=["sm_86"])]
    path = tmp_path / "audit.json"
    path.write_text(json.dumps({"records": records}))
    assert aot_audit.compare_live(str(path), live=sm86) == 0
    assert "DIFFERS" not in capsys.readouterr().out
    records[0]["config"] = {"block_m": 1}
    path.write_text(json.dumps({"records": records}))
    assert aot_audit.compare_live(str(path), live=sm86) == 1
    assert "DIFFERS" in capsys.readouterr().out
    # a GPU that was not audited: shown against the nearest target, not a failure
    assert aot_audit.compare_live(str(path), live=tiles.Target(87, 166912)) == 0


@needs_triton
def test_live_target_is_read_from_the_device_properties(monkeypatch):
    from types import SimpleNamespace

    from lcl_fast.kernels import tiles

    calls = []

    def props(index):
        calls.append(index)
        return SimpleNamespace(major=8, minor=6, shared_memory_per_block_optin=101376)

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    tiles._live_target.cache_clear()
    try:
        assert tiles.device_target(torch.device("cuda", 1)) == tiles.AOT_TARGETS["sm_86"]
        assert tiles.device_target(1) == tiles.AOT_TARGETS["sm_86"]
        assert calls == [1]  # once per device
    finally:
        tiles._live_target.cache_clear()


CPU_TRITON_TESTS = [
    "tests/ops/test_aot_audit.py::test_attention_grid_folds_batch_heads",
    "tests/ops/test_custom_ops.py::test_contrastive_ops",
    "tests/ops/test_custom_ops.py::test_linear_cross_entropy_ops",
    "tests/ops/test_custom_ops.py::test_attention_triton_ops",
]


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs these for real")
def test_cpu_triton_tests_skip_when_compiled():
    """gpu_check runs tests with TRITON_INTERPRET=0: the 5 that hand CPU tensors to impl="triton" skip."""
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton or grid", *CPU_TRITON_TESTS]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "5 skipped" in run.stdout and "passed" not in run.stdout, run.stdout[-3000:]


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split(".")[:2])


@needs_triton
def test_committed_audit_covers_both_compilers_without_spills():
    """Triton 3.6 (the GPU image's) and the newest supported: each audited release compiled every
    chosen tile of every target, the records hold today's tile choices, and nothing spills at
    the models' shapes (attention head dim 64 in 16 bits, d 512/768/1024)."""
    from lcl_fast.kernels import tiles

    from benchmarks import aot_audit

    audits, records = aot_audit.load_audit(str(REPO / "benchmarks" / "aot_audit.json"))
    versions = {a["triton"] for a in audits}
    assert any(_version_tuple(v) == (3, 6) for v in versions), versions
    assert max(_version_tuple(v) for v in versions) >= (3, 9), versions
    for audit in audits:
        assert audit["ptxas"] and audit["problems"] == [], audit
        mine = [r for r in records if r["triton"] == audit["triton"]]
        assert aot_audit.problems(mine) == []
        by_case = {(r["target"], aot_audit.case_id(r)): r for r in mine}
        for case in aot_audit.cases():
            rec = by_case[(case["target"], aot_audit.case_id(case))]
            assert rec["config"] == case["config"], (audit["triton"], case)
            if aot_audit.at_model_shape(rec) and not (rec["kernel"].startswith("attention.")
                                                      and rec["dtype"] == "fp32"):
                assert rec["spill_bytes"] == 0, (audit["triton"], rec)
        dkdv = by_case[("sm_90", ("attention.dkdv", "bf16", None, 64, None))]
        assert dkdv["config"] == tiles.attention_tile(tiles.AOT_TARGETS["sm_90"], "dkdv", "bf16", 64)._asdict()


@needs_triton
def test_live_comparison_uses_the_running_release_and_compares_spills(tmp_path, capsys):
    import triton
    from lcl_fast.kernels import tiles

    from benchmarks import aot_audit

    sm86 = tiles.AOT_TARGETS["sm_86"]
    todo = aot_audit.cases(targets=["sm_86"], quick=True)
    good = [dict(case, regs=100, spill_bytes=0, shared_bytes=1000, triton=triton.__version__) for case in todo]
    stale = [dict(r, config={"block_m": 1}, triton="0.0.1") for r in good]
    path = str(tmp_path / "audit.json")
    aot_audit.write_audit(path, [{"triton": triton.__version__}, {"triton": "0.0.1"}], good + stale)
    same = lambda cases: [dict(c, regs=100, spill_bytes=0, shared_bytes=1000) for c in cases]  # noqa: E731
    report = {}
    assert aot_audit.compare_live(path, live=sm86, measure=same, quick=True, report=report) == 0
    assert report["records_of_triton"] == triton.__version__ and report["mismatches"] == 0
    assert report["spills_and_shared_compared"]
    capsys.readouterr()

    def spilling(cases):
        out = same(cases)
        out[0]["spill_bytes"] = 8  # attention.fwd bf16 D 64: a model shape
        out[1]["shared_bytes"] = 2000
        return out

    report = {}
    assert aot_audit.compare_live(path, live=sm86, measure=spilling, quick=True, report=report) == 1
    text = capsys.readouterr().out
    assert "SPILLS" in text and "DIFFERS (spills/shared)" in text and report["mismatches"] == 2
    # a release that was not audited: the newest audited one's records
    aot_audit.write_audit(path, [{"triton": "0.0.1"}], stale)
    assert aot_audit.compare_live(path, live=sm86, quick=True) == 1
    assert "was not audited" in capsys.readouterr().out
