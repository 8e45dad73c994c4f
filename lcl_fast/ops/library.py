"""The heavy ops as ``torch.library`` custom ops (namespace ``lcl_fast``), so ``torch.compile`` keeps them.

A Triton launch or a Python loop over chunks cannot be traced with fake tensors: Dynamo would
break the graph there, or fail. Registered as custom ops with a fake (meta) implementation and
``register_autograd``, each op is one opaque node of the compiled graph, forward and backward,
with shapes known from its inputs' shapes (symbolic sizes included: no recompile when a batch's
pair or token count changes).

Ops (``torch.ops.lcl_fast.*``); ``impl`` is ``"torch"`` or ``"triton"``:

- ``contrastive_fwd`` / ``contrastive_bwd``: the chunked contrastive loss
  (:mod:`lcl_fast.ops.contrastive`); the forward also returns its per-row statistics
  ``stats [3 | 4, n, 2]`` (symmetric: row lse, column lse, label logit; else each direction's row
  lse and label logit), which the backward reads. The Triton path keeps each logsumexp as a
  (max, log2 sum) pair; the torch path's logsumexp and every label logit fill slot 0 only.
- ``linear_cross_entropy_fwd`` / ``linear_cross_entropy_bwd``: LM head + cross-entropy without
  logits (:mod:`lcl_fast.ops.linear_cross_entropy`). The torch path's fused strategy returns the
  gradients from the forward (``dh``, ``dw``; empty when not needed), the others a per-token
  ``lse [T]`` for the backward to recompute from.
- ``attention_triton_fwd`` / ``attention_triton_bwd``: the Triton interleaved attention kernels
  on a precomputed metadata table (:mod:`lcl_fast.kernels.attention_launch`).
- ``attention_torch_fwd`` / ``attention_torch_bwd``: the torch path's per-document attention
  (host loops over document runs), used under ``torch.compile`` only; it saves the output and
  each row's log-sum-exp, and its backward calls the CPU flash kernels' backward per document
  (elsewhere, or for scattered documents, the backward recomputes the forward).

Gradients not asked for come back as empty ``[0]`` tensors (a custom op returns no None).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from . import attention as A
from . import contrastive as C
from . import linear_cross_entropy as X

__all__ = ["contrastive_op", "linear_cross_entropy_op", "attention_triton_op", "attention_torch_op"]

_EMPTY = (0,)


def _empty(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return like.new_empty(_EMPTY, dtype=dtype or like.dtype)


# ============================================================================ contrastive loss


def _stats_rows(symmetric: bool) -> int:
    return 3 if symmetric else 4


def _stack_stats(fields: list[Tensor]) -> Tensor:
    """``[R, n, 2]`` from statistics ``[n]`` (slot 0) or ``[n, 2]`` (Triton's (max, log2 sum) pairs)."""
    return torch.stack([f if f.dim() == 2 else torch.stack([f, torch.zeros_like(f)], dim=1) for f in fields])


def _unstack_stats(stats: Tensor, impl: str, row: int, col: Optional[int], label: int) -> C._Stats:
    def lse(i: int) -> Tensor:
        return stats[i] if impl == "triton" else stats[i][:, 0]

    return C._Stats(lse(row), None if col is None else lse(col), stats[label][:, 0])


@torch.library.custom_op("lcl_fast::contrastive_fwd", mutates_args=())
def contrastive_fwd(
    image: Tensor, text: Tensor, image_cols: Optional[Tensor], text_cols: Optional[Tensor], scale: Tensor,
    impl: str, label_offset: int, chunk_size: Optional[int],
) -> tuple[Tensor, Tensor]:
    """(loss 0-dim, stats ``[3|4, n]``) of rows ``image, text [n, d]`` against the columns
    (``image_cols``/``text_cols [m, d]``; None: symmetric, the rows themselves)."""
    tiles = C._TILES[impl]
    acc = tiles.acc_dtype(image.dtype)
    symmetric = image_cols is None
    n = image.shape[0]
    if n == 0:
        return image.new_zeros((), dtype=acc), image.new_zeros(_stats_rows(symmetric), 0, 2, dtype=acc)
    with torch.autocast(image.device.type, enabled=False):
        s = scale.detach().to(device=image.device, dtype=acc)
        rows_i, rows_t = tiles.operand(image), tiles.operand(text)
        if symmetric:
            st = tiles.lse(rows_i, rows_t, s, True, label_offset, chunk_size)
            total = st.label_excess()
            stats = _stack_stats([st.row, st.col, st.label])
        else:
            a = tiles.lse(rows_i, tiles.operand(text_cols), s, False, label_offset, chunk_size)
            b = tiles.lse(rows_t, tiles.operand(image_cols), s, False, label_offset, chunk_size)
            total = a.label_excess() + b.label_excess()
            stats = _stack_stats([a.row, a.label, b.row, b.label])
        loss = total * (tiles.log_unit / (2 * n))
    return loss.to(acc), stats.to(acc)


@contrastive_fwd.register_fake
def _(image, text, image_cols, text_cols, scale, impl, label_offset, chunk_size):
    acc = C._TILES[impl].acc_dtype(image.dtype)
    stats = image.new_empty(_stats_rows(image_cols is None), image.shape[0], 2, dtype=acc)
    return image.new_empty((), dtype=acc), stats


@torch.library.custom_op("lcl_fast::contrastive_bwd", mutates_args=())
def contrastive_bwd(
    grad: Tensor, image: Tensor, text: Tensor, image_cols: Optional[Tensor], text_cols: Optional[Tensor],
    scale: Tensor, stats: Tensor, impl: str, label_offset: int, chunk_size: Optional[int],
    need_image: bool, need_text: bool, need_image_cols: bool, need_text_cols: bool, need_scale: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of image, text, image_cols, text_cols, scale (empty ``[0]`` where not needed)."""
    tiles = C._TILES[impl]
    n = image.shape[0]
    symmetric = image_cols is None
    need = (need_image, need_text, need_image_cols and not symmetric, need_text_cols and not symmetric, need_scale)
    inputs = (image, text, image_cols, text_cols, scale)
    if n == 0:  # zeros still reach the gathered columns: their backward is a collective
        return tuple(torch.zeros_like(t) if t is not None and nd else _empty(image) for t, nd in zip(inputs, need))
    acc = tiles.acc_dtype(image.dtype)
    with torch.autocast(image.device.type, enabled=False):
        s = scale.detach().to(device=image.device, dtype=acc)
        coef = grad.to(acc) * s / (2 * n)
        rows_i, rows_t = tiles.operand(image), tiles.operand(text)
        if symmetric:
            st = _unstack_stats(stats, impl, 0, 1, 2)
            gi, gt, ds = C._grad_problem(tiles, rows_i, rows_t, st, s, 0, coef, need[0], need[1], need[4],
                                         chunk_size, image.dtype)
            gic = gtc = None
        else:
            st_i, st_t = _unstack_stats(stats, impl, 0, None, 1), _unstack_stats(stats, impl, 2, None, 3)
            gi, gtc, ds_i = C._grad_problem(tiles, rows_i, tiles.operand(text_cols), st_i, s, label_offset, coef,
                                            need[0], need[3], need[4], chunk_size, image.dtype)
            gt, gic, ds_t = C._grad_problem(tiles, rows_t, tiles.operand(image_cols), st_t, s, label_offset, coef,
                                            need[1], need[2], need[4], chunk_size, image.dtype)
            ds = ds_i + ds_t
        gs = None
        if need[4]:
            gs = (grad.to(acc) * ds / (2 * n)).to(scale.device, scale.dtype).reshape(scale.shape)
    grads = (gi, gt, gic, gtc, gs)
    return tuple(g if g is not None else _empty(image) for g in grads)


@contrastive_bwd.register_fake
def _(grad, image, text, image_cols, text_cols, scale, stats, impl, label_offset, chunk_size,
      need_image, need_text, need_image_cols, need_text_cols, need_scale):
    symmetric = image_cols is None
    need = (need_image, need_text, need_image_cols and not symmetric, need_text_cols and not symmetric, need_scale)
    inputs = (image, text, image_cols, text_cols, scale)
    return tuple(torch.empty_like(t) if nd else _empty(image) for t, nd in zip(inputs, need))


def _contrastive_setup(ctx, inputs, output) -> None:
    image, text, image_cols, text_cols, scale, impl, label_offset, chunk_size = inputs
    ctx.save_for_backward(image, text, image_cols, text_cols, scale, output[1])
    ctx.args = (impl, label_offset, chunk_size)


def _contrastive_backward(ctx, grad_loss, _grad_stats):
    image, text, image_cols, text_cols, scale, stats = ctx.saved_tensors
    need = ctx.needs_input_grad[:5]
    grads = contrastive_bwd(grad_loss, image, text, image_cols, text_cols, scale, stats, *ctx.args, *need)
    return (*(g if nd else None for g, nd in zip(grads, need)), None, None, None)


contrastive_fwd.register_autograd(_contrastive_backward, setup_context=_contrastive_setup)


def contrastive_op(image: Tensor, text: Tensor, image_cols: Optional[Tensor], text_cols: Optional[Tensor],
                   scale: Tensor, impl: str, label_offset: int, chunk_size: Optional[int]) -> Tensor:
    """The loss (see :func:`lcl_fast.ops.contrastive.contrastive_loss`), differentiable."""
    return contrastive_fwd(image, text, image_cols, text_cols, scale, impl, label_offset, chunk_size)[0]


# ====================================================================== linear cross-entropy


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
        acc = X._acc_dtype(hidden.dtype)
        if _lce_fused(impl, reduction, need_dh, need_dw):
            scale = X._token_scale(valid, n_valid, reduction, None, acc)
            losses, dh, dw = X._torch_fused(hidden, weight, labels, valid, scale, need_dh, need_dw)
            lse = _empty(hidden, acc)
            dh = dh if dh is not None else _empty(hidden)
            dw = dw if dw is not None else _empty(hidden, acc)
        else:
            if impl == "triton":
                from lcl_fast.kernels.linear_cross_entropy import lse_forward

                lse, label_logit = lse_forward(hidden, weight, labels, ignore_index)
            else:
                lse, label_logit = X._torch_lse(hidden, weight, labels)
            losses = torch.where(valid, lse - label_logit, 0.0)
            dh, dw = _empty(hidden), _empty(hidden, acc)
        return X._reduce(losses, n_valid, reduction).to(acc), lse.to(acc), dh, dw


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, labels, ignore_index, reduction, impl, need_dh, need_dw):
    acc = X._acc_dtype(hidden.dtype)
    loss = hidden.new_empty(labels.shape if reduction == "none" else (), dtype=acc)
    if _lce_fused(impl, reduction, need_dh, need_dw):
        dh = hidden.new_empty(hidden.shape) if need_dh else _empty(hidden)
        dw = hidden.new_empty(weight.shape, dtype=acc) if need_dw else _empty(hidden, acc)
        return loss, _empty(hidden, acc), dh, dw
    lse = hidden.new_empty(labels.shape, dtype=acc)
    return loss, lse, _empty(hidden), _empty(hidden, acc)


@torch.library.custom_op("lcl_fast::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(
    grad: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor, lse: Tensor, ignore_index: int, reduction: str,
    impl: str, need_dh: bool, need_dw: bool,
) -> tuple[Tensor, Tensor]:
    """dh, dw (inputs' dtypes; empty where not needed), recomputing the logit tiles."""
    with torch.autocast(hidden.device.type, enabled=False):
        valid = labels != ignore_index
        scale = X._token_scale(valid, valid.sum(), reduction, grad, lse.dtype)
        if impl == "triton":
            from lcl_fast.kernels.linear_cross_entropy import grad_backward

            dh, dw = grad_backward(hidden, weight, labels, lse, scale, need_dh, need_dw)
        else:
            dh, dw = X._torch_grads(hidden, weight, labels, lse, scale, need_dh, need_dw)
    return (dh.to(hidden.dtype) if need_dh else _empty(hidden)), (dw.to(weight.dtype) if need_dw else _empty(weight))


@linear_cross_entropy_bwd.register_fake
def _(grad, hidden, weight, labels, lse, ignore_index, reduction, impl, need_dh, need_dw):
    dh = hidden.new_empty(hidden.shape) if need_dh else _empty(hidden)
    dw = weight.new_empty(weight.shape) if need_dw else _empty(weight)
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


# ============================================================================ attention (triton)


def _blocks(blocks: Optional[list[int]]) -> Optional[tuple[int, int]]:
    return None if blocks is None else (int(blocks[0]), int(blocks[1]))


@torch.library.custom_op("lcl_fast::attention_triton_fwd", mutates_args=())
def attention_triton_fwd(
    q: Tensor, k: Tensor, v: Tensor, table: Optional[Tensor], causal: bool, has_doc: bool, has_img: bool,
    scale: float, blocks: Optional[list[int]],
) -> tuple[Tensor, Tensor]:
    """(out ``[B, H, L, D]`` stored ``[B, L, H, D]``, base-2 lse ``[B, H, L]`` float32)."""
    from lcl_fast.kernels.attention_launch import MaskMetadata, attention_forward

    meta = MaskMetadata(table, causal, has_doc, has_img)
    return attention_forward(q, k, v, meta, scale, blocks=_blocks(blocks))


@attention_triton_fwd.register_fake
def _(q, k, v, table, causal, has_doc, has_img, scale, blocks):
    batch, heads, length, head_dim = q.shape
    out = q.new_empty(batch, length, heads, head_dim).transpose(1, 2)
    return out, q.new_empty(batch, heads, length, dtype=torch.float32)


@torch.library.custom_op("lcl_fast::attention_triton_bwd", mutates_args=())
def attention_triton_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, table: Optional[Tensor],
    causal: bool, has_doc: bool, has_img: bool, scale: float, blocks: Optional[list[int]],
) -> tuple[Tensor, Tensor, Tensor]:
    from lcl_fast.kernels.attention_launch import MaskMetadata, attention_backward

    meta = MaskMetadata(table, causal, has_doc, has_img)
    return attention_backward(grad_out, q, k, v, out, lse, meta, scale, blocks=_blocks(blocks))


@attention_triton_bwd.register_fake
def _(grad_out, q, k, v, out, lse, table, causal, has_doc, has_img, scale, blocks):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attn_triton_setup(ctx, inputs, output) -> None:
    q, k, v, table, *rest = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], table)
    ctx.args = tuple(rest)


