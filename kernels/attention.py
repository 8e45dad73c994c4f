"""Flash attention over packed, interleaved image/text rows, the mask read from token metadata.

Algorithm: FlashAttention-2. The forward streams key/value tiles past a resident query tile
with an online softmax (float32 running max, sum and accumulator) and saves the row
logsumexp (base 2; ``+inf`` for a row that sees no key, so that ``exp2(s - lse) = 0``). The
backward runs a pre-pass for ``delta = rowsum(dO * O)``, then one kernel per key tile for
dK, dV (queries streamed) and one per query tile for dQ (keys streamed): no atomics.

The mask is never materialised. Each token carries int32 metadata (:func:`prepare_metadata`,
``[8, B, L]``, O(B L) work, no host sync): its document id, its image id, the key range
``[kv_lo, kv_hi)`` it may see, the query range ``[q_lo, q_hi)`` that may see it, and the span
of its document when that document is one contiguous run. A program takes the min/max of
these over its tile to bound its loop (causal early stop, documents before its own skipped)
and to split the loop into tiles that need per-element masking (the document edges, the
diagonal, image blocks reaching past it) and tiles fully visible (a plain inner loop, no
mask arithmetic, pipelined). Masked tiles whose id ranges cannot meet are skipped.

Memory: O(B H L) beyond q, k, v, o (the logsumexp and delta, float32). Limits: q, k, v share
one shape ``[B, H, L, D]`` (self-attention), ``D <= 256`` (tuned for 32, 64, 128); float16 /
bfloat16 / float32 (float32 products in IEEE precision: slow, for checks).

Tiles: autotuned on the GPU per (L, head dim, mask flags, dtype) over a few sm_90 candidates;
``LCL_FAST_ATTENTION_AUTOTUNE=0`` uses the first candidate that fits shared memory instead.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from lcl_fast._impl import triton_interpreter

__all__ = ["MaskMetadata", "prepare_metadata", "attention_forward", "attention_backward"]

# rows of the metadata table
_DOC, _IMG, _KV_LO, _KV_HI, _Q_LO, _Q_HI, _SPAN_LO, _SPAN_HI = range(8)


@dataclass(frozen=True)
class MaskMetadata:
    """What the kernels read instead of a mask: ``table`` is int32 ``[8, B, L]`` or None."""

    table: Optional[torch.Tensor]
    causal: bool
    has_doc: bool
    has_img: bool


def _first_last(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token: first and last position of its id in its row, and the id's count (no sync)."""
    batch, length = ids.shape
    sorted_ids, perm = torch.sort(ids, dim=1, stable=True)
    idx = torch.arange(length, device=ids.device).expand(batch, length)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    run_start = torch.where(starts, idx, 0).cummax(dim=1).values
    run_end = torch.where(ends, idx, length - 1).flip(1).cummin(dim=1).values.flip(1)
    # a stable sort keeps positions increasing inside a run: its ends are the min and max
    first = torch.empty_like(perm).scatter_(1, perm, perm.gather(1, run_start))
    last = torch.empty_like(perm).scatter_(1, perm, perm.gather(1, run_end))
    count = torch.empty_like(perm).scatter_(1, perm, run_end - run_start + 1)
    return first, last, count


def prepare_metadata(
    doc_ids: Optional[torch.Tensor], image_ids: Optional[torch.Tensor], causal: bool, length: int
) -> MaskMetadata:
    """Per-token visibility bounds for the kernels; ``table`` is None for plain attention."""
    has_doc = doc_ids is not None
    has_img = image_ids is not None and causal  # without causality an image block adds nothing
    if not has_doc and not has_img:
        return MaskMetadata(None, causal, False, False)
    ref = doc_ids if has_doc else image_ids
    batch = ref.shape[0]
    device = ref.device
    pos = torch.arange(length, device=device).expand(batch, length)
    table = torch.empty(8, batch, length, dtype=torch.int64, device=device)
    if has_doc:
        doc = doc_ids.to(torch.int64)
        first, last, count = _first_last(doc)
        valid = doc >= 0
        doc_lo, doc_hi = first, last + 1
        contiguous = valid & (doc_hi - doc_lo == count)
        table[_DOC] = torch.where(valid, first, -1)  # the first position names a document in int32
        table[_SPAN_LO] = torch.where(contiguous, doc_lo, length)
        table[_SPAN_HI] = torch.where(contiguous, doc_hi, 0)
    else:
        valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        doc_lo = torch.zeros_like(pos)
        doc_hi = torch.full_like(pos, length)
        table[_DOC] = 0
        table[_SPAN_LO] = 0
        table[_SPAN_HI] = length
    if causal:
        kv_lo, kv_hi, q_lo, q_hi = doc_lo, pos + 1, pos, doc_hi
        if has_img:
            img = image_ids.to(torch.int64)
            img_first, img_last, _ = _first_last(img)
            is_img = img >= 0
            kv_hi = torch.where(is_img, torch.maximum(kv_hi, img_last + 1), kv_hi)
            q_lo = torch.where(is_img, torch.minimum(q_lo, img_first), q_lo)
            table[_IMG] = torch.where(is_img, img_first, -1)
        else:
            table[_IMG] = -1
    else:
        kv_lo, kv_hi, q_lo, q_hi = doc_lo, doc_hi, doc_lo, doc_hi
        table[_IMG] = -1
    table[_KV_LO] = torch.where(valid, kv_lo, length)
    table[_KV_HI] = torch.where(valid, kv_hi, 0)
    table[_Q_LO] = torch.where(valid, q_lo, length)
    table[_Q_HI] = torch.where(valid, q_hi, 0)
    return MaskMetadata(table.to(torch.int32), causal, has_doc, has_img)


