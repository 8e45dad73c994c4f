"""The contrastive half of the LCL loss, chunked: memory linear in the global batch, ragged ranks.

Per rank, with this rank's pairs ``I, T [n, d]``, every rank's pairs ``I_all, T_all [M, d]``
(rank order; this rank's rows start at ``offset``) and the exponentiated scale ``s``::

    loss = ½·[CE(s·I·T_allᵀ, y) + CE(s·T·I_allᵀ, y)],   y_i = offset + i
         = Σ_i [(lse_i2t(i) − s·x_i2t(i, y_i)) + (lse_t2i(i) − s·x_t2i(i, y_i))] / (2n)

with each label logit taken from the very arithmetic its logsumexp used, so that a saturated
pair (late training, ``s = 100``) contributes exactly 0, as in the reference's log-softmax.

Implementations (``impl``):

- ``"reference"``: the published code's strategy (two full ``[n × M]`` float32 logits matrices,
  other ranks padded to the largest count and masked with ``-inf``). The benchmarks' baseline.
- ``"torch"``: forward over row chunks (logsumexp per row; on one process the same chunk also
  gives the column logsumexps, i.e. the other direction: one matmul for both); backward over
  column chunks: ``G = softmax − one-hot`` of the chunk (summed over both directions when
  symmetric), ``dA += G·B_chunk`` (float32, in place), ``dB_chunk = Gᵀ·A``; the scale's
  gradient ``Σ G·X = ⟨A, G·B⟩`` falls out of ``dA``. One matmul for the forward and three for
  the backward on one process (the reference needs two and four), none of them over padding.
  Memory: at most two logits chunks (``2²¹`` elements each on the CPU) plus ``O((n + M)·d)``.
  Computes in ``promote(dtype, float32)``.
- ``"triton"``: the same algorithm with the tiles in :mod:`lcl_fast.kernels.contrastive` (online
  logsumexp, logit-gradient chunks in the input dtype; the GEMMs on ``G`` go to cuBLAS).

Distributed (an initialised process group of size > 1): :func:`gather_ragged` gathers the counts,
then ``[I | T]`` padded to the largest count *for the collective only*; the padding is sliced
off before any matmul. With ``gather_with_grad`` the gather's backward sums every rank's
gradient (``torch.distributed.nn`` semantics), so each rank's features receive the gradient of
the sum of all ranks' losses, as in the reference. Without it, the gathered side is detached —
on one process too, like the reference, which detaches ``all_*`` unconditionally.

Limits: a rank with no pairs returns a zero loss that still takes part in the backward's
collectives. The Triton path needs float32/float16/bfloat16 (float64 falls back to ``"torch"``
under ``impl="auto"``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from lcl_fast._impl import resolve_impl
from lcl_fast.ops.library import empty

__all__ = ["contrastive_loss", "gather_ragged"]

# Logits elements of one chunk of the torch path: 8 MiB of float32 on the CPU (a step keeps at most
# two such buffers alive; big enough that the chunked GEMMs run near full speed), 64 MiB elsewhere.
_TORCH_CHUNK_ELEMENTS = {"cpu": 1 << 21}
_TORCH_CHUNK_ELEMENTS_DEFAULT = 1 << 24
# Elements of the float32 temporaries that widen 16-bit products (64 MiB).
_WIDE_TEMP_ELEMENTS = 1 << 24
# Bytes of one logit-gradient chunk on the Triton path (128 MiB: 1024 columns at n = 64k, bf16).
_TRITON_CHUNK_BYTES = 1 << 27


# --------------------------------------------------------------------------------------------
# distributed gather

def _world_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _gather_counts(n: int, device: torch.device, group) -> list[int]:
    """Every rank's row count ``n`` (a host int: a shape). NCCL gathers device tensors: the count goes
    there without a wait, and the gathered counts come back in one read (with several ranks on GPUs,
    the step's one host sync besides its non-finite check); gloo gathers them in host memory."""
    mine = torch.tensor([n], dtype=torch.int64)
    if "nccl" in str(dist.get_backend(group)):
        mine = mine.to(device, non_blocking=True)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return torch.cat(parts).tolist()


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])