def _attn_triton_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, table = ctx.saved_tensors
    dq, dk, dv = attention_triton_bwd(grad_out, q, k, v, out, lse, table, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


attention_triton_fwd.register_autograd(_attn_triton_backward, setup_context=_attn_triton_setup)


def attention_triton_op(q: Tensor, k: Tensor, v: Tensor, meta, scale: float,
                        blocks: Optional[tuple[int, int]]) -> Tensor:
    """Triton attention on ``meta`` (:class:`~lcl_fast.kernels.attention_launch.MaskMetadata`)."""
    return attention_triton_fwd(q, k, v, meta.table, meta.causal, meta.has_doc, meta.has_img, scale,
                                None if blocks is None else list(blocks))[0]


# ============================================================================= attention (torch)


@torch.library.custom_op("lcl_fast::attention_torch_fwd", mutates_args=())
def attention_torch_fwd(q: Tensor, k: Tensor, v: Tensor, doc_ids: Optional[Tensor], image_ids: Optional[Tensor],
                        causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The torch path's exact per-document attention ``[B, H, L, D]`` (contiguous), with the
    log-sum-exp of its text and image rows ``[B, H, L]`` (:func:`A.torch_attention_with_stats`;
    zeros where the backward recomputes instead)."""
    saved = A.torch_attention_with_stats(q, k, v, doc_ids, image_ids, causal, scale)
    if saved is not None:
        return saved
    out = A._torch_attention(q, k, v, doc_ids, image_ids, causal, scale).contiguous()
    lse = q.new_zeros(q.shape[:3], dtype=A._stats_dtype(q.dtype))
    return out, lse, lse.clone()


@attention_torch_fwd.register_fake
def _(q, k, v, doc_ids, image_ids, causal, scale):
    lse = q.new_empty(q.shape[:3], dtype=A._stats_dtype(q.dtype))
    return q.new_empty(q.shape), lse, lse.new_empty(lse.shape)


@contextlib.contextmanager
def _autograd_inside_op():
    """Autograd back on inside a custom op's kernel (the dispatcher turns it off below the op's
    own autograd formula), so that the backward can differentiate the recomputed forward."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for name in dir(torch._C.DispatchKey):
        if name.startswith("Autograd") or name == "ADInplaceOrView":
            try:
                excluded = excluded.remove(getattr(torch._C.DispatchKey, name))
            except RuntimeError:  # not a key a set can hold
                pass
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded):
        with torch.enable_grad():
            yield


