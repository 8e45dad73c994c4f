"""Whole model, forward + backward (both losses), per configuration: reference vs lcl-fast.

``reference`` builds the model with the reference computation strategy everywhere (dense
attention masks, full vocabulary logits, full contrastive logits); ``torch``/``triton`` pick
lcl-fast's paths for every heavy component and hand the loss hidden states instead of logits
(``fused_generation_loss=True``). No gradient checkpointing on either side. bfloat16 autocast
on CUDA, float32 on the CPU. Shapes: see :mod:`benchmarks._model_inputs`.

Throughput: samples (rows) per second, and tokens per second (rows × context length).
"""

from __future__ import annotations

import pytest

from benchmarks import _harness as h
from benchmarks import _model_inputs as mi

IMPLS = ["reference", "torch", "triton"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", mi.CASES, ids=[f"{c.name}-b{c.batch}" for c in mi.CASES])
def test_model_forward_backward(benchmark, impl: str, case: mi.ModelCase) -> None:
    model, loss_fn, images, text = mi.build(case, impl)
    model.train()

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        with mi.autocast():
            contrastive, generation = loss_fn(**model(images, text))
        (contrastive + generation).backward()

    h.measure(
        benchmark,
        fwd_bwd,
        group=f"model fwd+bwd {case.label}",
        impl=impl,
        work=mi.work(case, text),
        heavy=case.name != "LCL_tiny",
        params={"op": "model_fwd_bwd", "model": case.name, "batch": case.batch, "layers": case.layers,
                "context_length": text.shape[1], "n_images": images.shape[0]},
    )
