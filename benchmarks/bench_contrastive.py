"""Contrastive loss, forward + backward: reference (full logits) vs torch / triton vs Inf-CL.

One group per batch size, so the memory-versus-batch plot of ``benchmarks.report`` shows the
reference growing quadratically and lcl-fast linearly. On CUDA the largest case is the
64k global batch of the kernel targets, computed on one device (the work of every simulated
rank together: n = m = 65536); the reference may run out of memory there, which is recorded.

Throughput: pairs per second (samples/s) and TFLOP/s counting the 6·n·m·d multiply-adds of one
logits matrix forward and its two gradient products.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import _harness as h

CASES = h.by_scale(
    smoke=[(256, 64)],
    small=[(1024, 512), (2048, 512), (4096, 512), (8192, 512)],
    full=[(4096, 768), (16384, 768), (32768, 768), (65536, 768)],
)
IMPLS = ["reference", "torch", "triton", "inf_cl"]


def _loss_fn(impl: str, dim: int):
    if impl == "inf_cl":
        if not h.on_cuda():
            pytest.skip("Inf-CL is CUDA-only")
        cal_inf_loss = h.import_or_skip("inf_cl", "cal_inf_loss", " (pip install inf_cl)")
        head_dim = next(hd for hd in (256, 128, 64, 32, 16) if dim % hd == 0)

        def inf_cl(image_features, text_features, logit_scale):
            # The scale is applied here, not through cal_inf_loss(scale=): some Inf-CL versions
            # all-reduce its gradient unconditionally, which fails without a process group.
            return 0.5 * (
                cal_inf_loss(logit_scale * image_features, text_features, head_dim=head_dim)
                + cal_inf_loss(logit_scale * text_features, image_features, head_dim=head_dim)
            )

        return inf_cl
    h.require_impl(impl)
    contrastive_loss = h.import_or_skip("lcl_fast.ops.contrastive", "contrastive_loss")

    def lcl(image_features, text_features, logit_scale):
        return contrastive_loss(image_features, text_features, logit_scale, impl=impl)

    return lcl


def _features(n: int, d: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=h.generator(seed), device=h.device())
    return torch.nn.functional.normalize(x, dim=-1).to(h.compute_dtype()).requires_grad_()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,d", CASES, ids=[f"n{n}-d{d}" for n, d in CASES])
def test_contrastive_loss(benchmark, impl: str, n: int, d: int) -> None:
    loss_fn = _loss_fn(impl, d)
    image_features, text_features = _features(n, d, 0), _features(n, d, 1)
    logit_scale = torch.tensor(1 / 0.07, device=h.device(), requires_grad=True)
    inputs = (image_features, text_features, logit_scale)

    def fwd_bwd():
        loss = loss_fn(*inputs)
        return torch.autograd.grad(loss, inputs)

    dtype = str(h.compute_dtype()).removeprefix("torch.")
    h.measure(
        benchmark,
        fwd_bwd,
        group=f"contrastive fwd+bwd n=m={n} d={d} {dtype}",
        impl=impl,
        work={"samples": n, "flop": 6.0 * n * n * d},
        params={"op": "contrastive", "n": n, "d": d, "dtype": dtype},
    )
