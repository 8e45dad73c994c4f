"""AdamW with decay on matrices only, the cosine schedule with linear warm-up, the logit-scale clamp.

As in open_clip's trainer: parameters with fewer than two dimensions (biases, LayerNorm weights,
``logit_scale``, the class/positional embeddings' 1-D cousins) get no weight decay; the schedule
is ``lr·(s+1)/warmup`` during warm-up, then ``lr·½(1 + cos(π·(s − warmup)/(total − warmup)))``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

LOGIT_SCALE_MAX = math.log(100)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decayed matrices; everything else not decayed (the scalars, such as ``logit_scale``, in a group of
    their own: FSDP2 keeps them as plain tensors among sharded ones). Frozen parameters are left out."""
    decay, no_decay, scalars = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # open_clip's rule: 1-D tensors, norms, biases and the logit scale are not decayed.
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (scalars if p.ndim == 0 else no_decay if exclude else decay).append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return groups + ([{"params": scalars, "weight_decay": 0.0}] if scalars else [])


def build_optimizer(
    groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float, kind: str = "adamw",
    for_compile: bool = False,
) -> torch.optim.Optimizer:
    """torch AdamW, or apex's FusedAdam in AdamW mode.

    torch's AdamW is ``fused=True`` (one kernel over all parameters) when every parameter is a
    plain floating-point tensor on the CPU or CUDA: on a 2-core CPU the fused step over
    ``LCL_tiny`` takes a quarter of the ``foreach`` step's time. Sharded (FSDP2 ``DTensor``)
    parameters keep torch's default implementation.

    ``for_compile`` (``--compile-optimizer``): the ``foreach`` implementation with ``capturable``
    state and a tensor learning rate, which ``torch.compile`` fuses into one graph that the
    schedule's changing rate does not recompile.
    """
    if kind == "apex_fused_adam":
        from apex.optimizers import FusedAdam  # checked importable by the config

        return FusedAdam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)
    if kind != "adamw":
        raise ValueError(f"optimizer must be 'adamw' or 'apex_fused_adam', got {kind!r}")
    if for_compile:
        lr_tensor = torch.tensor(float(lr))
        return torch.optim.AdamW(groups, lr=lr_tensor, betas=betas, eps=eps, foreach=True, capturable=True)
    params: Iterable[torch.Tensor] = (p for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True if _fusable(params) else None)


def _fusable(params: Iterable[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these parameters (plain float tensors on the CPU or CUDA)."""
    for p in params:
        plain = type(p) in (torch.Tensor, nn.Parameter)
        if not (plain and p.device.type in ("cpu", "cuda") and p.is_floating_point()):
            return False
    return True


def prime_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], step) -> None:
    """Create a capturable optimizer's state with ``step`` (its compiled step) at learning rate 0.

    Loading an optimizer state dict into a fresh optimizer, torch.distributed.checkpoint first
    creates the state with an eager step at rate 0, which a capturable AdamW (``--compile-optimizer``)
    refuses on the CPU. The same step through ``step`` leaves the weights as they are (AdamW's
    update and its decay both scale with the rate) and gives the loader a state to fill.
    No-op for other optimizers or when the state exists.
    """
    groups = optimizer.param_groups
    if optimizer.state or not any(g.get("capturable") for g in groups):
        return
    rates = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in groups]
    for g in groups:  # a tensor rate in place: the compiled step keeps reading the same tensor
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(0.0)
        else:
            g["lr"] = 0.0
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    try:
        step()
    finally:
        for g, rate in zip(groups, rates):
            if isinstance(rate, torch.Tensor):
                g["lr"].copy_(rate)
            else:
                g["lr"] = rate
        optimizer.zero_grad(set_to_none=True)


def default_warmup(total_steps: int, warmup: int | None, recipe: int = 2000) -> int:
    """``warmup`` as given, else the recipe's 2000 steps or a tenth of the run if that is shorter."""
    return warmup if warmup is not None else min(recipe, max(total_steps // 10, 1))


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, warmup: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` whose factor at step ``s`` is open_clip's ``cosine_lr`` (stepped once per update)."""
    decay_steps = max(total_steps - warmup, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, decay_steps) / decay_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def clamp_logit_scale(model: nn.Module) -> None:
    """Keep ``logit_scale`` in [0, ln 100] after each step, as the reference's trainer does."""
    model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
