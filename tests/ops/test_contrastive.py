"""Chunked contrastive loss: every impl against a float64 dense oracle, the Triton kernels against
the torch path, and 2 gloo ranks with unequal counts against the reference's golden file.

Without CUDA the Triton cases run in the interpreter: ``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` before any kernel module is decorated (the ops module imports the kernels
lazily anyway), and the spawned gloo ranks inherit it. ``test_kernels_run_in_interpreter`` fails
with a clear message if the kernels were compiled for a GPU instead.
"""

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lcl_fast.ops.contrastive import _ContrastiveLoss, _Options, contrastive_loss
from tests._compare import assert_close, rel_err
from tests._dist import spawn_gloo

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ("reference", "torch", "triton")
# the gloo ranks hold CPU tensors: Triton joins them through the interpreter only
CPU_IMPLS = IMPLS if os.environ.get("TRITON_INTERPRET") == "1" else ("reference", "torch")
# relative tolerance (of each tensor's max magnitude) per dtype of the features
TOL = {torch.float32: 4e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _features(gen: torch.Generator, n: int, d: int, dtype=torch.float32) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1).to(DEVICE, dtype)


def _oracle(image, text, scale, image_cols=None, text_cols=None, offset=0):
    """Float64 loss and gradients through both full logits matrices; columns None = the rows themselves."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in
              (image, text, image_cols, text_cols)]
    s = torch.tensor(float(scale), dtype=torch.float64, device=image.device, requires_grad=True)
    i, t, ic, tc = leaves
    ic, tc = (i, t) if ic is None else (ic, tc)
    labels = torch.arange(i.shape[0], device=i.device) + offset
    loss = (F.cross_entropy(s * i @ tc.T, labels) + F.cross_entropy(s * t @ ic.T, labels)) / 2
    loss.backward()
    return [loss.detach()] + [None if x is None else x.grad for x in leaves] + [s.grad]


def _run(impl, image, text, scale, **kw):
    image = image.clone().requires_grad_()
    text = text.clone().requires_grad_()
    s = torch.tensor(scale, device=DEVICE, requires_grad=True)
    loss = contrastive_loss(image, text, s, impl=impl, **kw)
    loss.backward()
    return [loss.detach(), image.grad, text.grad, s.grad]


def _assert_all(got, want, tol, scale, n, names=("loss", "d_image", "d_text", "d_scale")):
    """Each tensor within ``tol`` of its own magnitude, or of its natural unit where the value
    itself may vanish (n = 1): ``s`` for the loss, ``s/n`` for feature gradients, 1 for ``d s``."""
    for g, w, name in zip(got, want, names):
        unit = scale if name == "loss" else 1.0 if name == "d_scale" else scale / max(n, 1)
        assert_close(g, w, rtol=tol, atol=tol * max(float(w.abs().max()), unit), name=name)


def test_kernels_run_in_interpreter():
    if DEVICE == "cuda":
        pytest.skip("compiled kernels on CUDA")
    from lcl_fast.kernels import contrastive as kernels
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(kernels._lse_kernel, InterpretedFunction), (
        "lcl_fast.kernels.contrastive was imported before TRITON_INTERPRET=1 was set")


# n, m, d, label offset: ragged tiles (32-wide in the interpreter), d not a multiple of BLOCK_K
KERNEL_SHAPES = [(1, 7, 16, 3), (7, 130, 48, 100), (64, 64, 64, 0), (130, 1, 48, -129), (130, 130, 16, 0)]


@pytest.mark.parametrize("n,m,d,offset", KERNEL_SHAPES)
def test_kernel_tiles_match_float64(n, m, d, offset):
    from lcl_fast.kernels import contrastive as kernels

    gen = torch.Generator().manual_seed(n * 1000 + m)
    a, b = _features(gen, n, d), _features(gen, m, d)
    scale, log2e = torch.tensor(7.3), 1 / math.log(2)
    x = a.double() @ b.double().T
    symmetric = n == m
    stats = kernels.lse(a, b, scale, symmetric=symmetric, label_offset=offset)
    want_row, want_col = torch.logsumexp(7.3 * x, 1), torch.logsumexp(7.3 * x, 0)
    labels = (torch.arange(n, device=DEVICE)[:, None] + offset == torch.arange(m, device=DEVICE)).double()
    # (max, log2 sum) pairs: their sum is the logsumexp
    assert stats.row.shape == (n, 2)
    assert_close(stats.row.sum(1), want_row * log2e, rtol=1e-6, atol=1e-6, name="lse_row")
    assert_close(stats.label, (7.3 * x * labels).sum(1) * log2e, rtol=1e-6, atol=1e-6, name="label logits")
    if symmetric:
        assert_close(stats.col.sum(1), want_col * log2e, rtol=1e-6, atol=1e-6, name="lse_col")
    want_g = torch.exp(7.3 * x - want_row[:, None]) - labels
    if symmetric:
        want_g += torch.exp(7.3 * x - want_col[None, :]) - labels
    col_start, col_end = m // 3, m  # a chunk that starts mid-tile
    g, ds = kernels.grad_logits(a, b, stats, scale, col_start, col_end, offset)
    want_g = want_g[:, col_start:col_end]
    assert_close(g, want_g, rtol=1e-5, atol=1e-6, name="G")
    assert_close(ds, (want_g * x[:, col_start:col_end]).sum(), rtol=1e-5, atol=1e-5, name="sum G*X")


def test_kernel_tiles_float16():
    from lcl_fast.kernels import contrastive as kernels

    gen = torch.Generator().manual_seed(16)
    a, b = _features(gen, 130, 48, torch.float16), _features(gen, 130, 48, torch.float16)
    logits, log2e = 20 * (a.double() @ b.double().T), 1 / math.log(2)
    lse_row, lse_col = torch.logsumexp(logits, 1), torch.logsumexp(logits, 0)
    stats = kernels.lse(a, b, torch.tensor(20.0), symmetric=True)
    assert_close(stats.row.sum(1), lse_row * log2e, rtol=1e-5, atol=1e-5, name="lse_row fp16")
    assert_close(stats.col.sum(1), lse_col * log2e, rtol=1e-5, atol=1e-5, name="lse_col fp16")
    g, _ = kernels.grad_logits(a, b, stats, torch.tensor(20.0), 0, 130)
    assert g.dtype == torch.float16
    want = torch.exp(logits - lse_row[:, None]) + torch.exp(logits - lse_col[None, :])
    want -= 2 * torch.eye(130, dtype=torch.float64, device=DEVICE)
    assert_close(g, want, rtol=2e-3, atol=1e-4, name="G fp16")


# (impl, n, d, dtype, chunk_size): every impl at every listed shape in float32, half types spread out
LOSS_CASES = [(impl, n, d, torch.float32, chunk) for impl in IMPLS
              for n, d, chunk in [(1, 16, None), (7, 48, 3), (64, 64, None), (130, 48, 50)]]
LOSS_CASES += [("reference", 7, 48, torch.bfloat16, None), ("torch", 130, 48, torch.bfloat16, 64),
               ("torch", 64, 64, torch.float16, None), ("triton", 130, 48, torch.float16, 40),
               ("triton", 7, 16, torch.float16, None)]


@pytest.mark.parametrize("impl,n,d,dtype,chunk", LOSS_CASES)
def test_single_process_loss_and_grads(impl, n, d, dtype, chunk):
    gen = torch.Generator().manual_seed(n * 100 + d)
    image, text = _features(gen, n, d, dtype), _features(gen, n, d, dtype)
    scale = 11.7
    got = _run(impl, image, text, scale, chunk_size=chunk)
    want = _oracle(image, text, scale)
    want = [want[0], want[1], want[2], want[5]]
    assert got[1].dtype == dtype and got[3].dtype == torch.float32
    _assert_all(got, want, TOL[dtype], scale, n)
    if impl == "triton":
        # the kernel may be no worse than twice the torch path (plus a floor for exact zeros)
        ref = _run("torch", image, text, scale, chunk_size=chunk)
        for g, r, w, name in zip(got, ref, want, ("loss", "d_image", "d_text", "d_scale")):
            assert rel_err(g, w) <= 2 * rel_err(r, w) + TOL[dtype] / 4, f"{name}: triton worse than torch"


# rows of one simulated rank against gathered columns: n local pairs at `offset` among m
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("n,m,d,offset",
                         [(7, 130, 48, 100), (1, 64, 16, 0), (64, 130, 64, 66), (130, 130, 48, 0)])
def test_gathered_columns(impl, n, m, d, offset):
    gen = torch.Generator().manual_seed(m + offset)
    image_cols, text_cols = _features(gen, m, d), _features(gen, m, d)
    image, text = image_cols[offset:offset + n].clone(), text_cols[offset:offset + n].clone()
    leaves = [t.clone().requires_grad_() for t in (image, text, image_cols, text_cols)]
    s = torch.tensor(5.9, device=DEVICE, requires_grad=True)
    opts = _Options(impl, symmetric=False, label_offset=offset, chunk_size=48)
    loss = _ContrastiveLoss.apply(*leaves, s, opts)
    loss.backward()
    got = [loss.detach()] + [t.grad for t in leaves] + [s.grad]
    want = _oracle(image, text, 5.9, image_cols, text_cols, offset)
    _assert_all(got, want, TOL[torch.float32], 5.9, n,
                names=("loss", "d_image", "d_text", "d_image_cols", "d_text_cols", "d_scale"))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("noise", [0.25, 1.2])
def test_confident_pairs_at_the_largest_scale(impl, dtype, noise):
    # late training: s = 100 and every text close to its image, so each row and column of the
    # softmax is dominated by its label: saturated (noise 0.25: P_ii = 1 in float32, the exact
    # gradient ~1e-17) or nearly (1.2: loss ~0.1). G = P + Qᵀ − 2δ must keep its small diagonal
    # instead of an ulp of s·x_ii times s/n.
    gen = torch.Generator().manual_seed(100)
    image = _features(gen, 130, 32, torch.float64)
    text = F.normalize(image + noise * _features(gen, 130, 32, torch.float64), dim=1)
    image, text = image.to(dtype), text.to(dtype)
    got = _run(impl, image, text, 100.0, chunk_size=48)
    want = _oracle(image, text, 100.0)
    _assert_all(got, [want[0], want[1], want[2], want[5]], TOL[dtype], 100.0, 130)


@pytest.mark.parametrize("impl", IMPLS)
def test_without_gather_grad_columns_are_detached(impl):
    gen = torch.Generator().manual_seed(3)
    image, text = _features(gen, 17, 48), _features(gen, 17, 48)
    got = _run(impl, image, text, 4.2, gather_with_grad=False, chunk_size=8)
    # the reference detaches the column side even on one process: only the row roles get gradients
    want = _oracle(image, text, 4.2, image.clone(), text.clone())
    _assert_all(got, [want[0], want[1], want[2], want[5]], TOL[torch.float32], 4.2, 17)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_pairs_give_zero_loss_that_backprops(impl):
    image = torch.zeros(0, 16, device=DEVICE, requires_grad=True)
    text = torch.zeros(0, 16, device=DEVICE, requires_grad=True)
    s = torch.tensor(3.0, device=DEVICE, requires_grad=True)
    loss = contrastive_loss(image, text, s, impl=impl)
    loss.backward()
    assert loss.item() == 0.0
    assert image.grad.shape == (0, 16) and s.grad is not None and s.grad.item() == 0.0


def test_python_float_scale_and_bad_inputs():
    gen = torch.Generator().manual_seed(5)
    image, text = _features(gen, 7, 16), _features(gen, 7, 16)
    want = _oracle(image, text, 2.5)[0]
    assert_close(contrastive_loss(image, text, 2.5, impl="torch"), want, rtol=1e-6, atol=0, name="loss")
    with pytest.raises(ValueError, match=r"\(7, 16\) and \(6, 16\)"):
        contrastive_loss(image, text[:6], 2.5)
    with pytest.raises(ValueError, match=r"\(7, 16\) and \(7, 8\)"):
        contrastive_loss(image, text[:, :8], 2.5)
    with pytest.raises(ValueError, match="one value"):
        contrastive_loss(image, text, torch.ones(2))


# ---------------------------------------------------------------------------------------------
# two gloo ranks

def _rank_main(rank: int, world: int, golden_path: str, out_dir: str) -> None:
    mine = torch.load(golden_path)["ranks"][rank]
    results = {}
    for impl in CPU_IMPLS:
        for with_grad in (True, False):
            image = mine["image_features"].clone().requires_grad_()
            text = mine["text_features"].clone().requires_grad_()
            s = mine["logit_scale"].clone().requires_grad_()
            loss = contrastive_loss(image, text, s, impl=impl, gather_with_grad=with_grad, chunk_size=2)
            loss.backward()
            results[impl, with_grad] = (loss.detach(), image.grad, text.grad)
    # rank 0 holds no pairs: it must still join both collectives and its loss must be 0
    gen = torch.Generator().manual_seed(rank)
    count = 0 if rank == 0 else 4
    for impl in CPU_IMPLS:
        image = torch.randn(count, 8, generator=gen).requires_grad_()
        text = torch.randn(count, 8, generator=gen).requires_grad_()
        loss = contrastive_loss(image, text, 2.0, impl=impl)
        loss.backward()
        results[impl, "empty"] = (loss.detach(), image.detach(), text.detach(), image.grad, text.grad)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def test_two_gloo_ranks_with_unequal_counts(tmp_path, golden_dir):
    golden = torch.load(golden_dir / "distributed_a.pt")
    assert golden["counts"] == [5, 3]
    spawn_gloo(_rank_main, 2, str(golden_dir / "distributed_a.pt"), str(tmp_path))
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    ranks = golden["ranks"]
    all_image = torch.cat([r["image_features"] for r in ranks])
    all_text = torch.cat([r["text_features"] for r in ranks])
    offsets = [0, 5]
    for rank, (want, got) in enumerate(zip(ranks, results)):
        for impl in CPU_IMPLS:
            loss, d_image, d_text = got[impl, True]
            tag = f"rank {rank} {impl}"
            assert_close(loss, want["contrastive_loss"], rtol=1e-5, atol=1e-6, name=f"{tag} loss")
            for g, name in ((d_image, "image_grad"), (d_text, "text_grad")):
                w = want[name]
                assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()), name=f"{tag} {name}")
            # without gather_with_grad each rank only gets its own loss's row-side gradient
            oracle = _oracle(want["image_features"], want["text_features"], float(want["logit_scale"]),
                             all_image, all_text, offsets[rank])
            loss, d_image, d_text = got[impl, False]
            tag += ", gather without grad"
            assert_close(loss, want["contrastive_loss"], rtol=1e-5, atol=1e-6, name=f"{tag}: loss")
            assert_close(d_image, oracle[1], rtol=1e-5, atol=1e-6, name=f"{tag}: image_grad")
            assert_close(d_text, oracle[2], rtol=1e-5, atol=1e-6, name=f"{tag}: text_grad")
            # a rank without pairs: zero loss; the other rank's loss is its own single-process loss
            loss, image, text, d_image, d_text = got[impl, "empty"]
            if rank == 0:
                assert loss.item() == 0.0 and d_image.shape == (0, 8)
            else:
                oracle = _oracle(image, text, 2.0)
                _assert_all([loss, d_image, d_text], oracle[:3], 1e-5, 2.0, 4)