# ------------------------------------------------------------------------------ jit helpers


@triton.jit
def _id_range(ids, ok):
    """Min and max of the non-negative ids where ``ok``; (INT_MAX, -1) when there are none."""
    keep = ok & (ids >= 0)
    lo = tl.min(tl.where(keep, ids, 2147483647), 0)
    hi = tl.max(tl.where(keep, ids, -1), 0)
    return lo, hi


@triton.jit
def _may_meet(q_doc_lo, q_doc_hi, k_doc_lo, k_doc_hi, q_img_lo, q_img_hi, k_img_lo, k_img_hi,
              q_last, k_first, IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_IMG: tl.constexpr):
    """Whether a query tile and a key tile may hold one visible pair (False: skip the tile)."""
    ok = q_last >= 0
    if HAS_DOC:
        ok = ok & (q_doc_lo <= k_doc_hi) & (k_doc_lo <= q_doc_hi)
    if IS_CAUSAL:
        reach = k_first <= q_last
        if HAS_IMG:
            reach = reach | ((q_img_lo <= k_img_hi) & (k_img_lo <= q_img_hi))
        ok = ok & reach
    return ok


@triton.jit
def _visible(offs_q, offs_k, doc_q, doc_k, img_q, img_k, L,
             IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_IMG: tl.constexpr):
    """Per-element visibility of a [queries, keys] tile (arguments already broadcast)."""
    ok = (offs_k < L) & (offs_q < L)
    if IS_CAUSAL:
        vis = offs_k <= offs_q
        if HAS_IMG:
            vis = vis | ((img_q == img_k) & (img_q >= 0))
        ok = ok & vis
    if HAS_DOC:
        ok = ok & (doc_q == doc_k) & (doc_q >= 0)
    return ok


