"""Fused linear + cross-entropy: ``cross_entropy(hidden @ weight.T, labels)`` without the logits.

The LM head of LCL projects every selected text position onto a 49411-token vocabulary; the
reference materialises those ``[T, V]`` float32 logits (and as much again for their gradient).
Here the loss and the gradients of ``hidden`` and ``weight`` are computed tile by tile:

- ``impl="triton"``: Cut-Cross-Entropy-style kernels (:mod:`lcl_fast.kernels.linear_cross_entropy`):
  the forward keeps only a per-token log-sum-exp, the backward recomputes logit tiles.
- ``impl="torch"``: plain PyTorch, two strategies.
  *Fused* (``reduction`` "mean"/"sum" with a gradient needed): the gradients are computed during
  the forward, one token chunk at a time, the chunk's logits for the whole vocabulary in one
  float32 buffer of at most ``_TILE_BYTES`` (339 tokens at V = 49411; kept between calls on
  the CPU): the logits' matmul, one in-place softmax, the matmuls for ``dH`` and ``dW``
  (float32 accumulation), i.e. no more matmul work than the reference; the backward only
  scales them by the incoming gradient.
  *Recompute* (``reduction="none"``, or no gradient needed): the forward walks ``[token chunk,
  vocab chunk]`` tiles with an online log-sum-exp and saves ``[T]`` of them; the backward
  recomputes the tiles (vocab chunk outer so each ``dW`` slice stays hot).
- ``impl="reference"``: the published code's strategy (full logits, ``F.cross_entropy``).

Conventions shared by every ``impl``: logits are computed in the inputs' dtype, or under
autocast in the autocast dtype (as ``F.linear`` there), and the softmax in float32 (float64 for
float64 inputs), which is also the dtype of the returned loss. ``reduction="mean"`` averages
over the tokens whose label is not ``ignore_index``; when every token is ignored the mean is 0
with zero gradients (``nn.CrossEntropyLoss``, as the reference calls it, returns NaN there).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from lcl_fast._impl import resolve_impl
from lcl_fast.ops.library import empty

REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TILE_BYTES = 64 * 2**20  # the torch path's logits buffer (bigger tiles: fewer, larger matmuls)
_VOCAB_CHUNK = 4096  # vocabulary columns per tile in the torch path's recompute strategy
_FUSED_VOCAB_CHUNK = 1024  # columns per matmul in the fused strategy on the CPU (an L2-sized output)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` written into ``out``, computed in the inputs' dtype (as F.linear does)."""
    if a.dtype == out.dtype:
        return torch.mm(a, b.T, out=out)
    return out.copy_(a @ b.T)


class _Workspace:
    """The torch path's logits buffer, kept between calls on the CPU.

    A fresh buffer of tens of MB is a fresh ``mmap`` for glibc: its first touch faults in every
    page again, each step (at the default run's shape 18 ms, nearly the logits matmul's 23 ms). CUDA's
    caching allocator already reuses memory, so only CPU buffers are kept: one per dtype, grown
    to the largest size asked for, and lent to one caller at a time (a concurrent caller gets a
    buffer of its own). :func:`release_workspace` frees them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    @contextlib.contextmanager
    def borrow(self, numel: int, dtype: torch.dtype, device: torch.device) -> Iterator[torch.Tensor]:
        if device.type != "cpu" or not self._lock.acquire(blocking=False):
            yield torch.empty(numel, dtype=dtype, device=device)
            return
        try:
            buf = self._buffers.get(dtype)
            if buf is None or buf.numel() < numel:
                self._buffers.pop(dtype, None)  # free the smaller one before allocating
                buf = self._buffers[dtype] = torch.empty(numel, dtype=dtype)
            yield buf
        finally:
            self._lock.release()

    def release(self) -> None:
        with self._lock:
            self._buffers.clear()


_WORKSPACE = _Workspace()


def release_workspace() -> None:
    """Free the CPU logits buffer the torch path keeps between calls (at most ~64 MiB a dtype)."""
    _WORKSPACE.release()


def _tile(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous ``[rows, cols]`` view at the start of a flat buffer (so ``mm(out=)`` needs no copy)."""
    return buf[: rows * cols].view(rows, cols)


