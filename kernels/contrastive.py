"""Triton kernels of the chunked contrastive loss: row logsumexp and logit gradients of ``s·A·Bᵀ``.

Algorithm
    ``lse``: one program per block of ``BLOCK_M`` rows of ``A [n, d]`` sweeps the columns of
    ``B [m, d]`` in tiles of ``BLOCK_N``; each tile ``X = A_blk·B_tileᵀ`` is accumulated in
    float32 over ``d`` in steps of ``BLOCK_K`` and folded into a running (max, sum) per row in
    base 2 (``exp2`` of logits pre-scaled by ``s·log2 e``). With ``symmetric=True`` (``A`` = images,
    ``B`` = texts of the same pairs) the same tile also yields each column's logsumexp over the
    block's rows, written as one float per (row block, column) and reduced afterwards: one matmul
    gives both directions of the loss. When the row blocks alone cannot fill the GPU (a rank's few
    local rows against the global batch) the columns are split too and the splits' partial
    logsumexps merged (flash-decoding style).
    Each logsumexp is kept as two floats, the running max (a logit of the tile, bit for bit) and
    ``log2`` of the sum below it: at ``s = 100`` a logsumexp is ~144 in log2 units, whose float32
    ulp (1.5e-5) would otherwise cap the precision of ``P = 2^(s2 − lse)`` near 1, and with it of the
    small gradients of confident pairs; ``s2 − max`` is exact and the log-sum keeps full precision.

    ``_label_logits_kernel`` recomputes, from the same tiles, each row's logit at its label
    column ``row + label_offset`` (the loss is ``Σ (lse − label)``): bit-identical to what the
    logsumexp saw, so a saturated pair contributes exactly 0 as in the reference.

    ``grad_logits``: recomputes the tiles of one chunk of columns ``[col_start, col_end)`` and
    writes the gradient of the loss with respect to the logits, up to the factor ``s·g/(2n)``:
    ``G = P − δ`` (``P = exp(s·X − lse_row)``, ``δ`` = 1 at each row's label column), or
    ``G = P + exp(s·X − lse_col) − 2δ`` when symmetric. The tiles are the forward's bit for bit
    (same blocks, same K order) and the one-hot is subtracted in float32 before ``G`` is rounded
    to the input dtype: a confident pair (``P_ii → 1``, late in training at ``s = 100``) gives
    ``G_ii → 0`` as in the reference, not an ulp of the logit times ``s``. Each tile also writes
    ``Σ G·X``, the logit-scale gradient.
    ``dA = G·B_chunk`` (accumulated over chunks in float32) and ``dB_chunk = Gᵀ·A`` are then two
    cuBLAS GEMMs over the chunk (see :mod:`lcl_fast.ops.contrastive`). Why not the two fused
    passes of FlashAttention (dA per row block, dB per column block, in registers)? At d = 768 a
    ``[BLOCK_M, d]`` float32 accumulator does not fit in registers at any ``BLOCK_M`` that keeps
    the tensor cores busy (128 × 768 × 4 B = 384 KiB), so each pass would have to split ``d`` and
    recompute every tile once per slice of ``d``. Here each tile is recomputed once per backward:
    3 GEMM-equivalents instead of 4 or more, without atomics and without a read-modify-write of
    the gradients per tile; the price is writing and reading ``G`` once per chunk (memory-bound
    only for small ``d``).

Memory
    ``lse``: no logits beyond one ``BLOCK_M × BLOCK_N`` tile per program, in registers; it writes
    ``8·n·(splits + 1)`` bytes of statistics (+ ``8·⌈n/BLOCK_M⌉·m`` for the symmetric column
    partials: 256 MiB at n = m = 64k). ``grad_logits``: the chunk ``G [n, col_end − col_start]``
    in the input dtype (the caller picks the chunk: 128 MiB by default).

Limits
    Inputs float32, float16 or bfloat16 with unit stride along ``d`` (any row stride). Float32 dots
    follow ``torch.get_float32_matmul_precision()``: ``"highest"`` → exact (``ieee``, slow), else
    ``tf32``. The GPU targets are for bfloat16.
    Under ``TRITON_INTERPRET=1`` (CPU) ``tl.dot`` on bfloat16 is wrong in Triton 3.9: interpreter
    runs use float32/float16. Block sizes are chosen per dtype and device target by
    :func:`lcl_fast.kernels.tiles.contrastive_tile` (no autotuning: the pair count changes every
    step with interleaved data); ``LCL_FAST_CONTRASTIVE_BLOCKS="BM,BN,BK,warps,stages"``
    overrides them for tuning.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from lcl_fast.kernels import tiles

from lcl_fast._impl import triton_interpreter

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _tile_logits(a_rows, b_cols, row_ok, col_ok, d,
                 EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Unscaled float32 tile ``A[rows]·B[cols]ᵀ``; ``a_rows [BM, 1]``, ``b_cols [1, BN]``: row pointers."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start_k in range(0, d, BLOCK_K):
        k = start_k + ks
        if EVEN_K:
            a = tl.load(a_rows + k[None, :], mask=row_ok[:, None], other=0.0)
            bt = tl.load(b_cols + k[:, None], mask=col_ok[None, :], other=0.0)
        else:
            k_ok = k < d
            a = tl.load(a_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            bt = tl.load(b_cols + k[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, bt, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _lse_kernel(
    a_ptr, b_ptr, lse_ptr, colp_ptr, scale_ptr,
    n, m, d, cols_per_split, stride_a, stride_b, stride_part, stride_colp,
    SYMMETRIC: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # program (row block, split) sweeps the split's columns [col_lo, col_hi); everything in log2 units
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    col_lo = pid_s * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, m)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_a
    scale2 = tl.load(scale_ptr).to(tl.float32) * LOG2E
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(col_lo, col_hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < col_hi
        b_cols = b_ptr + cols.to(tl.int64)[None, :] * stride_b
        x = _tile_logits(a_rows, b_cols, row_ok, col_ok, d, EVEN_K, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        s2 = tl.where(col_ok[None, :], x * scale2, float("-inf"))
        # every tile holds at least one real column, so new_max is finite
        new_max = tl.maximum(row_max, tl.max(s2, axis=1))
        row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(tl.exp2(s2 - new_max[:, None]), axis=1)
        row_max = new_max
        if SYMMETRIC:
            s2c = tl.where(row_ok[:, None], s2, float("-inf"))
            col_max = tl.where(col_ok, tl.max(s2c, axis=0), 0.0)
            col_sum = tl.where(col_ok, tl.sum(tl.exp2(s2c - col_max[None, :]), axis=0), 1.0)
            colp_row = colp_ptr + pid_m.to(tl.int64) * stride_colp + 2 * cols
            tl.store(colp_row, col_max, mask=col_ok)
            tl.store(colp_row + 1, tl.log2(col_sum), mask=col_ok)
    # (max, log2 of the sum below it) per row: see "Algorithm" for why not their sum
    lse_row = lse_ptr + pid_s * stride_part + 2 * rows
    tl.store(lse_row, row_max, mask=row_ok)
    tl.store(lse_row + 1, tl.log2(row_sum), mask=row_ok)


@triton.jit
def _label_logits_kernel(
    a_ptr, b_ptr, label_ptr, scale_ptr, n, m, d, label_offset, stride_a, stride_b,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Each row's logit at its label column, from the very tiles (same alignment, blocks and
    # arithmetic) that _lse_kernel folds into its logsumexp, so lse − label is exactly 0 for a
    # saturated pair. Only the one or two column tiles holding the block's labels are computed.
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    labels = rows + label_offset
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_a
    scale2 = tl.load(scale_ptr).to(tl.float32) * LOG2E
    first = tl.maximum(pid_m * BLOCK_M + label_offset, 0)
    last = tl.minimum(pid_m * BLOCK_M + BLOCK_M + label_offset, m)
    label = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(first // BLOCK_N * BLOCK_N, last, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < m
        b_cols = b_ptr + cols.to(tl.int64)[None, :] * stride_b
        x = _tile_logits(a_rows, b_cols, row_ok, col_ok, d, EVEN_K, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        label += tl.sum(tl.where(cols[None, :] == labels[:, None], x * scale2, 0.0), axis=1)
    tl.store(label_ptr + rows, label, mask=row_ok)


@triton.jit
def _grad_logits_kernel(
    a_ptr, b_ptr, lse_row_ptr, lse_col_ptr, g_ptr, ds_ptr, scale_ptr,
    n, col_start, col_end, d, label_offset, stride_a, stride_b, stride_g,
    SYMMETRIC: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # column tiles vary fastest: concurrent programs share a row block of A through L2,
    # and the whole column chunk of B stays resident
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col_start + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    col_ok = cols < col_end
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_a
    b_cols = b_ptr + cols.to(tl.int64)[None, :] * stride_b
    x = _tile_logits(a_rows, b_cols, row_ok, col_ok, d, EVEN_K, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    # the same blocks and arithmetic as _lse_kernel: these are the forward's logits, bit for bit
    s2 = x * (tl.load(scale_ptr).to(tl.float32) * LOG2E)
    is_label = cols[None, :] == (rows + label_offset)[:, None]
    # statistics are (max, log2 sum) pairs; outside the matrix max = +inf: those exponentials are 0
    row_max = tl.load(lse_row_ptr + 2 * rows, mask=row_ok, other=float("inf"))
    row_log = tl.load(lse_row_ptr + 2 * rows + 1, mask=row_ok, other=0.0)
    g = tl.exp2((s2 - row_max[:, None]) - row_log[:, None])
    if SYMMETRIC:
        col_max = tl.load(lse_col_ptr + 2 * cols, mask=col_ok, other=float("inf"))
        col_log = tl.load(lse_col_ptr + 2 * cols + 1, mask=col_ok, other=0.0)
        g += tl.exp2((s2 - col_max[None, :]) - col_log[None, :])
        g -= tl.where(is_label, 2.0, 0.0)
    else:
        g -= tl.where(is_label, 1.0, 0.0)
    ok = row_ok[:, None] & col_ok[None, :]
    g = tl.where(ok, g, 0.0)
    tl.store(ds_ptr + pid_m * tl.num_programs(0) + pid_n, tl.sum(tl.sum(g * x, axis=1), axis=0))
    g_ptrs = g_ptr + rows.to(tl.int64)[:, None] * stride_g + (cols - col_start)[None, :]
    tl.store(g_ptrs, g.to(g_ptr.dtype.element_ty), mask=ok)


Blocks = tiles.GemmTile  # (block_m, block_n, block_k, num_warps, num_stages)


def blocks_for(dtype: torch.dtype, *, device: torch.device | None = None, dim: int | None = None) -> Blocks:
    """Tile sizes for ``dtype`` on ``device`` (default: the current CUDA device).

    ``LCL_FAST_CONTRASTIVE_BLOCKS`` overrides; else :func:`lcl_fast.kernels.tiles.contrastive_tile`
    for the device's target (``block_n`` is the same on every target: the loss aligns its column
    chunks to it).
    """
    override = os.environ.get("LCL_FAST_CONTRASTIVE_BLOCKS")
    if override:
        values = [int(v) for v in override.split(",")]
        if len(values) != 5:
            raise ValueError(
                f"LCL_FAST_CONTRASTIVE_BLOCKS needs 5 integers BM,BN,BK,warps,stages, got {override!r}")
        return Blocks(*values)
    if triton_interpreter() or not torch.cuda.is_available():
        return Blocks(32, 32, 32, 4, 1)  # small tiles: the CPU interpreter runs each program in Python
    if device is not None and device.type != "cuda":
        raise ValueError(f"the Triton contrastive kernels need CUDA tensors, got {device}")
    target = tiles.device_target(device)
    return tiles.contrastive_tile(target, dtype, dim or 0, _dot_precision(dtype))


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the interpreter: a token count that still exercises the column splits
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dot_precision(dtype: torch.dtype) -> str:
    if triton_interpreter() or dtype != torch.float32:
        return "ieee"  # ignored for 16-bit operands; numpy in the interpreter
    # as torch's own float32 matmuls: exact by default, TF32 once the user allows it
    return tiles.float32_dot_precision()


def _check_operands(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected A [n, d] and B [m, d], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in _SUPPORTED:
        raise ValueError(f"A and B must share a dtype among {_SUPPORTED}, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"A and B must be on one device, got {a.device} and {b.device}")
    if not (a.is_cuda or triton_interpreter()):
        raise ValueError("the Triton contrastive kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 on the CPU)")


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 else x.contiguous()


def _scale_arg(scale: torch.Tensor, device: torch.device) -> torch.Tensor:
    return scale.detach().to(device=device, dtype=torch.float32).reshape(1)


def _launch_options(a: torch.Tensor, blk: Blocks) -> dict:
    """Compile-time options shared by the kernels: equal blocks make their tiles bit-identical."""
    return dict(EVEN_K=a.shape[1] % blk.block_k == 0, DOT_PRECISION=_dot_precision(a.dtype),
                BLOCK_M=blk.block_m, BLOCK_N=blk.block_n, BLOCK_K=blk.block_k,
                num_warps=blk.num_warps, num_stages=blk.num_stages)


class LseStats(NamedTuple):
    """Per-row statistics of ``s·A·Bᵀ`` in log2 units (natural value × log2 e), float32.

    ``row``: each row's logsumexp as ``[n, 2]`` pairs (max, log2 of the sum below it: their sum is
    the logsumexp); ``col``: each column's, ``[m, 2]`` (symmetric only, else None); ``label``: each
    row's logit at its label column ``row + label_offset`` (0 where that is outside ``B``).
    """

    row: torch.Tensor
    col: torch.Tensor | None
    label: torch.Tensor

    def label_excess(self) -> torch.Tensor:
        """``Σ (lse − label)`` over the rows (and the columns when symmetric), the max subtracted first:
        0 exactly for saturated pairs, whose label logit is the max."""
        total = ((self.row[:, 0] - self.label) + self.row[:, 1]).sum()
        if self.col is not None:
            total = total + ((self.col[:, 0] - self.label) + self.col[:, 1]).sum()
        return total


def lse(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, *, symmetric: bool = False,
        label_offset: int = 0) -> LseStats:
    """Logsumexp statistics of ``s·A·Bᵀ`` for ``A [n, d]``, ``B [m, d]`` (see :class:`LseStats`)."""
    _check_operands(a, b)
    a, b = _unit_stride(a), _unit_stride(b)
    (n, d), m = a.shape, b.shape[0]
    if n == 0 or m == 0:
        empty = torch.tensor([float("-inf"), 0.0], device=a.device)
        col = empty.repeat(m, 1) if symmetric else None
        return LseStats(empty.repeat(n, 1), col, torch.zeros(n, device=a.device))
    blk = blocks_for(a.dtype, device=a.device, dim=d)
    grid_m = triton.cdiv(n, blk.block_m)
    # few row blocks (a rank's local rows against the global batch): split the columns too,
    # so that every SM gets work; the splits' partial statistics are merged below
    col_tiles = triton.cdiv(m, blk.block_n)
    splits = min(col_tiles, triton.cdiv(2 * _multiprocessors(a.device), grid_m))
    cols_per_split = triton.cdiv(col_tiles, splits) * blk.block_n
    splits = triton.cdiv(m, cols_per_split)
    lse_part = torch.empty(splits, n, 2, device=a.device, dtype=torch.float32)
    colp = torch.empty(grid_m, m, 2, device=a.device, dtype=torch.float32) if symmetric else lse_part
    label = torch.empty(n, device=a.device, dtype=torch.float32)
    scale = _scale_arg(scale, a.device)
    options = _launch_options(a, blk)
    with tiles.device_guard(a):
        _lse_kernel[(grid_m, splits)](
            a, b, lse_part, colp, scale, n, m, d, cols_per_split, a.stride(0), b.stride(0),
            lse_part.stride(0), colp.stride(0), SYMMETRIC=symmetric, **options)
        _label_logits_kernel[(grid_m,)](
            a, b, label, scale, n, m, d, label_offset, a.stride(0), b.stride(0), **options)
    row = lse_part[0] if splits == 1 else _merge_partials_(lse_part)
    return LseStats(row, _merge_partials_(colp) if symmetric else None, label)


def _merge_partials_(parts: torch.Tensor) -> torch.Tensor:
    """``[k, r, 2]`` partial (max, log2 sum) pairs → ``[r, 2]`` over dim 0, the log-sums in place (the
    column partials reach 256 MiB at n = 64k): the new max is one of the maxes, bit for bit."""
    top = parts[..., 0].amax(dim=0)
    logs = parts[..., 1]
    merged = logs.add_(parts[..., 0] - top).exp2_().sum(dim=0).log2_()
    return torch.stack([top, merged], dim=1)


def grad_logits(a: torch.Tensor, b: torch.Tensor, stats: LseStats, scale: torch.Tensor,
                col_start: int, col_end: int, label_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``G [n, col_end − col_start]`` in A's dtype and ``Σ G·X`` (float32 0-dim) for one column chunk.

    ``G = P − δ`` or, when ``stats.col`` is given (symmetric), ``P + Qᵀ − 2δ``; ``δ`` marks
    column ``row + label_offset``. ``stats`` from :func:`lse` with the same ``label_offset``.
    """
    _check_operands(a, b)
    a, b = _unit_stride(a), _unit_stride(b)
    (n, d), m = a.shape, b.shape[0]
    if not 0 <= col_start <= col_end <= m:
        raise ValueError(f"column chunk [{col_start}, {col_end}) is outside [0, {m})")
    width = col_end - col_start
    g = torch.empty(n, width, device=a.device, dtype=a.dtype)
    if n == 0 or width == 0:
        return g, torch.zeros((), device=a.device)
    blk = blocks_for(a.dtype, device=a.device, dim=d)
    grid = (triton.cdiv(width, blk.block_n), triton.cdiv(n, blk.block_m))
    ds = torch.empty(grid[0] * grid[1], device=a.device, dtype=torch.float32)
    symmetric = stats.col is not None
    with tiles.device_guard(a):
        _grad_logits_kernel[grid](
            a, b, stats.row, stats.col if symmetric else stats.row, g, ds, _scale_arg(scale, a.device),
            n, col_start, col_end, d, label_offset, a.stride(0), b.stride(0), g.stride(0),
            SYMMETRIC=symmetric, **_launch_options(a, blk))
    return g, ds.sum()