class _AllGather(torch.autograd.Function):
    """``[world, *x.shape]`` from equal-shaped ``x`` of every rank; backward: this rank's slice of
    the gradients summed over ranks (reduce-scatter; all-reduce where the backend lacks it)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = x.new_empty(dist.get_world_size(group), *x.shape)
        dist.all_gather(list(out.unbind(0)), x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        if grad.is_cuda and "nccl" in str(dist.get_backend(ctx.group)):
            mine = grad.new_empty(grad.shape[1:])
            dist.reduce_scatter_tensor(mine, grad, group=ctx.group)
        else:  # gloo has no reduce-scatter
            dist.all_reduce(grad, group=ctx.group)
            mine = grad[dist.get_rank(ctx.group)]
        return mine, None


def gather_ragged(x: Tensor, group=None, with_grad: bool = True) -> tuple[Tensor, list[int], int]:
    """Every rank's rows of ``x [n_r, ...]``, concatenated in rank order, from ranks of unequal ``n_r``.

    Returns ``(all_x [Σ n_r, ...], counts, offset)`` where ``offset`` is where this rank's rows
    start. The counts are gathered first; the rows travel padded to the largest count and are
    sliced back, so ``all_x`` holds no padding. With ``with_grad`` the backward sums the
    gradients all ranks computed for this rank's rows (``torch.distributed.nn.all_gather``
    semantics); otherwise ``all_x`` is detached. Every rank must call it, ranks with ``n_r = 0``
    included.
    """
    counts = _gather_counts(x.shape[0], x.device, group)
    offset = sum(counts[: dist.get_rank(group)])
    widest = max(counts)
    if widest == 0:
        return (x if with_grad else x.detach()), counts, offset
    padded = _pad_rows(x if with_grad else x.detach(), widest)
    parts = _AllGather.apply(padded, group)
    return torch.cat([part[:count] for part, count in zip(parts, counts)]), counts, offset


# --------------------------------------------------------------------------------------------
# tiles: the two implementations of "row logsumexp" and "logit-gradient chunk"

def _chunk_len(chunk_size: int | None, default: int) -> int:
    return max(1, default if chunk_size is None else chunk_size)


class _Stats(NamedTuple):
    """Per-row statistics of one direction's logits (natural log units on the torch path)."""

    row: Tensor  # logsumexp of each row
    col: Tensor | None  # symmetric: logsumexp of each column (the other direction's rows)
    label: Tensor  # each row's logit at its label, exactly as the logsumexp saw it

    def label_excess(self) -> Tensor:
        """``Σ (lse − label)`` over the rows (and the columns when symmetric)."""
        total = (self.row - self.label).sum()
        return total if self.col is None else total + (self.col - self.label).sum()


def _label_diagonal(x: Tensor, row_start: int, col_start: int, label_offset: int) -> tuple[int, int, Tensor]:
    """Label entries ``(i, i + label_offset)`` of a block ``x`` of rows ``row_start…``, columns
    ``col_start…``: ``(first, last, view)``, the view holding those of rows ``[first, last)``."""
    first = max(row_start, col_start - label_offset)
    last = max(first, min(row_start + x.shape[0], col_start + x.shape[1] - label_offset))
    block = x[first - row_start:last - row_start]
    return first, last, block.diagonal(first + label_offset - col_start)


def _logsumexp(x: Tensor, dim: int, *, overwrite: bool) -> Tensor:
    """``logsumexp`` with one temporary at most: ``overwrite`` puts the exponentials into ``x``."""
    top = x.amax(dim=dim, keepdim=True)
    exps = x.sub_(top) if overwrite else torch.sub(x, top)
    return exps.exp_().sum(dim=dim).log_().add_(top.squeeze(dim))


