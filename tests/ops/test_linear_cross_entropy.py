"""Tests for lcl_fast.ops.linear_cross_entropy: torch, reference and Triton paths.

Ground truth is float64 ``F.cross_entropy`` on full logits, plus the reference code's golden
generation losses. The Triton kernels run on CUDA when there is one. On the CPU they need
``TRITON_INTERPRET=1`` set before Triton decorates them (at the kernel module's first import),
which this module cannot promise from inside a pytest session without depending on import
order. So: if the variable is already set (by the caller, or by a test module collected
earlier) and the kernels are not yet imported in compiled mode, the ``test_triton_*`` tests
run here; otherwise ``test_kernels_in_interpreter_subprocess`` re-runs them in a fresh
``TRITON_INTERPRET=1`` pytest process. Either way they run exactly once.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lcl_fast._impl import triton_available
from lcl_fast.ops import linear_cross_entropy as lce_mod
from lcl_fast.ops.linear_cross_entropy import linear_cross_entropy
from tests._compare import assert_close, rel_err

REPO = Path(__file__).resolve().parents[2]
SHAPES = [(1, 7, 5), (17, 33, 130), (130, 64, 517)]  # (T, D, V): nothing a multiple of a tile
REDUCTIONS = ["mean", "sum", "none"]


def _triton_device() -> str | None:
    """Where this process can run the kernels: "cuda", "cpu" (interpreter) or None (subprocess)."""
    if not triton_available():
        return None
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    kernels = sys.modules.get("lcl_fast.kernels.linear_cross_entropy")
    if kernels is not None and type(kernels._lse_forward_kernel).__name__ != "InterpretedFunction":
        return None  # imported in compiled mode before the variable was set
    return "cpu"


TRITON_DEVICE = _triton_device()
needs_triton = pytest.mark.skipif(
    TRITON_DEVICE is None,
    reason="no CUDA and no TRITON_INTERPRET=1: covered by test_kernels_in_interpreter_subprocess",
)


@pytest.fixture(params=["default", "tiny"])
def tiles(request, monkeypatch):
    """The torch path with its real tile sizes and with tiles of a few rows/columns."""
    if request.param == "tiny":
        monkeypatch.setattr(lce_mod, "_TILE_BYTES", 2560)  # fused: a few tokens per chunk
        monkeypatch.setattr(lce_mod, "_VOCAB_CHUNK", 64)  # recompute: 64 columns, 10 rows
        monkeypatch.setattr(lce_mod, "_FUSED_VOCAB_CHUNK", 48)  # fused: matmuls of 48 columns
    return request.param


def _problem(T, D, V, seed, *, ignore_every=4, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * (3.0 / math.sqrt(D))  # peaked softmax
    labels = torch.randint(0, V, (T,), generator=g)
    labels[::ignore_every] = ignore_index
    return hidden, weight, labels, g


def _upstream(reduction, T, g, dtype):
    """A non-trivial incoming gradient (the loss is scaled or weighted before backward)."""
    if reduction == "none":
        return torch.randn(T, generator=g, dtype=dtype)
    return torch.tensor(0.5 + torch.rand((), generator=g, dtype=torch.float64).item(), dtype=dtype)


def _oracle(hidden, weight, labels, ignore_index, reduction, upstream):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    per_token = F.cross_entropy(h @ w.T, labels, ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        loss = per_token
    else:
        loss = per_token.sum()
        if reduction == "mean":
            loss = loss / max(int((labels != ignore_index).sum()), 1)
    (loss * upstream.double()).sum().backward()
    return loss.detach(), h.grad, w.grad


def _run(impl, hidden, weight, labels, ignore_index, reduction, upstream, dtype, device="cpu"):
    h = hidden.detach().to(device=device, dtype=dtype).requires_grad_()
    w = weight.detach().to(device=device, dtype=dtype).requires_grad_()
    loss = linear_cross_entropy(
        h, w, labels.to(device), ignore_index=ignore_index, reduction=reduction, impl=impl
    )
    (loss * upstream.to(device=device, dtype=loss.dtype)).sum().backward()
    return loss.detach().cpu(), h.grad.cpu(), w.grad.cpu()


def _assert_rel(actual, expected, rel, name):
    """Elementwise check with an absolute floor at ``rel`` of the largest expected value."""
    floor = rel * float(expected.abs().max()) if expected.numel() else 0.0
    assert_close(actual, expected, rtol=rel, atol=floor, name=name)


def _assert_no_worse(actual, reference, oracle, name, factor=2.0):
    """``actual``'s error against the float64 oracle is within ``factor`` x the reference impl's."""
    err = rel_err(actual, oracle)
    ref = rel_err(reference, oracle)
    assert torch.isfinite(actual.float()).all(), f"{name}: non-finite values"
    assert err <= factor * ref + 1e-6, f"{name}: error {err:.3e} vs reference path's {ref:.3e}"


# --------------------------------------------------------------------------------------------------
# torch and reference paths against float64


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_torch_float32_matches_float64(shape, reduction, tiles):
    hidden, weight, labels, g = _problem(*shape, seed=sum(shape))
    upstream = _upstream(reduction, shape[0], g, torch.float64)
    want = _oracle(hidden, weight, labels, -100, reduction, upstream)
    got = _run("torch", hidden, weight, labels, -100, reduction, upstream, torch.float32)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    for a, e, name in zip(got, want, ("loss", "d_hidden", "d_weight")):
        _assert_rel(a, e, 2e-5, name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_reference_float32_matches_float64(shape, reduction):
    hidden, weight, labels, g = _problem(*shape, seed=sum(shape) + 1)
    upstream = _upstream(reduction, shape[0], g, torch.float64)
    want = _oracle(hidden, weight, labels, -100, reduction, upstream)
    got = _run("reference", hidden, weight, labels, -100, reduction, upstream, torch.float32)
    for a, e, name in zip(got, want, ("loss", "d_hidden", "d_weight")):
        _assert_rel(a, e, 2e-5, name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_float64_is_exact(reduction, tiles):
    hidden, weight, labels, g = _problem(67, 40, 301, seed=7, ignore_index=3)
    upstream = _upstream(reduction, 67, g, torch.float64)
    want = _oracle(hidden, weight, labels, 3, reduction, upstream)
    got = _run("torch", hidden, weight, labels, 3, reduction, upstream, torch.float64)
    assert got[0].dtype == torch.float64
    for a, e, name in zip(got, want, ("loss", "d_hidden", "d_weight")):
        _assert_rel(a, e, 1e-12, name)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_low_precision_no_worse_than_reference(dtype, reduction, tiles):
    hidden, weight, labels, g = _problem(67, 48, 389, seed=11)
    hidden, weight = hidden.to(dtype).double(), weight.to(dtype).double()  # the oracle sees the same inputs
    upstream = _upstream(reduction, 67, g, torch.float32)
    want = _oracle(hidden, weight, labels, -100, reduction, upstream)
    ref = _run("reference", hidden, weight, labels, -100, reduction, upstream, dtype)
    got = _run("torch", hidden, weight, labels, -100, reduction, upstream, dtype)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == dtype
    for a, r, e, name in zip(got, ref, want, ("loss", "d_hidden", "d_weight")):
        _assert_no_worse(a, r, e, name)


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("T", [0, 9])
def test_all_ignored_gives_zero_not_nan(T, reduction, impl, tiles):
    hidden, weight, labels, g = _problem(T, 12, 37, seed=3)
    labels = torch.full((T,), -100, dtype=torch.long)
    h = hidden.float().requires_grad_()
    w = weight.float().requires_grad_()
    loss = linear_cross_entropy(h, w, labels, reduction=reduction, impl=impl)
    loss.sum().backward()
    assert torch.equal(loss.detach(), torch.zeros_like(loss)), f"loss {loss}"
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_partial_requires_grad_and_no_grad(tiles):
    hidden, weight, labels, _ = _problem(29, 20, 150, seed=5)
    hidden, weight = hidden.float(), weight.float()
    full = _run("torch", hidden, weight, labels, -100, "mean", torch.tensor(1.0), torch.float32)
    h = hidden.clone().requires_grad_()
    linear_cross_entropy(h, weight, labels, impl="torch").backward()
    w = weight.clone().requires_grad_()
    linear_cross_entropy(hidden, w, labels, impl="torch").backward()
    with torch.no_grad():
        plain = linear_cross_entropy(hidden, weight, labels, impl="torch")
    assert_close(h.grad, full[1], rtol=1e-6, atol=1e-7, name="d_hidden alone")
    assert_close(w.grad, full[2], rtol=1e-6, atol=1e-7, name="d_weight alone")
    assert_close(plain, full[0], rtol=1e-6, atol=0, name="no-grad loss")


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_autocast_computes_the_head_in_the_autocast_dtype(impl, tiles):
    hidden, weight, labels, _ = _problem(29, 20, 150, seed=8)
    h = hidden.float().requires_grad_()
    w = weight.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, labels, impl=impl)
    loss.backward()
    one = torch.tensor(1.0)
    want = _run(impl, hidden.bfloat16(), weight.bfloat16(), labels, -100, "mean", one, torch.bfloat16)
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
    assert_close(loss, want[0], rtol=0, atol=0, name="loss")
    assert_close(h.grad, want[1].float(), rtol=0, atol=0, name="d_hidden")
    assert_close(w.grad, want[2].float(), rtol=0, atol=0, name="d_weight")


def test_fused_workspace_is_kept_grown_and_lent_once():
    """The CPU buffer survives calls, grows for a bigger tile, and a second borrower gets its own."""
    lce_mod.release_workspace()
    ws, cpu = lce_mod._WORKSPACE, torch.device("cpu")
    with ws.borrow(10, torch.float32, cpu) as a:
        with ws.borrow(10, torch.float32, cpu) as busy:
            assert busy.data_ptr() != a.data_ptr()
    with ws.borrow(8, torch.float32, cpu) as b:
        assert b.data_ptr() == a.data_ptr()
    with ws.borrow(20, torch.float32, cpu) as c:
        assert c.numel() >= 20
    # a small problem after a bigger one (a buffer longer than the tile) still gives the oracle's values
    for T in (40, 5):
        hidden, weight, labels, g = _problem(T, 16, 300, seed=T)
        upstream = _upstream("mean", T, g, torch.float64)
        want = _oracle(hidden, weight, labels, -100, "mean", upstream)
        got = _run("torch", hidden, weight, labels, -100, "mean", upstream, torch.float64)
        for a, e, name in zip(got, want, ("loss", "d_hidden", "d_weight")):
            _assert_rel(a, e, 1e-12, name)
    lce_mod.release_workspace()
    assert not ws._buffers


def test_fused_backward_scales_its_own_gradient_buffers_in_place():
    """Eager backward of the fused path: the incoming gradient scales dH and dW in place (no second
    [V, D] tensor a step), with the float64 oracle's values."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.made = []  # (op, output shape) of every op that returns a tensor

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                self.made.append((func, tuple(out.shape)))
            return out

    T, D, V = 23, 8, 301
    hidden, weight, labels, _ = _problem(T, D, V, seed=4)
    upstream = torch.tensor(2.5, dtype=torch.float64)
    want = _oracle(hidden, weight, labels, -100, "mean", upstream)
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    loss = linear_cross_entropy(h, w, labels, impl="torch")
    with Record() as rec:
        (loss * upstream).backward()
    scaled = [(f, s) for f, s in rec.made if f is torch.ops.aten.mul_.Tensor]
    assert sorted(s for _, s in scaled) == [(T, D), (V, D)]
    fresh = [f for f, s in rec.made if s == (V, D) and f._schema.name in ("aten::mul", "aten::empty", "aten::clone")]
    assert not fresh, fresh
    for a, e, name in zip((loss.detach(), h.grad, w.grad), want, ("loss", "d_hidden", "d_weight")):
        _assert_rel(a, e, 1e-12, name)


