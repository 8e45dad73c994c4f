"""Generation loss (LM head + cross-entropy), forward + backward: T tokens, width D, vocab V.

Contenders: ``reference`` (full ``[T, V]`` logits, as the published code), lcl-fast's ``torch``
and ``triton`` paths, PyTorch's own chunked ``torch.nn.functional.linear_cross_entropy`` (when
this torch has ``LinearCrossEntropyOptions``), and on CUDA Liger-Kernel's fused linear
cross-entropy and Apple's Cut Cross-Entropy when installed. About 5% of the labels are
``ignore_index`` (the positions the model does not predict).

Throughput: tokens/s, and TFLOP/s counting 6·T·D·V (the logits product and its two gradients).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import _harness as h

# tokens, width, vocabulary
CASES = h.by_scale(
    smoke=[(512, 64, 4096)],
    small=[(8192, 512, 49411)],
    full=[(8192, 512, 49411), (32768, 512, 49411)],
)
IMPLS = ["reference", "torch", "triton", "torch_chunked", "liger", "cut_cross_entropy"]
IGNORE = -100


def _loss_fn(impl: str):
    if impl in ("reference", "torch", "triton"):
        h.require_impl(impl)
        lce = h.import_or_skip("lcl_fast.ops.linear_cross_entropy", "linear_cross_entropy")
        return lambda hidden, weight, labels: lce(hidden, weight, labels, ignore_index=IGNORE, impl=impl)
    if impl == "torch_chunked":
        options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
        if options is None:
            pytest.skip(f"torch {torch.__version__} has no chunked linear_cross_entropy")
        if not h.on_cuda() and h.scale() != "smoke":
            pytest.skip("torch's chunked linear_cross_entropy is benchmarked on CUDA only (on 2 CPU cores it "
                        "takes ~40 s at T=8192, V=49411, about the reference's time)")
        fn = torch.nn.functional.linear_cross_entropy
        return lambda hidden, weight, labels: fn(hidden, weight, labels, ignore_index=IGNORE, options=options())
    if not h.on_cuda():
        pytest.skip(f"{impl} is CUDA-only")
    if impl == "liger":
        liger = h.import_or_skip(
            "liger_kernel.transformers.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyLoss",
            " (pip install liger-kernel)",
        )(ignore_index=IGNORE)
        return lambda hidden, weight, labels: liger(weight, hidden, labels)
    if impl == "cut_cross_entropy":
        cce = h.import_or_skip("cut_cross_entropy", "linear_cross_entropy", " (pip install cut-cross-entropy)")
        return lambda hidden, weight, labels: cce(hidden, weight, labels, ignore_index=IGNORE)
    raise ValueError(f"unknown contender {impl!r}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tokens,dim,vocab", CASES, ids=[f"T{t}-D{d}-V{v}" for t, d, v in CASES])
def test_generation_loss(benchmark, impl: str, tokens: int, dim: int, vocab: int) -> None:
    loss_fn = _loss_fn(impl)
    gen, dev, dtype = h.generator(0), h.device(), h.compute_dtype()
    hidden = torch.randn(tokens, dim, generator=gen, device=dev).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen, device=dev) * dim**-0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=gen, device=dev)
    labels[torch.rand(tokens, generator=gen, device=dev) < 0.05] = IGNORE

    def fwd_bwd():
        loss = loss_fn(hidden, weight, labels)
        return torch.autograd.grad(loss, (hidden, weight))

    dtype_name = str(dtype).removeprefix("torch.")
    h.measure(
        benchmark,
        fwd_bwd,
        group=f"generation loss fwd+bwd T={tokens} D={dim} V={vocab} {dtype_name}",
        impl=impl,
        work={"tokens": tokens, "flop": 6.0 * tokens * dim * vocab},
        params={"op": "generation_loss", "tokens": tokens, "dim": dim, "vocab": vocab, "dtype": dtype_name},
    )