def _reduce(losses: torch.Tensor, n_valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return losses
    total = losses.sum()
    return total / n_valid.clamp_min(1).to(total.dtype) if reduction == "mean" else total


# --------------------------------------------------------------------------------------------------
# torch path


def _torch_fused(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
    token_scale: torch.Tensor, need_dh: bool, need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-token losses plus the gradients of ``sum_t token_scale[t] * CE_t``, in one pass.

    Per token chunk: the ``[tokens, V]`` logits (matmuls of ``_FUSED_VOCAB_CHUNK`` columns on the
    CPU, whose outputs stay in cache), their softmax in place (one fused kernel, each row in
    cache), ``P - onehot`` by a scatter, then ``dH`` and ``dW`` by matmuls over the same column
    blocks; ``token_scale`` multiplies the ``[tokens, D]`` operands, never the tile. The
    log-sum-exp comes from the row maximum and the softmax's largest entry (``1 / sum exp``).
    ``dH`` comes back in the inputs' dtype, ``dW`` in the accumulation dtype.
    """
    T, D = hidden.shape
    V = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    rows = max(1, min(T, _TILE_BYTES // (V * acc.itemsize)))
    cols = _FUSED_VOCAB_CHUNK if hidden.device.type == "cpu" else V
    blocks = [(v0, min(V, v0 + cols)) for v0 in range(0, V, cols)]
    safe_labels = torch.where(valid, labels, 0)
    losses = torch.empty(T, dtype=acc, device=hidden.device)
    dh = torch.empty(T, D, dtype=hidden.dtype, device=hidden.device) if need_dh else None
    dw = torch.empty(V, D, dtype=acc, device=hidden.device) if need_dw else None
    with _WORKSPACE.borrow(rows * V, acc, hidden.device) as buf:
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            h = hidden[t0:t1]
            lab = safe_labels[t0:t1, None]
            tile = _tile(buf, t1 - t0, V)
            for v0, v1 in blocks:
                _logits_into(tile[:, v0:v1], h, weight[v0:v1])
            label_logit = tile.gather(1, lab).squeeze(1)
            row_max = tile.amax(dim=1)
            torch.softmax(tile, 1, out=tile)
            lse = row_max - tile.amax(dim=1).log()
            losses[t0:t1] = torch.where(valid[t0:t1], lse - label_logit, 0.0)
            tile.scatter_add_(1, lab, torch.full_like(label_logit, -1.0)[:, None])  # P - onehot
            scale = token_scale[t0:t1, None]
            if need_dh:
                if tile.dtype == hidden.dtype:
                    dh_chunk = dh[t0:t1]
                    for v0, v1 in blocks:
                        if v0 == 0:
                            torch.mm(tile[:, v0:v1], weight[v0:v1], out=dh_chunk)
                        else:
                            dh_chunk.addmm_(tile[:, v0:v1], weight[v0:v1])
                    dh_chunk.mul_(scale)
                else:
                    dh[t0:t1] = ((tile.to(hidden.dtype) @ weight).to(acc) * scale).to(hidden.dtype)
            if need_dw:  # the first chunk writes dW (no zero fill of a vocabulary-sized buffer)
                scaled_h = h.to(acc) * scale
                for v0, v1 in blocks:
                    if t0 == 0:
                        torch.mm(tile[:, v0:v1].T, scaled_h, out=dw[v0:v1])
                    else:
                        dw[v0:v1].addmm_(tile[:, v0:v1].T, scaled_h)
    if need_dw and T == 0:
        dw.zero_()
    return losses, dh, dw


def _torch_lse(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-sum-exp and label logit over ``[token chunk, vocab chunk]`` tiles.

    The label logit is 0 where the label is outside ``[0, V)``.
    """
    T = hidden.shape[0]
    V = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    cols = min(V, _VOCAB_CHUNK)
    rows = max(1, min(T, _TILE_BYTES // (cols * acc.itemsize)))
    lse = torch.empty(T, dtype=acc, device=hidden.device)
    label_logit = torch.zeros(T, dtype=acc, device=hidden.device)
    with _WORKSPACE.borrow(rows * cols, acc, hidden.device) as buf:
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            h = hidden[t0:t1]
            row_max = torch.full((t1 - t0,), float("-inf"), dtype=acc, device=hidden.device)
            sum_exp = torch.zeros(t1 - t0, dtype=acc, device=hidden.device)
            for v0 in range(0, V, cols):
                v1 = min(V, v0 + cols)
                tile = _logits_into(_tile(buf, t1 - t0, v1 - v0), h, weight[v0:v1])
                local = labels[t0:t1] - v0
                here = (local >= 0) & (local < v1 - v0)
                picked = tile.gather(1, local.clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
                label_logit[t0:t1] += torch.where(here, picked, 0.0)
                new_max = torch.maximum(row_max, tile.amax(dim=1))
                sum_exp = sum_exp * (row_max - new_max).exp() + tile.sub_(new_max[:, None]).exp_().sum(dim=1)
                row_max = new_max
            lse[t0:t1] = row_max + sum_exp.log()
    return lse, label_logit


def _torch_grads(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
    token_scale: torch.Tensor, need_dh: bool, need_dw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``dH``, ``dW`` (accumulation dtype) of ``sum_t token_scale[t] * CE_t``, recomputing tiles."""
    T, D = hidden.shape
    V = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    cols = min(V, _VOCAB_CHUNK)
    rows = max(1, min(T, _TILE_BYTES // (cols * acc.itemsize)))
    dh = torch.zeros(T, D, dtype=acc, device=hidden.device) if need_dh else None
    dw = torch.zeros(V, D, dtype=acc, device=hidden.device) if need_dw else None
    with _WORKSPACE.borrow(rows * cols, acc, hidden.device) as buf:
        for v0 in range(0, V, cols):
            v1 = min(V, v0 + cols)
            w = weight[v0:v1]
            w_acc = w.to(acc)
            for t0 in range(0, T, rows):
                t1 = min(T, t0 + rows)
                h = hidden[t0:t1]
                scale = token_scale[t0:t1]
                tile = _logits_into(_tile(buf, t1 - t0, v1 - v0), h, w)
                tile.sub_(lse[t0:t1, None]).exp_().mul_(scale[:, None])
                local = labels[t0:t1] - v0
                here = (local >= 0) & (local < v1 - v0)
                onehot = -torch.where(here, scale, 0.0)[:, None]
                tile.scatter_add_(1, local.clamp(0, v1 - v0 - 1)[:, None], onehot)
                if need_dh:
                    dh[t0:t1].addmm_(tile, w_acc)
                if need_dw:
                    dw[v0:v1].addmm_(tile.T, h.to(acc))
    return dh, dw


# --------------------------------------------------------------------------------------------------
# autograd


def _token_scale(
    valid: torch.Tensor, n_valid: torch.Tensor, reduction: str, grad: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Per-token factor of ``dloss/dCE_t``: the reduction, the incoming gradient, 0 where ignored."""
    scale = valid.to(dtype)
    if reduction == "mean":
        scale = scale / n_valid.clamp_min(1).to(dtype)
    if grad is not None:
        scale = scale * grad.to(dtype)
    return scale


# --------------------------------------------------------------------------------------------------
# entry points


def reference_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str
) -> torch.Tensor:
    """The reference's strategy: full ``[T, V]`` logits, then ``F.cross_entropy`` (autograd)."""
    logits = F.linear(hidden, weight).to(_acc_dtype(hidden.dtype))
    if reduction == "mean":
        # sum / count is what F.cross_entropy's mean does; the clamp makes "all ignored" 0, not NaN
        total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
        return total / (labels != ignore_index).sum().clamp_min(1).to(total.dtype)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


def _validate(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"hidden must be [T, D] and weight [V, D]; got {hidden.dim()}-d {tuple(hidden.shape)} "
            f"and {weight.dim()}-d {tuple(weight.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden has D={hidden.shape[1]} but weight has D={weight.shape[1]}")
    if weight.shape[0] == 0:
        raise ValueError("weight has V=0 rows: the vocabulary cannot be empty")
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels must be [T]=[{hidden.shape[0]}], got {tuple(labels.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(f"hidden and weight must share a float dtype, got {hidden.dtype} and {weight.dtype}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if not (hidden.device == weight.device == labels.device):
        raise ValueError(
            f"devices differ: hidden {hidden.device}, weight {weight.device}, labels {labels.device}"
        )


def _check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Reject labels outside ``[0, V)`` that are not ignored (eager CPU only: on CUDA it would sync,
    compiled it would break the graph; the model's own labels are its in-range token ids)."""
    if labels.is_cuda or labels.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels[{i}] = {int(labels[i])} is outside [0, {vocab}) and is not ignore_index={ignore_index}"
        )


def _autocast_inputs(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Under autocast the head's matmul runs in the autocast dtype, as ``F.linear`` would there."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight
    dtype = torch.get_autocast_dtype(device_type)
    eligible = (torch.float16, torch.bfloat16, torch.float32)  # autocast leaves float64 alone

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.dtype in eligible else t

    return cast(hidden), cast(weight)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    impl: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels``, never storing the ``[T, V]`` logits.

    Args:
        hidden: ``[T, D]`` float16/bfloat16/float32/float64 (for LCL: the selected hidden
            states after the LM head's LayerNorm). Under autocast both inputs are cast to the
            autocast dtype first (gradients flow back to the originals).
        weight: ``[V, D]``, same dtype (the LM head's ``Linear`` weight, no bias).
        labels: ``[T]`` integer class ids in ``[0, V)`` or ``ignore_index``.
        ignore_index: label that contributes neither loss nor gradient (LCL uses its pad id 0).
        reduction: ``"mean"`` over the non-ignored tokens (0, not NaN, when there are none),
            ``"sum"``, or ``"none"`` (``[T]``, 0 at ignored tokens).
        impl: ``"auto" | "triton" | "torch" | "reference"`` (see :mod:`lcl_fast._impl`); float64
            inputs run on ``"torch"`` under ``"auto"``.

    Returns:
        The loss in float32 (float64 for float64 inputs), differentiable in ``hidden`` and
        ``weight``.
    """
    hidden, weight = _autocast_inputs(hidden, weight)
    _validate(hidden, weight, labels, reduction)
    _check_label_range(labels, weight.shape[0], ignore_index)
    if impl == "auto" and hidden.dtype == torch.float64:
        impl = "torch"  # the kernels take 16/32-bit floats
    impl = resolve_impl(impl, hidden, weight, labels)
    if impl == "reference":
        return reference_linear_cross_entropy(hidden, weight, labels.long(), ignore_index, reduction)
    if impl == "triton" and hidden.dtype == torch.float64:
        raise ValueError("impl='triton' takes float16/bfloat16/float32 inputs, got float64; use impl='torch'")
    return linear_cross_entropy_op(hidden, weight, labels.long(), int(ignore_index), reduction, impl)

# ============================================================================ custom ops
# Registered at import (namespace lcl_fast; see lcl_fast.ops.library): torch.compile keeps each one whole.



def _lce_fused(impl: str, reduction: str, need_dh: bool, need_dw: bool) -> bool:
    """The torch path computes the gradients in the forward when a reduced loss needs them."""
    return impl == "torch" and reduction != "none" and (need_dh or need_dw)


@torch.library.custom_op("lcl_fast::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, reduction: str, impl: str,
    need_dh: bool, need_dw: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, lse ``[T]`` or empty, dh ``[T, D]`` or empty, dw ``[V, D]`` float32/64 or empty)."""
    with torch.autocast(hidden.device.type, enabled=False):
        valid = labels != ignore_index
        n_valid = valid.sum()
        acc = _acc_dtype(hidden.dtype)
        if _lce_fused(impl, reduction, need_dh, need_dw):
            scale = _token_scale(valid, n_valid, reduction, None, acc)
            losses, dh, dw = _torch_fused(hidden, weight, labels, valid, scale, need_dh, need_dw)
            lse = empty(hidden, acc)
            dh = dh if dh is not None else empty(hidden)
            dw = dw if dw is not None else empty(hidden, acc)
        else:
            if impl == "triton":
                from lcl_fast.kernels.linear_cross_entropy import lse_forward

                lse, label_logit = lse_forward(hidden, weight, labels, ignore_index)
            else:
                lse, label_logit = _torch_lse(hidden, weight, labels)
            losses = torch.where(valid, lse - label_logit, 0.0)
            dh, dw = empty(hidden), empty(hidden, acc)
        return _reduce(losses, n_valid, reduction).to(acc), lse.to(acc), dh, dw


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, labels, ignore_index, reduction, impl, need_dh, need_dw):
    acc = _acc_dtype(hidden.dtype)
    loss = hidden.new_empty(labels.shape if reduction == "none" else (), dtype=acc)
    if _lce_fused(impl, reduction, need_dh, need_dw):
        dh = hidden.new_empty(hidden.shape) if need_dh else empty(hidden)
        dw = hidden.new_empty(weight.shape, dtype=acc) if need_dw else empty(hidden, acc)
        return loss, empty(hidden, acc), dh, dw
    lse = hidden.new_empty(labels.shape, dtype=acc)
    return loss, lse, empty(hidden), empty(hidden, acc)


@torch.library.custom_op("lcl_fast::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(
    grad: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor, lse: Tensor, ignore_index: int, reduction: str,
    impl: str, need_dh: bool, need_dw: bool,
) -> tuple[Tensor, Tensor]:
    """dh, dw (inputs' dtypes; empty where not needed), recomputing the logit tiles."""
    with torch.autocast(hidden.device.type, enabled=False):
        valid = labels != ignore_index
        scale = _token_scale(valid, valid.sum(), reduction, grad, lse.dtype)
        if impl == "triton":
            from lcl_fast.kernels.linear_cross_entropy import grad_backward

            dh, dw = grad_backward(hidden, weight, labels, lse, scale, need_dh, need_dw)
        else:
            dh, dw = _torch_grads(hidden, weight, labels, lse, scale, need_dh, need_dw)
    return (dh.to(hidden.dtype) if need_dh else empty(hidden)), (dw.to(weight.dtype) if need_dw else empty(weight))


@linear_cross_entropy_bwd.register_fake
def _(grad, hidden, weight, labels, lse, ignore_index, reduction, impl, need_dh, need_dw):
    dh = hidden.new_empty(hidden.shape) if need_dh else empty(hidden)
    dw = weight.new_empty(weight.shape) if need_dw else empty(weight)
    return dh, dw


def _lce_setup(ctx, inputs, output) -> None:
    hidden, weight, labels, ignore_index, reduction, impl, need_dh, need_dw = inputs
    _, lse, dh, dw = output
    # only the loss is differentiated: no zero gradients materialised for lse, dh and dw ([V, D])
    ctx.set_materialize_grads(False)
    ctx.fused = _lce_fused(impl, reduction, need_dh, need_dw)
    ctx.args = (ignore_index, reduction, impl)
    ctx.dtypes = (hidden.dtype, weight.dtype)
    if ctx.fused:
        ctx.save_for_backward(dh, dw)
    else:
        ctx.save_for_backward(hidden, weight, labels, lse)
    ctx.used = False


def _scaled(saved: Tensor, grad: Tensor, dtype: torch.dtype) -> Tensor:
    """``saved * grad`` in ``dtype``. In eager mode in place when ``saved`` has that dtype: the op's
    own buffer, handed out once (``ctx.used``), so a ``[V, D]`` gradient needs no second buffer of fresh
    pages a step. Traced graphs (torch.compile, AOT dispatch: fake or functional tensor subclasses)
    stay functional; inductor plans their buffers."""
    if saved.dtype == dtype and type(saved) is Tensor and not torch.compiler.is_compiling():
        return saved.mul_(grad.to(dtype))
    return (saved * grad.to(saved.dtype)).to(dtype)


def _lce_backward(ctx, grad, _g_lse, _g_dh, _g_dw):
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if ctx.used:
        raise RuntimeError(
            "linear_cross_entropy hands its saved gradients to the first backward; a second backward "
            "through the same graph (retain_graph=True) is not supported"
        )
    if grad is None:  # the loss took no part in what is differentiated (grads are not materialised)
        return None, None, None, None, None, None, None, None
    if ctx.fused:
        ctx.used = True
        dh, dw = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        # the loss is a scalar: every token's gradient scales by the incoming one
        dh = _scaled(dh, grad, h_dtype) if need_dh else None
        dw = _scaled(dw, grad, w_dtype) if need_dw else None
        return dh, dw, None, None, None, None, None, None
    hidden, weight, labels, lse = ctx.saved_tensors
    dh, dw = linear_cross_entropy_bwd(grad, hidden, weight, labels, lse, *ctx.args, need_dh, need_dw)
    return (dh if need_dh else None), (dw if need_dw else None), None, None, None, None, None, None


linear_cross_entropy_fwd.register_autograd(_lce_backward, setup_context=_lce_setup)


def linear_cross_entropy_op(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, reduction: str,
                            impl: str) -> Tensor:
    """The loss (see :func:`lcl_fast.ops.linear_cross_entropy.linear_cross_entropy`), differentiable."""
    grad_on = torch.is_grad_enabled()
    need_dh, need_dw = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    return linear_cross_entropy_fwd(hidden, weight, labels, ignore_index, reduction, impl, need_dh, need_dw)[0]