def test_auto_picks_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("LCL_FAST_IMPL", raising=False)
    hidden, weight, labels, _ = _problem(17, 8, 40, seed=2)
    for dtype in (torch.float32, torch.float64):
        auto = linear_cross_entropy(hidden.to(dtype), weight.to(dtype), labels)
        torch_ = linear_cross_entropy(hidden.to(dtype), weight.to(dtype), labels, impl="torch")
        assert torch.equal(auto, torch_)


def test_second_backward_through_fused_graph_raises():
    hidden, weight, labels, _ = _problem(5, 4, 9, seed=1)
    h = hidden.float().requires_grad_()
    loss = linear_cross_entropy(h, weight.float(), labels, impl="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


@pytest.mark.parametrize(
    "hidden_shape, weight_shape, labels_shape, kwargs, match",
    [
        ((4, 8), (10, 8), (4,), {"reduction": "avg"}, "reduction"),
        ((4, 8, 1), (10, 8), (4,), {}, "hidden must be"),
        ((4, 8), (10, 7), (4,), {}, "D=8 but weight has D=7"),
        ((4, 8), (0, 8), (4,), {}, "V=0"),
        ((4, 8), (10, 8), (5,), {}, r"labels must be \[T\]=\[4\]"),
        ((4, 8), (10, 8), (4,), {"impl": "fast"}, "impl must be one of"),
    ],
)
def test_bad_input_raises(hidden_shape, weight_shape, labels_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        labels = torch.zeros(labels_shape, dtype=torch.long)
        linear_cross_entropy(torch.zeros(hidden_shape), torch.zeros(weight_shape), labels, **kwargs)


def test_bad_dtypes_and_labels_raise():
    h, w = torch.zeros(3, 4), torch.zeros(6, 4)
    with pytest.raises(ValueError, match="share a float dtype"):
        linear_cross_entropy(h, w.double(), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be integers"):
        linear_cross_entropy(h, w, torch.zeros(3))
    with pytest.raises(ValueError, match=r"labels\[1\] = 6 is outside \[0, 6\)"):
        linear_cross_entropy(h, w, torch.tensor([0, 6, -100]))
    with pytest.raises(ValueError, match=r"labels\[2\] = -1"):
        linear_cross_entropy(h, w, torch.tensor([0, 1, -1]), ignore_index=0)
    if triton_available():
        with pytest.raises(ValueError):  # float64 for the kernels, or CPU tensors without the interpreter
            linear_cross_entropy(h.double(), w.double(), torch.zeros(3, dtype=torch.long), impl="triton")


# --------------------------------------------------------------------------------------------------
# golden generation losses of the reference code


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("case", ["paired_a", "interleaved_a"])
def test_golden_generation_loss(golden_dir, case, impl, tiles):
    gold = torch.load(golden_dir / f"{case}.pt")
    logits, labels = gold["gen_logits"], gold["gen_labels"]
    weight = gold["state_dict"]["lm_head.1.weight"]
    # The golden logits are LN(h) @ W.T with W [V=512, D=64] of full column rank, so the
    # LayerNorm's output is the unique X with X @ W.T = logits.
    x = logits @ torch.linalg.pinv(weight.T)
    assert rel_err(x @ weight.T, logits) < 1e-10, "the golden logits are not in W's row space"
    h = x.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, labels, ignore_index=0, impl=impl)  # LCL ignores its pad id 0
    loss.backward()
    assert_close(loss, gold["generation_loss"], rtol=1e-9, atol=0, name="generation_loss")
    grads = gold["grads"]  # of 0.1 * contrastive + 1.0 * generation; lm_head only sees the latter
    _assert_rel(w.grad, grads["lm_head.1.weight"], 1e-9, "d lm_head.1.weight")
    # dL/d(LN bias) = sum_t dX_t and dL/d(LN gain) = sum_t dX_t * x_hat_t, x_hat = (X - bias) / gain
    gain, bias = gold["state_dict"]["lm_head.0.weight"], gold["state_dict"]["lm_head.0.bias"]
    _assert_rel(h.grad.sum(0), grads["lm_head.0.bias"], 1e-9, "d lm_head.0.bias")
    _assert_rel((h.grad * (x - bias) / gain).sum(0), grads["lm_head.0.weight"], 1e-8, "d lm_head.0.weight")
    ref = _run("reference", x, weight, labels, 0, "mean", torch.tensor(1.0), torch.float64)
    _assert_rel(h.grad, ref[1], 1e-10, "d_hidden vs reference impl")


# --------------------------------------------------------------------------------------------------
# Triton kernels (CUDA, or the interpreter on the CPU)

TRITON_SHAPES = [(37, 40, 301), (1, 16, 5), (130, 24, 97)]  # partial tiles in T, V and D


def _check_triton_mode():
    from lcl_fast.kernels import linear_cross_entropy as kernels

    if TRITON_DEVICE == "cpu" and type(kernels._lse_forward_kernel).__name__ != "InterpretedFunction":
        pytest.fail("lcl_fast.kernels.linear_cross_entropy was imported before TRITON_INTERPRET=1 was set")


@needs_triton
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_float32_matches_float64(shape, reduction):
    _check_triton_mode()
    hidden, weight, labels, g = _problem(*shape, seed=sum(shape) + 2, ignore_every=3, ignore_index=0)
    upstream = _upstream(reduction, shape[0], g, torch.float64)
    want = _oracle(hidden, weight, labels, 0, reduction, upstream)
    got = _run("triton", hidden, weight, labels, 0, reduction, upstream, torch.float32, TRITON_DEVICE)
    for a, e, name in zip(got, want, ("loss", "d_hidden", "d_weight")):
        _assert_rel(a, e, 2e-5, name)


@needs_triton
def test_triton_one_vocab_split(monkeypatch):
    _check_triton_mode()
    from lcl_fast.kernels import linear_cross_entropy as kernels

    monkeypatch.setattr(kernels, "INTERPRETER_VOCAB_SPLITS", 1)
    hidden, weight, labels, g = _problem(37, 40, 301, seed=9)
    want = _oracle(hidden, weight, labels, -100, "mean", torch.tensor(1.0))
    one = torch.tensor(1.0)
    got = _run("triton", hidden, weight, labels, -100, "mean", one, torch.float32, TRITON_DEVICE)
    for a, e, name in zip(got, want, ("loss", "d_hidden", "d_weight")):
        _assert_rel(a, e, 2e-5, name)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_no_worse_than_reference(dtype):
    _check_triton_mode()
    hidden, weight, labels, g = _problem(67, 48, 389, seed=13)
    hidden, weight = hidden.to(dtype).double(), weight.to(dtype).double()
    upstream = _upstream("none", 67, g, torch.float32)
    want = _oracle(hidden, weight, labels, -100, "none", upstream)
    ref = _run("reference", hidden, weight, labels, -100, "none", upstream, dtype, TRITON_DEVICE)
    got = _run("triton", hidden, weight, labels, -100, "none", upstream, dtype, TRITON_DEVICE)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == dtype
    for a, r, e, name in zip(got, ref, want, ("loss", "d_hidden", "d_weight")):
        _assert_no_worse(a, r, e, name)


@needs_triton
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_triton_all_ignored_gives_zero_not_nan(reduction):
    _check_triton_mode()
    hidden, weight, _, _ = _problem(21, 16, 70, seed=4)
    h = hidden.float().to(TRITON_DEVICE).requires_grad_()
    w = weight.float().to(TRITON_DEVICE).requires_grad_()
    labels = torch.full((21,), -100, dtype=torch.long, device=TRITON_DEVICE)
    loss = linear_cross_entropy(h, w, labels, reduction=reduction, impl="triton")
    loss.sum().backward()
    assert torch.equal(loss.detach(), torch.zeros_like(loss)), f"loss {loss}"
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


@needs_triton
def test_triton_partial_requires_grad():
    _check_triton_mode()
    hidden, weight, labels, _ = _problem(29, 20, 150, seed=6)
    want = _oracle(hidden, weight, labels, -100, "sum", torch.tensor(1.0))
    hidden, weight = hidden.float().to(TRITON_DEVICE), weight.float().to(TRITON_DEVICE)
    labels = labels.to(TRITON_DEVICE)
    w = weight.clone().requires_grad_()
    linear_cross_entropy(hidden, w, labels, reduction="sum", impl="triton").backward()
    _assert_rel(w.grad.cpu(), want[2], 2e-5, "d_weight alone")
    h = hidden.clone().requires_grad_()
    linear_cross_entropy(h, weight, labels, reduction="sum", impl="triton").backward()
    _assert_rel(h.grad.cpu(), want[1], 2e-5, "d_hidden alone")


@pytest.mark.timeout(600)
@pytest.mark.skipif(
    TRITON_DEVICE is not None or not triton_available(), reason="the Triton tests run in this process"
)
def test_kernels_in_interpreter_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))]
    cmd += ["-k", "test_triton_"]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=590)
    assert run.returncode == 0, f"interpreter run failed:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1], run.stdout[-2000:]