@triton.jit
def _load_tile(ptrs, offs_rows, offs_d, L, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    if CHECK_ROWS:
        if EVEN_D:
            t = tl.load(ptrs, mask=offs_rows[:, None] < L, other=0.0)
        else:
            t = tl.load(ptrs, mask=(offs_rows[:, None] < L) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if EVEN_D:
            t = tl.load(ptrs)
        else:
            t = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return t


@triton.jit
def _store_tile(ptrs, value, offs_rows, offs_d, L, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr):
    if EVEN_D:
        tl.store(ptrs, value, mask=offs_rows[:, None] < L)
    else:
        tl.store(ptrs, value, mask=(offs_rows[:, None] < L) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _block_bounds(META, meta_row, offs, row_ok, stride_mf, LO_FIELD: tl.constexpr, HI_FIELD: tl.constexpr, L):
    """(lo, hi, span_lo, span_hi, one_span) of a tile: its loop bounds and its document span."""
    lo = tl.min(tl.load(META + LO_FIELD * stride_mf + meta_row + offs, mask=row_ok, other=L), 0)
    hi = tl.max(tl.load(META + HI_FIELD * stride_mf + meta_row + offs, mask=row_ok, other=0), 0)
    span_lo_t = tl.load(META + 6 * stride_mf + meta_row + offs, mask=row_ok, other=L)
    span_hi_t = tl.load(META + 7 * stride_mf + meta_row + offs, mask=row_ok, other=0)
    span_lo = tl.min(span_lo_t, 0)
    span_hi = tl.max(span_hi_t, 0)
    # one contiguous document for the whole tile: every row has the same span start
    one_span = (tl.max(tl.where(row_ok, span_lo_t, 0), 0) == span_lo) & (span_lo < span_hi)
    return lo, hi, span_lo, span_hi, one_span



@triton.jit
def _tile_ids(META, meta_row, stride_mf, offs, L, HAS_DOC: tl.constexpr, HAS_IMG: tl.constexpr):
    """Document and image ids of a tile (-1 out of range; placeholders when absent)."""
    ok = offs < L
    if HAS_DOC:
        doc = tl.load(META + meta_row + offs, mask=ok, other=-1)
    else:
        doc = tl.where(ok, 0, -1)
    if HAS_IMG:
        img = tl.load(META + stride_mf + meta_row + offs, mask=ok, other=-1)
    else:
        img = offs * 0 - 1
    return doc, img


@triton.jit
def _key_loop_bounds(META, meta_row, stride_mf, start_m, offs_m, q_last, L, BLOCK_N: tl.constexpr,
                     IS_CAUSAL: tl.constexpr, HAS_META: tl.constexpr):
    """For a query tile: key loop [lo, hi), with [full_lo, full_hi) the tiles needing no mask."""
    if HAS_META:
        lo, hi, span_lo, span_hi, one_span = _block_bounds(META, meta_row, offs_m, offs_m < L, stride_mf,
                                                           2, 3, L)
    else:
        zero = start_m * 0
        lo = zero
        if IS_CAUSAL:
            hi = q_last + 1
        else:
            hi = zero + L
        span_lo = zero
        span_hi = zero + L
        one_span = span_lo < span_hi
    lo = (lo // BLOCK_N) * BLOCK_N
    full_lo = tl.maximum(((span_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, lo)
    full_hi = (span_hi // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        # a key tile is fully visible when its last key is at or before the first query
        full_hi = tl.minimum(full_hi, ((start_m + 1) // BLOCK_N) * BLOCK_N)
    has_full = one_span & (full_lo < full_hi)
    full_lo = tl.where(has_full, full_lo, lo)
    full_hi = tl.where(has_full, full_hi, lo)
    return lo, full_lo, full_hi, tl.maximum(hi, full_hi)


@triton.jit
def _query_loop_bounds(META, meta_row, stride_mf, start_n, offs_n, L, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_META: tl.constexpr):
    """For a key tile: query loop [lo, hi), with [full_lo, full_hi) the tiles needing no mask."""
    if HAS_META:
        lo, hi, span_lo, span_hi, one_span = _block_bounds(META, meta_row, offs_n, offs_n < L, stride_mf,
                                                           4, 5, L)
    else:
        zero = start_n * 0
        if IS_CAUSAL:
            lo = start_n
        else:
            lo = zero
        hi = zero + L
        span_lo = zero
        span_hi = zero + L
        one_span = span_lo < span_hi
    lo = (lo // BLOCK_M) * BLOCK_M
    full_lo = tl.maximum(((span_lo + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, lo)
    if IS_CAUSAL:
        # a query tile fully sees the key tile when its first query is at or after the last key
        full_lo = tl.maximum(full_lo, ((start_n + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
    full_hi = (span_hi // BLOCK_M) * BLOCK_M
    has_full = one_span & (full_lo < full_hi)
    full_lo = tl.where(has_full, full_lo, lo)
    full_hi = tl.where(has_full, full_hi, lo)
    return lo, full_lo, full_hi, tl.maximum(hi, full_hi)


# ----------------------------------------------------------------------------------- forward


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, K_base, V_base, start_n, offs_m, offs_d, stride_kl, stride_kd,
              stride_vl, stride_vd, doc_q, img_q, META, meta_row, stride_mf, L, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
              IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_IMG: tl.constexpr,
              INPUT_PRECISION: tl.constexpr):
    """One key/value tile of the online softmax (MASKED: apply the per-element mask)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(K_base + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd, offs_n, offs_d, L,
                   HEAD_DIM, EVEN_D, MASKED)
    qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    if MASKED:
        doc_k, img_k = _tile_ids(META, meta_row, stride_mf, offs_n, L, HAS_DOC, HAS_IMG)
        ok = _visible(offs_m[:, None], offs_n[None, :], doc_q[:, None], doc_k[None, :], img_q[:, None],
                      img_k[None, :], L, IS_CAUSAL, HAS_DOC, HAS_IMG)
        qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = m_new
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(V_base + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd, offs_n, offs_d, L,
                   HEAD_DIM, EVEN_D, MASKED)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd(
    Q, K, V, Out, LSE, META,
    qk_scale,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_mf, stride_mb,
    H, L,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_IMG: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    HAS_META: tl.constexpr = HAS_DOC or HAS_IMG
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < L
    q_last = tl.minimum(start_m + BLOCK_M, L) - 1
    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_ql
                   + offs_d[None, :] * stride_qd, offs_m, offs_d, L, HEAD_DIM, EVEN_D, True)
    K_base = K + off_b * stride_kb + off_h * stride_kh
    V_base = V + off_b * stride_vb + off_h * stride_vh
    meta_row = off_b * stride_mb
    doc_q, img_q = _tile_ids(META, meta_row, stride_mf, offs_m, L, HAS_DOC, HAS_IMG)
    q_doc_lo, q_doc_hi = _id_range(doc_q, row_ok)
    q_img_lo, q_img_hi = _id_range(img_q, row_ok)
    lo, full_lo, full_hi, hi = _key_loop_bounds(META, meta_row, stride_mf, start_m, offs_m, q_last, L,
                                                BLOCK_N, IS_CAUSAL, HAS_META)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # edge tiles before the fully visible run (start of the document)
    for start_n in range(lo, full_lo, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        doc_k, img_k = _tile_ids(META, meta_row, stride_mf, offs_n, L, HAS_DOC, HAS_IMG)
        k_doc_lo, k_doc_hi = _id_range(doc_k, offs_n < L)
        k_img_lo, k_img_hi = _id_range(img_k, offs_n < L)
        if _may_meet(q_doc_lo, q_doc_hi, k_doc_lo, k_doc_hi, q_img_lo, q_img_hi, k_img_lo, k_img_hi,
                     q_last, start_n, IS_CAUSAL, HAS_DOC, HAS_IMG):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K_base, V_base, start_n, offs_m, offs_d, stride_kl,
                                      stride_kd, stride_vl, stride_vd, doc_q, img_q, META, meta_row, stride_mf,
                                      L, qk_scale, HEAD_DIM, BLOCK_N, EVEN_D, True, IS_CAUSAL, HAS_DOC,
                                      HAS_IMG, INPUT_PRECISION)
    # fully visible tiles: no mask arithmetic
    for start_n in range(full_lo, full_hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K_base, V_base, start_n, offs_m, offs_d, stride_kl,
                                  stride_kd, stride_vl, stride_vd, doc_q, img_q, META, meta_row, stride_mf,
                                  L, qk_scale, HEAD_DIM, BLOCK_N, EVEN_D, False, IS_CAUSAL, HAS_DOC,
                                  HAS_IMG, INPUT_PRECISION)
    # edge tiles after it: the diagonal, image blocks reaching ahead, the end of the document
    for start_n in range(full_hi, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        doc_k, img_k = _tile_ids(META, meta_row, stride_mf, offs_n, L, HAS_DOC, HAS_IMG)
        k_doc_lo, k_doc_hi = _id_range(doc_k, offs_n < L)
        k_img_lo, k_img_hi = _id_range(img_k, offs_n < L)
        if _may_meet(q_doc_lo, q_doc_hi, k_doc_lo, k_doc_hi, q_img_lo, q_img_hi, k_img_lo, k_img_hi,
                     q_last, start_n, IS_CAUSAL, HAS_DOC, HAS_IMG):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K_base, V_base, start_n, offs_m, offs_d, stride_kl,
                                      stride_kd, stride_vl, stride_vd, doc_q, img_q, META, meta_row, stride_mf,
                                      L, qk_scale, HEAD_DIM, BLOCK_N, EVEN_D, True, IS_CAUSAL, HAS_DOC,
                                      HAS_IMG, INPUT_PRECISION)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(l_safe), float("inf"))
    tl.store(LSE + pid_bh.to(tl.int64) * L + offs_m, lse, mask=row_ok)
    _store_tile(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ol
                + offs_d[None, :] * stride_od, out.to(Out.dtype.element_ty), offs_m, offs_d, L, HEAD_DIM, EVEN_D)


# ---------------------------------------------------------------------------------- backward


@triton.jit
def _attn_bwd_delta(Out, DO, DELTA,
                    stride_ob, stride_oh, stride_ol, stride_od,
                    stride_gb, stride_gh, stride_gl, stride_gd,
                    H, L, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O), float32 [B, H, L]."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ol
                + offs_d[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_gb + off_h * stride_gh + offs_m[:, None] * stride_gl
                 + offs_d[None, :] * stride_gd, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * L + offs_m, tl.sum(o * do, 1), mask=offs_m < L)


@triton.jit
def _dkdv_tile(dk, dv, k, v, Q_base, DO_base, LSE_row, DELTA_row, start_m, offs_n, offs_d,
               stride_ql, stride_qd, stride_gl, stride_gd, doc_k, img_k, META, meta_row, stride_mf, L,
               qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr,
               MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_IMG: tl.constexpr,
               INPUT_PRECISION: tl.constexpr):
    """One query tile's contribution to dK, dV of a key tile (scores computed transposed)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(Q_base + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd, offs_m, offs_d, L,
                   HEAD_DIM, EVEN_D, MASKED)
    do = _load_tile(DO_base + offs_m[:, None] * stride_gl + offs_d[None, :] * stride_gd, offs_m, offs_d, L,
                    HEAD_DIM, EVEN_D, MASKED)
    if MASKED:
        lse = tl.load(LSE_row + offs_m, mask=offs_m < L, other=float("inf"))
        delta = tl.load(DELTA_row + offs_m, mask=offs_m < L, other=0.0)
    else:
        lse = tl.load(LSE_row + offs_m)
        delta = tl.load(DELTA_row + offs_m)
    qk_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale
    p_t = tl.math.exp2(qk_t - lse[None, :])
    if MASKED:
        doc_q, img_q = _tile_ids(META, meta_row, stride_mf, offs_m, L, HAS_DOC, HAS_IMG)
        ok = _visible(offs_m[None, :], offs_n[:, None], doc_q[None, :], doc_k[:, None], img_q[None, :],
                      img_k[:, None], L, IS_CAUSAL, HAS_DOC, HAS_IMG)
        p_t = tl.where(ok, p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, META,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_gb, stride_gh, stride_gl, stride_gd,
    stride_dkb, stride_dkh, stride_dkl, stride_dkd,
    stride_dvb, stride_dvh, stride_dvl, stride_dvd,
    stride_mf, stride_mb,
    H, L,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_IMG: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    HAS_META: tl.constexpr = HAS_DOC or HAS_IMG
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < L
    k = _load_tile(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kl
                   + offs_d[None, :] * stride_kd, offs_n, offs_d, L, HEAD_DIM, EVEN_D, True)
    v = _load_tile(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vl
                   + offs_d[None, :] * stride_vd, offs_n, offs_d, L, HEAD_DIM, EVEN_D, True)
    Q_base = Q + off_b * stride_qb + off_h * stride_qh
    DO_base = DO + off_b * stride_gb + off_h * stride_gh
    LSE_row = LSE + pid_bh.to(tl.int64) * L
    DELTA_row = DELTA + pid_bh.to(tl.int64) * L
    meta_row = off_b * stride_mb
    doc_k, img_k = _tile_ids(META, meta_row, stride_mf, offs_n, L, HAS_DOC, HAS_IMG)
    k_doc_lo, k_doc_hi = _id_range(doc_k, col_ok)
    k_img_lo, k_img_hi = _id_range(img_k, col_ok)
    lo, full_lo, full_hi, hi = _query_loop_bounds(META, meta_row, stride_mf, start_n, offs_n, L, BLOCK_M,
                                                  BLOCK_N, IS_CAUSAL, HAS_META)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(lo, full_lo, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        doc_q, img_q = _tile_ids(META, meta_row, stride_mf, offs_m, L, HAS_DOC, HAS_IMG)
        q_doc_lo, q_doc_hi = _id_range(doc_q, offs_m < L)
        q_img_lo, q_img_hi = _id_range(img_q, offs_m < L)
        if _may_meet(q_doc_lo, q_doc_hi, k_doc_lo, k_doc_hi, q_img_lo, q_img_hi, k_img_lo, k_img_hi,
                     tl.minimum(start_m + BLOCK_M, L) - 1, start_n, IS_CAUSAL, HAS_DOC, HAS_IMG):
            dk, dv = _dkdv_tile(dk, dv, k, v, Q_base, DO_base, LSE_row, DELTA_row, start_m, offs_n, offs_d,
                                stride_ql, stride_qd, stride_gl, stride_gd, doc_k, img_k, META, meta_row,
                                stride_mf, L, qk_scale, HEAD_DIM, BLOCK_M, EVEN_D, True, IS_CAUSAL, HAS_DOC,
                                HAS_IMG, INPUT_PRECISION)
    for start_m in range(full_lo, full_hi, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, Q_base, DO_base, LSE_row, DELTA_row, start_m, offs_n, offs_d,
                            stride_ql, stride_qd, stride_gl, stride_gd, doc_k, img_k, META, meta_row,
                            stride_mf, L, qk_scale, HEAD_DIM, BLOCK_M, EVEN_D, False, IS_CAUSAL, HAS_DOC,
                            HAS_IMG, INPUT_PRECISION)
    for start_m in range(full_hi, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        doc_q, img_q = _tile_ids(META, meta_row, stride_mf, offs_m, L, HAS_DOC, HAS_IMG)
        q_doc_lo, q_doc_hi = _id_range(doc_q, offs_m < L)
        q_img_lo, q_img_hi = _id_range(img_q, offs_m < L)
        if _may_meet(q_doc_lo, q_doc_hi, k_doc_lo, k_doc_hi, q_img_lo, q_img_hi, k_img_lo, k_img_hi,
                     tl.minimum(start_m + BLOCK_M, L) - 1, start_n, IS_CAUSAL, HAS_DOC, HAS_IMG):
            dk, dv = _dkdv_tile(dk, dv, k, v, Q_base, DO_base, LSE_row, DELTA_row, start_m, offs_n, offs_d,
                                stride_ql, stride_qd, stride_gl, stride_gd, doc_k, img_k, META, meta_row,
                                stride_mf, L, qk_scale, HEAD_DIM, BLOCK_M, EVEN_D, True, IS_CAUSAL, HAS_DOC,
                                HAS_IMG, INPUT_PRECISION)

    dk = dk * sm_scale
    _store_tile(DK + off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkl
                + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), offs_n, offs_d, L, HEAD_DIM, EVEN_D)
    _store_tile(DV + off_b * stride_dvb + off_h * stride_dvh + offs_n[:, None] * stride_dvl
                + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), offs_n, offs_d, L, HEAD_DIM, EVEN_D)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, K_base, V_base, start_n, offs_m, offs_d, stride_kl, stride_kd,
             stride_vl, stride_vd, doc_q, img_q, META, meta_row, stride_mf, L, qk_scale,
             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
             IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_IMG: tl.constexpr,
             INPUT_PRECISION: tl.constexpr):
    """One key tile's contribution to dQ of a query tile."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(K_base + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd, offs_n, offs_d, L,
                   HEAD_DIM, EVEN_D, MASKED)
    v = _load_tile(V_base + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd, offs_n, offs_d, L,
                   HEAD_DIM, EVEN_D, MASKED)
    qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    p = tl.math.exp2(qk - lse[:, None])
    if MASKED:
        doc_k, img_k = _tile_ids(META, meta_row, stride_mf, offs_n, L, HAS_DOC, HAS_IMG)
        ok = _visible(offs_m[:, None], offs_n[None, :], doc_q[:, None], doc_k[None, :], img_q[:, None],
                      img_k[None, :], L, IS_CAUSAL, HAS_DOC, HAS_IMG)
        p = tl.where(ok, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, META,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_gb, stride_gh, stride_gl, stride_gd,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    stride_mf, stride_mb,
    H, L,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_IMG: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    HAS_META: tl.constexpr = HAS_DOC or HAS_IMG
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < L
    q_last = tl.minimum(start_m + BLOCK_M, L) - 1
    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_ql
                   + offs_d[None, :] * stride_qd, offs_m, offs_d, L, HEAD_DIM, EVEN_D, True)
    do = _load_tile(DO + off_b * stride_gb + off_h * stride_gh + offs_m[:, None] * stride_gl
                    + offs_d[None, :] * stride_gd, offs_m, offs_d, L, HEAD_DIM, EVEN_D, True)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * L + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0)
    K_base = K + off_b * stride_kb + off_h * stride_kh
    V_base = V + off_b * stride_vb + off_h * stride_vh
    meta_row = off_b * stride_mb
    doc_q, img_q = _tile_ids(META, meta_row, stride_mf, offs_m, L, HAS_DOC, HAS_IMG)
    q_doc_lo, q_doc_hi = _id_range(doc_q, row_ok)
    q_img_lo, q_img_hi = _id_range(img_q, row_ok)
    lo, full_lo, full_hi, hi = _key_loop_bounds(META, meta_row, stride_mf, start_m, offs_m, q_last, L,
                                                BLOCK_N, IS_CAUSAL, HAS_META)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, full_lo, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        doc_k, img_k = _tile_ids(META, meta_row, stride_mf, offs_n, L, HAS_DOC, HAS_IMG)
        k_doc_lo, k_doc_hi = _id_range(doc_k, offs_n < L)
        k_img_lo, k_img_hi = _id_range(img_k, offs_n < L)
        if _may_meet(q_doc_lo, q_doc_hi, k_doc_lo, k_doc_hi, q_img_lo, q_img_hi, k_img_lo, k_img_hi,
                     q_last, start_n, IS_CAUSAL, HAS_DOC, HAS_IMG):
            dq = _dq_tile(dq, q, do, lse, delta, K_base, V_base, start_n, offs_m, offs_d, stride_kl, stride_kd,
                          stride_vl, stride_vd, doc_q, img_q, META, meta_row, stride_mf, L, qk_scale, HEAD_DIM,
                          BLOCK_N, EVEN_D, True, IS_CAUSAL, HAS_DOC, HAS_IMG, INPUT_PRECISION)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, K_base, V_base, start_n, offs_m, offs_d, stride_kl, stride_kd,
                      stride_vl, stride_vd, doc_q, img_q, META, meta_row, stride_mf, L, qk_scale, HEAD_DIM,
                      BLOCK_N, EVEN_D, False, IS_CAUSAL, HAS_DOC, HAS_IMG, INPUT_PRECISION)
    for start_n in range(full_hi, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        doc_k, img_k = _tile_ids(META, meta_row, stride_mf, offs_n, L, HAS_DOC, HAS_IMG)
        k_doc_lo, k_doc_hi = _id_range(doc_k, offs_n < L)
        k_img_lo, k_img_hi = _id_range(img_k, offs_n < L)
        if _may_meet(q_doc_lo, q_doc_hi, k_doc_lo, k_doc_hi, q_img_lo, q_img_hi, k_img_lo, k_img_hi,
                     q_last, start_n, IS_CAUSAL, HAS_DOC, HAS_IMG):
            dq = _dq_tile(dq, q, do, lse, delta, K_base, V_base, start_n, offs_m, offs_d, stride_kl, stride_kd,
                          stride_vl, stride_vd, doc_q, img_q, META, meta_row, stride_mf, L, qk_scale, HEAD_DIM,
                          BLOCK_N, EVEN_D, True, IS_CAUSAL, HAS_DOC, HAS_IMG, INPUT_PRECISION)

    dq = dq * sm_scale
    _store_tile(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dql
                + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), offs_m, offs_d, L, HEAD_DIM, EVEN_D)


# --------------------------------------------------------------------------------- launchers

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TUNE_KEY = ["L", "HEAD_DIM", "IS_CAUSAL", "HAS_DOC", "HAS_IMG"]
# (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M is the query tile, BLOCK_N the key tile.
# Candidates for sm_90 at head dims 64 / 128; ptxas (bundled, sm_90, bf16) reports no register
# spills for the 8-warp tiles at head dim 64; the autotuner drops the slow ones at run time.
_FWD_CONFIGS = [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4), (128, 128, 8, 3),
                (128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 8, 3)]
_DKDV_CONFIGS = [(64, 128, 8, 3), (32, 64, 4, 4), (32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2),
                 (32, 64, 8, 3), (64, 64, 4, 3)]
_DQ_CONFIGS = [(128, 64, 8, 3), (64, 32, 4, 4), (128, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3),
               (64, 64, 8, 3)]
_CONFIGS = {"fwd": _FWD_CONFIGS, "dkdv": _DKDV_CONFIGS, "dq": _DQ_CONFIGS}
# the interpreter runs numpy per tile op: one fixed, moderate tile keeps the tests quick
_INTERPRETER_BLOCKS = (32, 32)


def _smem_ok(kind: str, block_m: int, block_n: int, stages: int, head_dim: int, itemsize: int) -> bool:
    """Rough shared-memory check (Hopper: 228 KiB per SM) to prune configs before compiling.

    The resident tile is loaded once; the two streamed tiles (k, v or q, dO) are buffered
    ``stages`` deep.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    resident, streamed = (block_n, block_m) if kind == "dkdv" else (block_m, block_n)
    return (2 * resident + 2 * streamed * stages) * block_d * itemsize <= 200 * 1024


def _pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 64))
        itemsize = named_args["Q"].element_size() if "Q" in named_args else 2
        kept = [c for c in configs if _smem_ok(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages,
                                               head_dim, itemsize)]
        return kept or configs[-1:]

    return prune


@functools.cache
def _tuned(kind: str):
    """The autotuned version of a kernel, built on first use (never at import)."""
    kernel = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}[kind]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in _CONFIGS[kind]]
    return triton.autotune(configs=configs, key=_TUNE_KEY,
                           prune_configs_by={"early_config_prune": _pruner(kind)})(kernel)


def _autotune() -> bool:
    return not triton_interpreter() and os.environ.get("LCL_FAST_ATTENTION_AUTOTUNE", "1") != "0"


def _default_blocks(kind: str, head_dim: int, itemsize: int) -> tuple[int, int, int, int]:
    """The heuristic tile when autotuning is off: the first candidate that fits shared memory
    (8 warps first: the lowest register count per thread at head dims 64 and 128)."""
    if triton_interpreter():
        return (*_INTERPRETER_BLOCKS, 4, 1)
    fits = [c for c in _CONFIGS[kind] if _smem_ok(kind, c[0], c[1], c[3], head_dim, itemsize)]
    return fits[0] if fits else (32, 32, 4, 1)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dtype not in _DTYPES:
        raise ValueError(f"the Triton attention supports {_DTYPES}, got {q.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"the Triton attention supports head dims up to 256, got {q.shape[-1]}")
    if not q.is_cuda and not triton_interpreter():
        raise ValueError("the Triton attention needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def _table_args(meta: MaskMetadata, device: torch.device):
    table = meta.table
    if table is None:
        table = torch.zeros(1, dtype=torch.int32, device=device)
        return table, 0, 0
    return table, table.stride(0), table.stride(1)


def _launch(kind: str, kernel, grid_rows: int, batch_heads: int, args: tuple, consts: dict,
            blocks: Optional[tuple[int, int]]):
    """Run ``kernel`` autotuned, or with ``blocks`` (BLOCK_M, BLOCK_N) / the heuristic tiles."""
    head_dim = consts["HEAD_DIM"]
    if blocks is None and _autotune():
        row_block = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
        _tuned(kind)[lambda meta: (triton.cdiv(grid_rows, meta[row_block]), batch_heads)](*args, **consts)
        return
    if blocks is None:
        block_m, block_n, warps, stages = _default_blocks(kind, head_dim, args[0].element_size())
    else:
        (block_m, block_n), warps, stages = blocks, 4, 2
    row_block = block_n if kind == "dkdv" else block_m
    kernel[(triton.cdiv(grid_rows, row_block), batch_heads)](
        *args, **consts, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages
    )


def _consts(q: torch.Tensor, meta: MaskMetadata) -> dict:
    head_dim = q.shape[-1]
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        IS_CAUSAL=meta.causal,
        HAS_DOC=meta.has_doc,
        HAS_IMG=meta.has_img,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: MaskMetadata, scale: float,
    *, blocks: Optional[tuple[int, int]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``[B, H, L, D]`` (stored ``[B, L, H, D]`` in memory) and base-2 logsumexp ``[B, H, L]``.

    ``blocks=(BLOCK_M, BLOCK_N)`` fixes the tiles (tests); otherwise autotuned on the GPU.
    """
    _check(q, k, v)
    batch, heads, length, head_dim = q.shape
    out = torch.empty(batch, length, heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(batch, heads, length, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("inf"))
    table, stride_mf, stride_mb = _table_args(meta, q.device)
    args = (q, k, v, out, lse, table, scale * _LOG2E, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            stride_mf, stride_mb, heads, length)
    _launch("fwd", _attn_fwd, length, batch * heads, args, _consts(q, meta), blocks)
    return out, lse


def attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, meta: MaskMetadata, scale: float, *, blocks: Optional[tuple[int, int]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV for the forward above (``blocks`` fixes the tiles of both backward kernels)."""
    batch, heads, length, head_dim = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0:
        return dq, dk, dv
    consts = _consts(q, meta)
    delta = torch.empty(batch, heads, length, dtype=torch.float32, device=q.device)
    block_pre = 64 if not triton_interpreter() else 32
    _attn_bwd_delta[(triton.cdiv(length, block_pre), batch * heads)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, length,
        HEAD_DIM=head_dim, BLOCK_D=consts["BLOCK_D"], BLOCK_M=block_pre,
    )
    table, stride_mf, stride_mb = _table_args(meta, q.device)
    common = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    _launch("dkdv", _attn_bwd_dkdv, length, batch * heads,
            (q, k, v, grad_out, dk, dv, lse, delta, table, scale * _LOG2E, scale, *common, *dk.stride(),
             *dv.stride(), stride_mf, stride_mb, heads, length), consts, blocks)
    _launch("dq", _attn_bwd_dq, length, batch * heads,
            (q, k, v, grad_out, dq, lse, delta, table, scale * _LOG2E, scale, *common, *dq.stride(),
             stride_mf, stride_mb, heads, length), consts, blocks)
    return dq, dk, dv