class _TorchTiles:
    """Chunks of plain torch ops in ``promote(dtype, float32)``, updated in place where possible."""

    log_unit = 1.0  # statistics in natural log units
    computes_ds = False  # Σ G·X comes from the products instead: Σ_ij G_ij·(a_i·b_j) = ⟨A, G·B⟩

    @staticmethod
    def acc_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.promote_types(dtype, torch.float32)

    @staticmethod
    def operand(x: Tensor) -> Tensor:
        return x.to(_TorchTiles.acc_dtype(x.dtype))

    @staticmethod
    def _elements(device: torch.device) -> int:
        return _TORCH_CHUNK_ELEMENTS.get(device.type, _TORCH_CHUNK_ELEMENTS_DEFAULT)

    @staticmethod
    def lse(a: Tensor, b: Tensor, scale: Tensor, symmetric: bool, label_offset: int,
            chunk_size: int | None) -> _Stats:
        n, m = a.shape[0], b.shape[0]
        rows = _chunk_len(chunk_size, _TorchTiles._elements(a.device) // max(m, 1))
        lse_row, label = a.new_empty(n), a.new_zeros(n)
        lse_col = a.new_full((m,), float("-inf")) if symmetric else None
        for r0 in range(0, n, rows):
            logits = torch.mm(a[r0:r0 + rows] * scale, b.T)  # scaling the thin operand: d, not m, per row
            first, last, on_label = _label_diagonal(logits, r0, 0, label_offset)
            label[first:last] = on_label
            lse_row[r0:r0 + rows] = _logsumexp(logits, dim=1, overwrite=not symmetric)
            if symmetric:  # the same logits, read by columns: the other direction, no second matmul
                torch.logaddexp(lse_col, _logsumexp(logits, dim=0, overwrite=True), out=lse_col)
        return _Stats(lse_row, lse_col, label)

    @staticmethod
    def cols_per_chunk(a: Tensor, chunk_size: int | None) -> int:
        return _chunk_len(chunk_size, _TorchTiles._elements(a.device) // max(a.shape[0], 1))

    @staticmethod
    def grad_logits(a: Tensor, b: Tensor, stats: _Stats, scale: Tensor, col_start: int, col_end: int,
                    label_offset: int) -> tuple[Tensor, None]:
        g = torch.mm(a, (b[col_start:col_end] * scale).T)  # the logits, turned into G in place
        # the forward's label logits: a confident pair (P_ii → 1) then gives G_ii → 0 exactly
        first, last, on_label = _label_diagonal(g, 0, col_start, label_offset)
        on_label.copy_(stats.label[first:last])
        if stats.col is None:
            g.sub_(stats.row[:, None]).exp_()
        else:
            # P + Qᵀ over quarters of the rows: the second exponential needs a quarter buffer only
            rows = -(-g.shape[0] // 4)
            for r0 in range(0, g.shape[0], rows):
                block = g[r0:r0 + rows]
                p = torch.sub(block, stats.row[r0:r0 + rows, None]).exp_()
                block.sub_(stats.col[None, col_start:col_end]).exp_().add_(p)
        on_label.sub_(1.0 if stats.col is None else 2.0)
        return g, None


class _TritonTiles:
    """The Triton kernels; operands stay in their dtype, statistics and accumulators in float32."""

    log_unit = math.log(2.0)  # the kernels' statistics are in log2 units
    computes_ds = True  # in float32 inside the kernel, before G is rounded to the input dtype

    @staticmethod
    def acc_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float32

    @staticmethod
    def operand(x: Tensor) -> Tensor:
        return x

    @staticmethod
    def lse(a: Tensor, b: Tensor, scale: Tensor, symmetric: bool, label_offset: int,
            chunk_size: int | None) -> _Stats:
        """``kernels.LseStats``: the same fields as :class:`_Stats`, in log2 units."""
        from lcl_fast.kernels import contrastive as kernels

        return kernels.lse(a, b, scale, symmetric=symmetric, label_offset=label_offset)

    @staticmethod
    def cols_per_chunk(a: Tensor, chunk_size: int | None) -> int:
        from lcl_fast.kernels import contrastive as kernels

        block_n = kernels.blocks_for(a.dtype, device=a.device, dim=a.shape[1]).block_n
        if chunk_size is not None:
            # Whole column tiles: the backward's tiles must be the forward's bit for bit (a tile's
            # products may round differently at another offset, which would cost a confident pair its
            # exact G_ii = 0, see kernels/contrastive.py).
            return -(-_chunk_len(chunk_size, 1) // block_n) * block_n
        cols = _TRITON_CHUNK_BYTES // max(a.shape[0] * a.element_size(), 1)
        return max(block_n, cols // block_n * block_n)

    @staticmethod
    def grad_logits(a: Tensor, b: Tensor, stats: _Stats, scale: Tensor, col_start: int, col_end: int,
                    label_offset: int) -> tuple[Tensor, Tensor]:
        from lcl_fast.kernels import contrastive as kernels

        return kernels.grad_logits(a, b, stats, scale, col_start, col_end, label_offset)


_TILES = {"torch": _TorchTiles, "triton": _TritonTiles}


@functools.cache
def _mm_has_out_dtype(device_type: str) -> bool:
    """Whether ``torch.mm(..., out_dtype=float32)`` works for 16-bit operands on this device type."""
    probe = torch.ones(16, 16, dtype=torch.bfloat16, device=device_type)
    try:
        return torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _mm_wide(x: Tensor, y: Tensor) -> Tensor:
    """``x @ y`` in at least float32 (16-bit operands: float32 output of the GEMM where supported)."""
    if x.dtype in (torch.float32, torch.float64):
        return torch.mm(x, y)
    if _mm_has_out_dtype(x.device.type):
        return torch.mm(x, y, out_dtype=torch.float32)
    return torch.mm(x, y).float()


def _accumulate_mm(acc: Tensor, x: Tensor, y: Tensor) -> None:
    """``acc += x @ y`` in ``acc``'s (float32/64) precision, whatever the operands' dtype."""
    if x.dtype == acc.dtype:
        acc.addmm_(x, y)
        return
    rows = max(1, _WIDE_TEMP_ELEMENTS // max(acc.shape[1], 1))  # bounds the float32 product's size
    for r0 in range(0, acc.shape[0], rows):
        acc[r0:r0 + rows] += _mm_wide(x[r0:r0 + rows], y)


def _grad_problem(tiles, a: Tensor, b: Tensor, stats: _Stats, scale: Tensor, label_offset: int,
                  coef: Tensor, need_a: bool, need_b: bool, need_ds: bool, chunk_size: int | None,
                  out_dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """Gradients of one direction (both when symmetric) over column chunks of ``b``: dA, dB, Σ G·X."""
    (n, d), m = a.shape, b.shape[0]
    ds = torch.zeros((), device=a.device, dtype=coef.dtype)
    track_a = need_a or (need_ds and not tiles.computes_ds)
    if not (track_a or need_b or need_ds):
        return None, None, ds
    acc_a = torch.zeros(n, d, device=a.device, dtype=coef.dtype) if track_a else None
    grad_b = torch.empty(m, d, device=b.device, dtype=out_dtype) if need_b else None
    step = tiles.cols_per_chunk(a, chunk_size)
    for c0 in range(0, m, step):
        c1 = min(m, c0 + step)
        g, ds_chunk = tiles.grad_logits(a, b, stats, scale, c0, c1, label_offset)
        if tiles.computes_ds:
            ds += ds_chunk
        if track_a:
            _accumulate_mm(acc_a, g, b[c0:c1])
        if need_b:
            grad_b[c0:c1] = _mm_wide(g.T, a).mul_(coef)
        del g
    if not tiles.computes_ds:
        ds = torch.vdot(a.reshape(-1), acc_a.reshape(-1))
    grad_a = acc_a.mul_(coef).to(out_dtype) if need_a else None
    return grad_a, grad_b, ds


# --------------------------------------------------------------------------------------------
# autograd Function

@dataclasses.dataclass(frozen=True)
class _Options:
    impl: str  # "torch" | "triton"
    symmetric: bool  # columns are this process's own pairs: one matmul serves both directions
    label_offset: int  # column of row 0's own pair among the gathered columns
    chunk_size: int | None


class _ContrastiveLoss:
    """Loss of rows ``(image, text)`` against columns ``(image_cols, text_cols)``.

    Symmetric (``image_cols``/``text_cols`` None): the columns are ``image``/``text`` themselves
    and the gradients of both roles go to them. Runs the custom op ``lcl_fast::contrastive_fwd``
    (:mod:`lcl_fast.ops.library`), so ``torch.compile`` keeps it in the graph.
    """

    @staticmethod
    def apply(image: Tensor, text: Tensor, image_cols: Tensor | None, text_cols: Tensor | None,
              scale: Tensor, opts: _Options) -> Tensor:
        if not opts.symmetric and image_cols is None:
            raise ValueError("non-symmetric contrastive loss needs the gathered columns")
        return contrastive_op(image, text, image_cols, text_cols, scale, opts.impl, opts.label_offset,
                              opts.chunk_size)


# --------------------------------------------------------------------------------------------
# reference path

def _reference_loss(image: Tensor, text: Tensor, scale: Tensor | float, group,
                    gather_with_grad: bool) -> Tensor:
    """The published code's computation: full float32 logits, ranks padded to the largest count."""
    n = image.shape[0]
    all_image, all_text = image, text
    padding = torch.zeros(n, device=image.device)
    if _world_size(group) > 1:
        widest = max(_gather_counts(n, image.device, group))
        if widest > 0:
            image, text = _pad_rows(image, widest), _pad_rows(text, widest)
            padding = torch.cat([padding, padding.new_ones(widest - n)])
            rank = dist.get_rank(group)

            def local_first(x: Tensor) -> Tensor:
                parts = _AllGather.apply(x, group)
                return torch.cat([x, *parts[:rank], *parts[rank + 1:]])

            all_image, all_text = local_first(image), local_first(text)
            padding = local_first(padding)
            image, text = image[:n], text[:n]
    if not gather_with_grad:
        all_image, all_text = all_image.detach(), all_text.detach()
    with torch.autocast(image.device.type, enabled=False):
        mask = padding.bool()
        logits_i2t = (scale * (image.float() @ all_text.float().t())).masked_fill(mask, float("-inf"))
        logits_t2i = (scale * (text.float() @ all_image.float().t())).masked_fill(mask, float("-inf"))
        if n == 0:
            return (logits_i2t.sum() + logits_t2i.sum()) * 0.0  # keeps the gather in the graph
        labels = torch.arange(n, device=image.device)
        return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


# --------------------------------------------------------------------------------------------
# functional entry

def _check_features(image: Tensor, text: Tensor) -> None:
    if image.dim() != 2 or text.dim() != 2 or image.shape != text.shape:
        raise ValueError(
            "image_features and text_features must both be [n, d] with the same n and d, got "
            f"{tuple(image.shape)} and {tuple(text.shape)}")
    if image.dtype != text.dtype or image.device != text.device:
        raise ValueError(f"image/text features differ in dtype or device: {image.dtype} on {image.device} "
                         f"vs {text.dtype} on {text.device}")
    if not image.is_floating_point():
        raise ValueError(f"features must be floating point, got {image.dtype}")


def _scale_tensor(logit_scale: Tensor | float, like: Tensor) -> Tensor:
    if isinstance(logit_scale, Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must hold one value, got shape {tuple(logit_scale.shape)}")
        return logit_scale
    return torch.tensor(float(logit_scale), device=like.device, dtype=torch.float32)


def contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float, *,
                     impl: str = "auto", chunk_size: int | None = None, group=None,
                     gather_with_grad: bool = True) -> Tensor:
    """This rank's contrastive loss ``½·[CE(s·I·T_allᵀ) + CE(s·T·I_allᵀ)]`` (weight 1), 0-dim.

    ``image_features``, ``text_features``: ``[n, d]`` pairs of this rank (``n`` may be 0 and may
    differ between ranks). ``logit_scale``: the already exponentiated scale (float or one-value
    tensor; differentiable). ``group``: process group of the gather (default: the world when one
    is initialised; none or world size 1 gives the single-process loss). ``chunk_size``: rows
    (forward) / columns (backward) of logits per step of the lean paths (default: from a memory
    budget). ``gather_with_grad``: as the reference's flag (see the module docstring).
    The loss is float32 (float64 for float64 features on the torch path). With no pairs (``n = 0``)
    it is 0 with zero gradients for every ``impl``, where the reference's mean over nothing is NaN
    (see :class:`lcl_fast.LCLLoss` for why).
    """
    _check_features(image_features, text_features)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    scale = _scale_tensor(logit_scale, image_features)
    requested = impl
    impl = resolve_impl(impl, image_features, text_features)
    if impl == "triton" and image_features.dtype == torch.float64:
        if requested != "auto":
            raise ValueError("impl='triton' supports float32, float16 and bfloat16 features, got float64")
        impl = "torch"
    distributed = _world_size(group) > 1
    if impl == "reference":
        return _reference_loss(image_features, text_features, logit_scale, group, gather_with_grad)
    if distributed:
        d = image_features.shape[1]
        pairs = torch.cat([image_features, text_features], dim=1)
        all_pairs, _, offset = gather_ragged(pairs, group, with_grad=gather_with_grad)
        opts = _Options(impl, symmetric=False, label_offset=offset, chunk_size=chunk_size)
        return _ContrastiveLoss.apply(image_features, text_features, all_pairs[:, :d], all_pairs[:, d:],
                                      scale, opts)
    if gather_with_grad:
        opts = _Options(impl, symmetric=True, label_offset=0, chunk_size=chunk_size)
        return _ContrastiveLoss.apply(image_features, text_features, None, None, scale, opts)
    opts = _Options(impl, symmetric=False, label_offset=0, chunk_size=chunk_size)
    return _ContrastiveLoss.apply(image_features, text_features, image_features.detach(),
                                  text_features.detach(), scale, opts)

# ============================================================================ custom ops
# Registered at import (namespace lcl_fast; see lcl_fast.ops.library): torch.compile keeps each one whole.

def _stats_rows(symmetric: bool) -> int:
    return 3 if symmetric else 4


def _stack_stats(fields: list[Tensor]) -> Tensor:
    """``[R, n, 2]`` from statistics ``[n]`` (slot 0) or ``[n, 2]`` (Triton's (max, log2 sum) pairs)."""
    return torch.stack([f if f.dim() == 2 else torch.stack([f, torch.zeros_like(f)], dim=1) for f in fields])


def _unstack_stats(stats: Tensor, impl: str, row: int, col: Optional[int], label: int) -> _Stats:
    def lse(i: int) -> Tensor:
        return stats[i] if impl == "triton" else stats[i][:, 0]

    return _Stats(lse(row), None if col is None else lse(col), stats[label][:, 0])


@torch.library.custom_op("lcl_fast::contrastive_fwd", mutates_args=())
def contrastive_fwd(
    image: Tensor, text: Tensor, image_cols: Optional[Tensor], text_cols: Optional[Tensor], scale: Tensor,
    impl: str, label_offset: int, chunk_size: Optional[int],
) -> tuple[Tensor, Tensor]:
    """(loss 0-dim, stats ``[3|4, n]``) of rows ``image, text [n, d]`` against the columns
    (``image_cols``/``text_cols [m, d]``; None: symmetric, the rows themselves)."""
    tiles = _TILES[impl]
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
    acc = _TILES[impl].acc_dtype(image.dtype)
    stats = image.new_empty(_stats_rows(image_cols is None), image.shape[0], 2, dtype=acc)
    return image.new_empty((), dtype=acc), stats


@torch.library.custom_op("lcl_fast::contrastive_bwd", mutates_args=())
def contrastive_bwd(
    grad: Tensor, image: Tensor, text: Tensor, image_cols: Optional[Tensor], text_cols: Optional[Tensor],
    scale: Tensor, stats: Tensor, impl: str, label_offset: int, chunk_size: Optional[int],
    need_image: bool, need_text: bool, need_image_cols: bool, need_text_cols: bool, need_scale: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of image, text, image_cols, text_cols, scale (empty ``[0]`` where not needed)."""
    tiles = _TILES[impl]
    n = image.shape[0]
    symmetric = image_cols is None
    need = (need_image, need_text, need_image_cols and not symmetric, need_text_cols and not symmetric, need_scale)
    inputs = (image, text, image_cols, text_cols, scale)
    if n == 0:  # zeros still reach the gathered columns: their backward is a collective
        return tuple(torch.zeros_like(t) if t is not None and nd else empty(image) for t, nd in zip(inputs, need))
    acc = tiles.acc_dtype(image.dtype)
    with torch.autocast(image.device.type, enabled=False):
        s = scale.detach().to(device=image.device, dtype=acc)
        coef = grad.to(acc) * s / (2 * n)
        rows_i, rows_t = tiles.operand(image), tiles.operand(text)
        if symmetric:
            st = _unstack_stats(stats, impl, 0, 1, 2)
            gi, gt, ds = _grad_problem(tiles, rows_i, rows_t, st, s, 0, coef, need[0], need[1], need[4],
                                         chunk_size, image.dtype)
            gic = gtc = None
        else:
            st_i, st_t = _unstack_stats(stats, impl, 0, None, 1), _unstack_stats(stats, impl, 2, None, 3)
            gi, gtc, ds_i = _grad_problem(tiles, rows_i, tiles.operand(text_cols), st_i, s, label_offset, coef,
                                            need[0], need[3], need[4], chunk_size, image.dtype)
            gt, gic, ds_t = _grad_problem(tiles, rows_t, tiles.operand(image_cols), st_t, s, label_offset, coef,
                                            need[1], need[2], need[4], chunk_size, image.dtype)
            ds = ds_i + ds_t
        gs = None
        if need[4]:
            gs = (grad.to(acc) * ds / (2 * n)).to(scale.device, scale.dtype).reshape(scale.shape)
    grads = (gi, gt, gic, gtc, gs)
    return tuple(g if g is not None else empty(image) for g in grads)


@contrastive_bwd.register_fake
def _(grad, image, text, image_cols, text_cols, scale, stats, impl, label_offset, chunk_size,
      need_image, need_text, need_image_cols, need_text_cols, need_scale):
    symmetric = image_cols is None
    need = (need_image, need_text, need_image_cols and not symmetric, need_text_cols and not symmetric, need_scale)
    inputs = (image, text, image_cols, text_cols, scale)
    return tuple(torch.empty_like(t) if nd else empty(image) for t, nd in zip(inputs, need))


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