def _compile_for_sm90() -> None:
    """Compile every kernel configuration for an H100/H200 (sm_90) with the wheel's ptxas, no GPU.

    Catches what the interpreter cannot: code that does not lower to PTX, or blocks whose
    shared memory exceeds an H100's 227 KiB. Must run where the kernel module was imported in
    compiled mode.
    """
    from lcl_fast.kernels import linear_cross_entropy as kernels
    from lcl_fast.kernels.tiles import AOT_TARGETS
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    pointers = {"labels_ptr": "*i64"}
    for fp32 in (False, True):
        operand = "*fp32" if fp32 else "*bf16"
        both_grads = {"GROUP_T": kernels._GROUP_T, "COMPUTE_DH": True, "COMPUTE_DW": True}
        for name, fn, extra in (
            ("forward", kernels._lse_forward_kernel, {}),
            ("backward", kernels._backward_kernel, both_grads),
        ):
            blocks = kernels.gpu_blocks(AOT_TARGETS["sm_90"], name, torch.float32 if fp32 else torch.bfloat16, 768)
            constexprs = {
                "BLOCK_T": blocks["block_t"], "BLOCK_V": blocks["block_v"], "BLOCK_D": blocks["block_d"],
                "DOT_PRECISION": "ieee" if fp32 else "tf32", "UPCAST": False, **extra,
            }
            signature = {}
            for arg in fn.arg_names:
                if arg in constexprs:
                    signature[arg] = "constexpr"
                elif arg.endswith("_ptr"):
                    signature[arg] = operand if arg in ("h_ptr", "w_ptr") else pointers.get(arg, "*fp32")
                else:
                    signature[arg] = "i32"
            compiled = compile(
                ASTSource(fn, signature, constexprs=constexprs),
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": blocks["num_warps"], "num_stages": blocks["num_stages"]},
            )
            shared = compiled.metadata.shared
            assert shared <= 227 * 1024, f"{name} fp32={fp32}: {shared} bytes of shared memory"


@pytest.mark.timeout(300)
@pytest.mark.skipif(
    not triton_available() or torch.cuda.is_available(), reason="CUDA runs the compiled kernels"
)
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from tests.ops.test_linear_cross_entropy import _compile_for_sm90; _compile_for_sm90()"
    cmd = [sys.executable, "-c", code]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=290)
    assert run.returncode == 0, f"compiling for sm_90 failed:\n{run.stderr[-4000:]}"
