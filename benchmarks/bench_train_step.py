"""A full training step (forward, LCLLoss, backward, AdamW step, logit-scale clamp) per configuration.

The step is the published recipe's: AdamW (betas 0.9/0.98, eps 1e-6, weight decay 0.2 on
matrices only; lr 5e-4), then ``logit_scale`` clamped to [0, ln 100]; bfloat16 autocast on
CUDA. The reference gets torch's default AdamW, as open_clip builds it; lcl-fast gets its
trainer's (``lcl_fast.training.optim``: the same update, ``fused=True`` on CUDA). The step is
written here rather than borrowed from ``lcl_fast.training.loop.Trainer``, which needs a whole
run (config, loader, recorder) around it; it does what that trainer's step does for one
micro-batch without gradient clipping. Each contender runs this step over its own model, so
the difference is the implementation of the model, the loss and the optimizer. The optimizer
state exists before the measurement (a step on zero gradients creates it), so the peak memory
is a steady-state step's.

Throughput: samples (rows) per second, and tokens per second (rows × context length).
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import _harness as h
from benchmarks import _model_inputs as mi

IMPLS = ["reference", "torch", "triton"]


def adamw(model: torch.nn.Module, impl: str) -> torch.optim.Optimizer:
    """The published recipe's AdamW: lcl-fast's trainer's for lcl-fast, torch's default for the reference."""
    if impl != "reference":
        try:
            from lcl_fast.training.optim import build_optimizer, param_groups
        except ImportError:
            pass
        else:
            return build_optimizer(param_groups(model, 0.2), lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    decay, no_decay = [], []  # open_clip's rule: no weight decay on gains, biases and the logit scale
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exclude = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(param)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.2}]
    return torch.optim.AdamW(groups, lr=5e-4, betas=(0.9, 0.98), eps=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", mi.CASES, ids=[f"{c.name}-b{c.batch}" for c in mi.CASES])
def test_train_step(benchmark, impl: str, case: mi.ModelCase) -> None:
    model, loss_fn, images, text = mi.build(case, impl)
    model.train()
    optimizer = adamw(model, impl)
    max_log_scale = math.log(100)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with mi.autocast():
            contrastive, generation = loss_fn(**model(images, text))
        (contrastive + generation).backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_log_scale)

    # Create the optimizer state with a step on zero gradients (cheap next to a real step), so
    # the measured step is a steady-state one: the Adam moments exist before it. The gradients
    # are dropped again: the CPU memory probe cannot see a call free tensors made before it.
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    h.measure(
        benchmark,
        step,
        group=f"train step {case.label}",
        impl=impl,
        work=mi.work(case, text),
        heavy=case.name != "LCL_tiny",
        params={"op": "train_step", "model": case.name, "batch": case.batch, "layers": case.layers,
                "context_length": text.shape[1], "n_images": images.shape[0]},
    )