@torch.library.custom_op("lcl_fast::attention_torch_bwd", mutates_args=())
def attention_torch_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse_text: Tensor,
                        lse_image: Tensor, doc_ids: Optional[Tensor], image_ids: Optional[Tensor], causal: bool,
                        scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv: from the saved output and statistics (CPU flash kernels' backward), or, where
    the forward saved none, by recomputing the forward under autograd."""
    if A._flash_plans(q, doc_ids, image_ids, causal) is not None:
        return A.torch_attention_backward(grad_out, q, k, v, out, lse_text, lse_image, doc_ids, image_ids,
                                          causal, scale)
    with _autograd_inside_op():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = A._torch_attention(*leaves, doc_ids, image_ids, causal, scale)
        grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g.contiguous() for g, t in zip(grads, (q, k, v)))


@attention_torch_bwd.register_fake
def _(grad_out, q, k, v, out, lse_text, lse_image, doc_ids, image_ids, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attn_torch_setup(ctx, inputs, output) -> None:
    q, k, v, doc_ids, image_ids, causal, scale = inputs
    ctx.save_for_backward(q, k, v, *output, doc_ids, image_ids)
    ctx.args = (causal, scale)


def _attn_torch_backward(ctx, grad_out, _grad_lse_text, _grad_lse_image):
    q, k, v, out, lse_text, lse_image, doc_ids, image_ids = ctx.saved_tensors
    dq, dk, dv = attention_torch_bwd(grad_out, q, k, v, out, lse_text, lse_image, doc_ids, image_ids, *ctx.args)
    return dq, dk, dv, None, None, None, None


attention_torch_fwd.register_autograd(_attn_torch_backward, setup_context=_attn_torch_setup)


def attention_torch_op(q: Tensor, k: Tensor, v: Tensor, doc_ids: Optional[Tensor], image_ids: Optional[Tensor],
                       causal: bool, scale: float) -> Tensor:
    return attention_torch_fwd(q, k, v, doc_ids, image_ids, causal, scale)[0]
