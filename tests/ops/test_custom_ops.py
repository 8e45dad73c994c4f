"""``torch.library.opcheck`` on every ``lcl_fast::`` custom op: schema, fake tensors, autograd, AOT dispatch.

Torch path on the CPU; Triton path in the interpreter (tests/conftest.py), small shapes.
"""

from __future__ import annotations

import pytest
import torch

from lcl_fast._impl import triton_interpreter
from lcl_fast.ops import attention as A
from lcl_fast.ops import contrastive, linear_cross_entropy  # noqa: F401  (importing an op module registers its ops)

ops = torch.ops.lcl_fast
triton = pytest.importorskip("triton", reason="the triton ops need the triton package (pip install triton)")
# these tests hand CPU tensors to impl="triton": only the interpreter runs them (compiled Triton needs CUDA)
interpreted = pytest.mark.skipif(not triton_interpreter(),
                                 reason="CPU tensors with impl='triton' need TRITON_INTERPRET=1")
TRITON = pytest.param("triton", marks=interpreted)


def _rand(*shape, dtype=torch.float32, grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(grad)


def _scale(grad=True):
    return torch.tensor(3.5).requires_grad_(grad)


@pytest.mark.parametrize("impl", ["torch", TRITON])
@pytest.mark.parametrize("symmetric", [True, False])
def test_contrastive_ops(impl, symmetric):
    n, m, d = 5, 9, 16
    image, text = _rand(n, d), _rand(n, d, seed=1)
    cols = (None, None) if symmetric else (_rand(m, d, seed=2), _rand(m, d, seed=3))
    offset = 0 if symmetric else 3
    torch.library.opcheck(ops.contrastive_fwd, (image, text, *cols, _scale(), impl, offset, None))
    loss, stats = ops.contrastive_fwd(image, text, *cols, _scale(), impl, offset, 4)
    grad = torch.tensor(1.0)
    args = (grad, image.detach(), text.detach(), *(c if c is None else c.detach() for c in cols),
            _scale(False), stats.detach(), impl, offset, 4, True, True, True, True, True)
    torch.library.opcheck(ops.contrastive_bwd, args)


@pytest.mark.parametrize("impl,reduction", [("torch", "mean"), ("torch", "none"), ("torch", "sum"),
                                            pytest.param("triton", "mean", marks=interpreted)])
def test_linear_cross_entropy_ops(impl, reduction):
    T, D, V = 7, 16, 37
    hidden, weight = _rand(T, D), _rand(V, D, seed=1)
    labels = torch.tensor([3, 0, 36, 5, 0, 1, 9])  # 0 is ignored
    torch.library.opcheck(ops.linear_cross_entropy_fwd, (hidden, weight, labels, 0, reduction, impl, True, True))
    if reduction == "mean":  # only dh asked for
        torch.library.opcheck(ops.linear_cross_entropy_fwd, (hidden, weight.detach(), labels, 0, reduction, impl,
                                                             True, False))
    _, lse, _, _ = ops.linear_cross_entropy_fwd(hidden, weight, labels, 0, reduction, impl, False, False)
    grad = torch.ones(()) if reduction != "none" else torch.ones(T)
    args = (grad, hidden.detach(), weight.detach(), labels, lse.detach(), 0, reduction, impl, True, True)
    torch.library.opcheck(ops.linear_cross_entropy_bwd, args)


def _ids(length: int):
    doc = torch.tensor([[0] * 9 + [1] * 7 + [-1] * (length - 16)])
    img = torch.full((1, length), -1)
    img[0, 2:5] = 0
    img[0, 10:13] = 1
    return doc, img


@interpreted
def test_attention_triton_ops():
    from lcl_fast.kernels.attention_launch import prepare_metadata

    B, H, L_, D = 1, 1, 24, 16  # one 32-wide tile: the interpreter is slow
    q, k, v = (_rand(B, H, L_, D, seed=s) for s in range(3))
    doc, img = _ids(L_)
    meta = prepare_metadata(doc, img, True, L_)
    args = (q, k, v, meta.table, meta.causal, meta.has_doc, meta.has_img, D**-0.5, [32, 32])
    torch.library.opcheck(ops.attention_triton_fwd, args)
    out, lse = ops.attention_triton_fwd(*args)
    torch.library.opcheck(ops.attention_triton_bwd, (torch.ones_like(out), q.detach(), k.detach(), v.detach(),
                                                     out.detach(), lse.detach(), *args[3:]))


def test_attention_torch_ops():
    B, H, L_, D = 1, 2, 20, 8
    q, k, v = (_rand(B, H, L_, D, dtype=torch.float64, seed=s) for s in range(3))
    doc, img = _ids(L_)
    for ids in ((doc, img), (doc, None), (None, img)):
        torch.library.opcheck(ops.attention_torch_fwd, (q, k, v, *ids, True, 0.3))
    grad = torch.ones(B, H, L_, D, dtype=torch.float64)
    scattered = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 2, 2, 2, 2, 2, 2, -1]])
    for ids in ((doc, img), (scattered, None)):  # saved statistics; the recomputing fallback
        saved = [t.detach() for t in ops.attention_torch_fwd(q, k, v, *ids, True, 0.3)]
        args = (grad, q.detach(), k.detach(), v.detach(), *saved, *ids, True, 0.3)
        torch.library.opcheck(ops.attention_torch_bwd, args)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_attention_torch_op_gradients_match_eager_autograd(dtype, tol):
    """The op's backward from saved statistics (packed documents, images inside them, padding)
    gives the gradients autograd gives through the eager per-document path."""
    from lcl_fast.ops.attention import _flash_plans, _torch_attention

    B, H, L_, D = 2, 2, 40, 8
    doc = torch.full((B, L_), -1)
    img = torch.full((B, L_), -1)
    doc[0, :15], doc[0, 15:33] = 0, 1
    img[0, 2:6], img[0, 18:22], img[0, 26:30] = 0, 1, 2
    doc[1, :40] = 0
    img[1, 0:4], img[1, 20:24] = 0, 1  # an image first in its document
    q, k, v = (_rand(B, H, L_, D, dtype=dtype, seed=s).requires_grad_() for s in range(3))
    grad = _rand(B, H, L_, D, dtype=dtype, seed=7)
    for ids, causal in (((doc, img), True), ((doc, None), True), ((None, img), True), ((doc, None), False)):
        assert _flash_plans(q, *ids, causal) is not None
        expected_out = _torch_attention(q, k, v, *ids, causal, 0.3)
        expected = torch.autograd.grad(expected_out, (q, k, v), grad)
        out = A.attention_torch_op(q, k, v, *ids, causal, 0.3)
        got = torch.autograd.grad(out, (q, k, v), grad)
        torch.testing.assert_close(out, expected_out, rtol=tol, atol=tol)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=tol, atol=tol)
