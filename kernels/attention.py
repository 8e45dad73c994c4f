"""Flash attention over packed, interleaved image/text rows, the mask read from token metadata.

Algorithm: FlashAttention-2. The forward streams key/value tiles past a resident query tile
with an online softmax (float32 running max, sum and accumulator) and saves the row
logsumexp (base 2; ``+inf`` for a row that sees no key, so that ``exp2(s - lse) = 0``). The
backward runs a pre-pass for ``delta = rowsum(dO * O)``, then one kernel per key tile for
dK, dV (queries streamed) and one per query tile for dQ (keys streamed): no atomics.

The mask is never materialised. Each token carries int32 metadata (``[8, B, L]``, built by
:func:`lcl_fast.kernels.attention_launch.prepare_metadata`, O(B L) work, no host sync): its
document id, its image id, the key range ``[kv_lo, kv_hi)`` it may see, the query range
``[q_lo, q_hi)`` that may see it, and the span of its document when that document is one
contiguous run. A program takes the min/max of these over its tile to bound its loop (causal
early stop, documents before its own skipped) and to split the loop into tiles that need
per-element masking (the document edges, the diagonal, image blocks reaching past it) and
tiles fully visible (a plain inner loop, no mask arithmetic, pipelined). Masked tiles whose
id ranges cannot meet are skipped.

Memory: O(B H L) beyond q, k, v, o (the logsumexp and delta, float32). Limits: q, k, v share
one shape ``[B, H, L, D]`` (self-attention), ``D <= 256`` (tuned for 32, 64, 128); float16 /
bfloat16 / float32 (float32 products in IEEE precision: slow, for checks).

Host side (metadata, tile choice, launchers): :mod:`lcl_fast.kernels.attention_launch`.
"""

import triton
import triton.language as tl

# ------------------------------------------------------------------------------ jit helpers


@triton.jit
def _program_ids(H, L, BLOCK: tl.constexpr):
    """(tile index, batch, head, start of the (batch, head) row in ``[B, H, L]`` tensors) of a program.

    The grid is 1-D, ``ceil(L / BLOCK) * B * H`` programs with the tile index fastest: grid
    dimension 1 would cap B·H at 65535.
    """
    n_tiles = tl.cdiv(L, BLOCK)
    pid_all = tl.program_id(0)
    pid = pid_all % n_tiles
    pid_bh = pid_all // n_tiles
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    return pid, off_b, off_h, pid_bh.to(tl.int64) * L


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
def _load_tile(base, offs_rows, offs_d, stride_l, stride_d, L, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """The ``[rows, BLOCK_D]`` tile of one head starting at ``base`` (zeros out of range)."""
    ptrs = base + offs_rows[:, None] * stride_l + offs_d[None, :] * stride_d
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
def _store_tile(base, value, offs_rows, offs_d, stride_l, stride_d, L, HEAD_DIM: tl.constexpr,
                EVEN_D: tl.constexpr):
    ptrs = base + offs_rows[:, None] * stride_l + offs_d[None, :] * stride_d
    if EVEN_D:
        tl.store(ptrs, value, mask=offs_rows[:, None] < L)
    else:
        tl.store(ptrs, value, mask=(offs_rows[:, None] < L) & (offs_d[None, :] < HEAD_DIM))


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
def _tile_meta(META, meta_row, stride_mf, offs, L, HAS_DOC: tl.constexpr, HAS_IMG: tl.constexpr):
    """(doc ids, image ids, doc id min, max, image id min, max) of a tile, the ranges over its rows."""
    doc, img = _tile_ids(META, meta_row, stride_mf, offs, L, HAS_DOC, HAS_IMG)
    doc_lo, doc_hi = _id_range(doc, offs < L)
    img_lo, img_hi = _id_range(img, offs < L)
    return doc, img, doc_lo, doc_hi, img_lo, img_hi


@triton.jit
def _tile_bounds(META, meta_row, stride_mf, offs, L, lo, hi, LO_FIELD: tl.constexpr, HI_FIELD: tl.constexpr,
                 HAS_META: tl.constexpr):
    """(lo, hi, span_lo, span_hi, one_span) of a tile: its loop bounds and its document span.

    Without metadata: the given ``lo``, ``hi`` and one span over the whole row.
    """
    if HAS_META:
        row_ok = offs < L
        lo = tl.min(tl.load(META + LO_FIELD * stride_mf + meta_row + offs, mask=row_ok, other=L), 0)
        hi = tl.max(tl.load(META + HI_FIELD * stride_mf + meta_row + offs, mask=row_ok, other=0), 0)
        span_lo_t = tl.load(META + 6 * stride_mf + meta_row + offs, mask=row_ok, other=L)
        span_hi_t = tl.load(META + 7 * stride_mf + meta_row + offs, mask=row_ok, other=0)
        span_lo = tl.min(span_lo_t, 0)
        span_hi = tl.max(span_hi_t, 0)
        # one contiguous document for the whole tile: every row has the same span start
        one_span = (tl.max(tl.where(row_ok, span_lo_t, 0), 0) == span_lo) & (span_lo < span_hi)
    else:
        span_lo = lo * 0
        span_hi = span_lo + L
        one_span = span_lo < span_hi
    return lo, hi, span_lo, span_hi, one_span


@triton.jit
def _split_loop(lo, full_lo, full_hi, hi, one_span):
    """(lo, full_lo, full_hi, hi): the loop with [full_lo, full_hi) its tiles needing no mask (maybe none)."""
    has_full = one_span & (full_lo < full_hi)
    full_lo = tl.where(has_full, full_lo, lo)
    full_hi = tl.where(has_full, full_hi, lo)
    return lo, full_lo, full_hi, tl.maximum(hi, full_hi)


@triton.jit
def _key_loop_bounds(META, meta_row, stride_mf, start_m, offs_m, q_last, L, BLOCK_N: tl.constexpr,
                     IS_CAUSAL: tl.constexpr, HAS_META: tl.constexpr):
    """For a query tile: key loop [lo, hi), with [full_lo, full_hi) the tiles needing no mask."""
    if IS_CAUSAL:
        hi = q_last + 1
    else:
        hi = start_m * 0 + L
    lo, hi, span_lo, span_hi, one_span = _tile_bounds(META, meta_row, stride_mf, offs_m, L, start_m * 0, hi,
                                                      2, 3, HAS_META)
    lo = (lo // BLOCK_N) * BLOCK_N
    full_lo = tl.maximum(((span_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, lo)
    full_hi = (span_hi // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        # a key tile is fully visible when its last key is at or before the first query
        full_hi = tl.minimum(full_hi, ((start_m + 1) // BLOCK_N) * BLOCK_N)
    return _split_loop(lo, full_lo, full_hi, hi, one_span)


@triton.jit
def _query_loop_bounds(META, meta_row, stride_mf, start_n, offs_n, L, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_META: tl.constexpr):
    """For a key tile: query loop [lo, hi), with [full_lo, full_hi) the tiles needing no mask."""
    if IS_CAUSAL:
        lo = start_n
    else:
        lo = start_n * 0
    lo, hi, span_lo, span_hi, one_span = _tile_bounds(META, meta_row, stride_mf, offs_n, L, lo, start_n * 0 + L,
                                                      4, 5, HAS_META)
    lo = (lo // BLOCK_M) * BLOCK_M
    full_lo = tl.maximum(((span_lo + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, lo)
    if IS_CAUSAL:
        # a query tile fully sees the key tile when its first query is at or after the last key
        full_lo = tl.maximum(full_lo, ((start_n + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
    full_hi = (span_hi // BLOCK_M) * BLOCK_M
    return _split_loop(lo, full_lo, full_hi, hi, one_span)


# ----------------------------------------------------------------------------------- forward


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, K_base, V_base, start_n, offs_m, offs_d, stride_kl, stride_kd,
              stride_vl, stride_vd, doc_q, img_q, META, meta_row, stride_mf, L, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
              IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_IMG: tl.constexpr,
              INPUT_PRECISION: tl.constexpr):
    """One key/value tile of the online softmax (MASKED: apply the per-element mask)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(K_base, offs_n, offs_d, stride_kl, stride_kd, L, HEAD_DIM, EVEN_D, MASKED)
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
    v = _load_tile(V_base, offs_n, offs_d, stride_vl, stride_vd, L, HEAD_DIM, EVEN_D, MASKED)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_loop(acc, l_i, m_i, first, last, q, K_base, V_base, offs_m, offs_d, stride_kl, stride_kd,
              stride_vl, stride_vd, doc_q, img_q, q_doc_lo, q_doc_hi, q_img_lo, q_img_hi, q_last,
              META, meta_row, stride_mf, L, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
              IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_IMG: tl.constexpr,
              INPUT_PRECISION: tl.constexpr):
    """Key tiles [first, last) of the online softmax (MASKED: skip the tiles that cannot meet)."""
    for start_n in range(first, last, BLOCK_N):
        if MASKED:
            _, _, k_doc_lo, k_doc_hi, k_img_lo, k_img_hi = _tile_meta(
                META, meta_row, stride_mf, start_n + tl.arange(0, BLOCK_N), L, HAS_DOC, HAS_IMG)
            if _may_meet(q_doc_lo, q_doc_hi, k_doc_lo, k_doc_hi, q_img_lo, q_img_hi, k_img_lo, k_img_hi,
                         q_last, start_n, IS_CAUSAL, HAS_DOC, HAS_IMG):
                acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K_base, V_base, start_n, offs_m, offs_d, stride_kl,
                                          stride_kd, stride_vl, stride_vd, doc_q, img_q, META, meta_row,
                                          stride_mf, L, qk_scale, HEAD_DIM, BLOCK_N, EVEN_D, True, IS_CAUSAL,
                                          HAS_DOC, HAS_IMG, INPUT_PRECISION)
        else:
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K_base, V_base, start_n, offs_m, offs_d, stride_kl,
                                      stride_kd, stride_vl, stride_vd, doc_q, img_q, META, meta_row, stride_mf,
                                      L, qk_scale, HEAD_DIM, BLOCK_N, EVEN_D, False, IS_CAUSAL, HAS_DOC,
                                      HAS_IMG, INPUT_PRECISION)
    return acc, l_i, m_i


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
    pid_m, off_b, off_h, off_row = _program_ids(H, L, BLOCK_M)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    HAS_META: tl.constexpr = HAS_DOC or HAS_IMG
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_last = tl.minimum(start_m + BLOCK_M, L) - 1
    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh, offs_m, offs_d, stride_ql, stride_qd, L, HEAD_DIM,
                   EVEN_D, True)
    K_base = K + off_b * stride_kb + off_h * stride_kh
    V_base = V + off_b * stride_vb + off_h * stride_vh
    meta_row = off_b * stride_mb
    doc_q, img_q, q_doc_lo, q_doc_hi, q_img_lo, q_img_hi = _tile_meta(META, meta_row, stride_mf, offs_m, L,
                                                                      HAS_DOC, HAS_IMG)
    lo, full_lo, full_hi, hi = _key_loop_bounds(META, meta_row, stride_mf, start_m, offs_m, q_last, L,
                                                BLOCK_N, IS_CAUSAL, HAS_META)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # edge tiles before the fully visible run (start of the document), then the fully visible
    # tiles (no mask arithmetic), then the edge tiles after them (the diagonal, image blocks
    # reaching ahead, the end of the document)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, lo, full_lo, q, K_base, V_base, offs_m, offs_d, stride_kl, stride_kd,
                              stride_vl, stride_vd, doc_q, img_q, q_doc_lo, q_doc_hi, q_img_lo, q_img_hi, q_last,
                              META, meta_row, stride_mf, L, qk_scale, HEAD_DIM, BLOCK_N, EVEN_D, True, IS_CAUSAL,
                              HAS_DOC, HAS_IMG, INPUT_PRECISION)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, full_lo, full_hi, q, K_base, V_base, offs_m, offs_d, stride_kl,
                              stride_kd, stride_vl, stride_vd, doc_q, img_q, q_doc_lo, q_doc_hi, q_img_lo, q_img_hi,
                              q_last, META, meta_row, stride_mf, L, qk_scale, HEAD_DIM, BLOCK_N, EVEN_D, False,
                              IS_CAUSAL, HAS_DOC, HAS_IMG, INPUT_PRECISION)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, full_hi, hi, q, K_base, V_base, offs_m, offs_d, stride_kl, stride_kd,
                              stride_vl, stride_vd, doc_q, img_q, q_doc_lo, q_doc_hi, q_img_lo, q_img_hi, q_last,
                              META, meta_row, stride_mf, L, qk_scale, HEAD_DIM, BLOCK_N, EVEN_D, True, IS_CAUSAL,
                              HAS_DOC, HAS_IMG, INPUT_PRECISION)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(l_safe), float("inf"))
    tl.store(LSE + off_row + offs_m, lse, mask=offs_m < L)
    _store_tile(Out + off_b * stride_ob + off_h * stride_oh, out.to(Out.dtype.element_ty), offs_m, offs_d,
                stride_ol, stride_od, L, HEAD_DIM, EVEN_D)


# ---------------------------------------------------------------------------------- backward


@triton.jit
def _attn_bwd_delta(Out, DO, DELTA,
                    stride_ob, stride_oh, stride_ol, stride_od,
                    stride_gb, stride_gh, stride_gl, stride_gd,
                    H, L, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O), float32 [B, H, L]."""
    pid_m, off_b, off_h, off_row = _program_ids(H, L, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ol
                + offs_d[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_gb + off_h * stride_gh + offs_m[:, None] * stride_gl
                 + offs_d[None, :] * stride_gd, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + off_row + offs_m, tl.sum(o * do, 1), mask=offs_m < L)


@triton.jit
def _dkdv_tile(dk, dv, k, v, Q_base, DO_base, LSE_row, DELTA_row, start_m, offs_n, offs_d,
               stride_ql, stride_qd, stride_gl, stride_gd, doc_k, img_k, META, meta_row, stride_mf, L,
               qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr,
               MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_IMG: tl.constexpr,
               INPUT_PRECISION: tl.constexpr):
    """One query tile's contribution to dK, dV of a key tile (scores computed transposed)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(Q_base, offs_m, offs_d, stride_ql, stride_qd, L, HEAD_DIM, EVEN_D, MASKED)
    do = _load_tile(DO_base, offs_m, offs_d, stride_gl, stride_gd, L, HEAD_DIM, EVEN_D, MASKED)
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
def _dkdv_loop(dk, dv, first, last, k, v, Q_base, DO_base, LSE_row, DELTA_row, start_n, offs_n, offs_d,
               stride_ql, stride_qd, stride_gl, stride_gd, doc_k, img_k, k_doc_lo, k_doc_hi, k_img_lo, k_img_hi,
               META, meta_row, stride_mf, L, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
               EVEN_D: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
               HAS_IMG: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Query tiles [first, last) of dK, dV (MASKED: skip the tiles that cannot meet)."""
    for start_m in range(first, last, BLOCK_M):
        if MASKED:
            _, _, q_doc_lo, q_doc_hi, q_img_lo, q_img_hi = _tile_meta(
                META, meta_row, stride_mf, start_m + tl.arange(0, BLOCK_M), L, HAS_DOC, HAS_IMG)
            if _may_meet(q_doc_lo, q_doc_hi, k_doc_lo, k_doc_hi, q_img_lo, q_img_hi, k_img_lo, k_img_hi,
                         tl.minimum(start_m + BLOCK_M, L) - 1, start_n, IS_CAUSAL, HAS_DOC, HAS_IMG):
                dk, dv = _dkdv_tile(dk, dv, k, v, Q_base, DO_base, LSE_row, DELTA_row, start_m, offs_n, offs_d,
                                    stride_ql, stride_qd, stride_gl, stride_gd, doc_k, img_k, META, meta_row,
                                    stride_mf, L, qk_scale, HEAD_DIM, BLOCK_M, EVEN_D, True, IS_CAUSAL, HAS_DOC,
                                    HAS_IMG, INPUT_PRECISION)
        else:
            dk, dv = _dkdv_tile(dk, dv, k, v, Q_base, DO_base, LSE_row, DELTA_row, start_m, offs_n, offs_d,
                                stride_ql, stride_qd, stride_gl, stride_gd, doc_k, img_k, META, meta_row,
                                stride_mf, L, qk_scale, HEAD_DIM, BLOCK_M, EVEN_D, False, IS_CAUSAL, HAS_DOC,
                                HAS_IMG, INPUT_PRECISION)
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
    pid_n, off_b, off_h, off_row = _program_ids(H, L, BLOCK_N)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    HAS_META: tl.constexpr = HAS_DOC or HAS_IMG
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + off_b * stride_kb + off_h * stride_kh, offs_n, offs_d, stride_kl, stride_kd, L, HEAD_DIM,
                   EVEN_D, True)
    v = _load_tile(V + off_b * stride_vb + off_h * stride_vh, offs_n, offs_d, stride_vl, stride_vd, L, HEAD_DIM,
                   EVEN_D, True)
    Q_base = Q + off_b * stride_qb + off_h * stride_qh
    DO_base = DO + off_b * stride_gb + off_h * stride_gh
    LSE_row = LSE + off_row
    DELTA_row = DELTA + off_row
    meta_row = off_b * stride_mb
    doc_k, img_k, k_doc_lo, k_doc_hi, k_img_lo, k_img_hi = _tile_meta(META, meta_row, stride_mf, offs_n, L,
                                                                      HAS_DOC, HAS_IMG)
    lo, full_lo, full_hi, hi = _query_loop_bounds(META, meta_row, stride_mf, start_n, offs_n, L, BLOCK_M,
                                                  BLOCK_N, IS_CAUSAL, HAS_META)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # masked tiles before the fully visible run, the run, masked tiles after it
    dk, dv = _dkdv_loop(dk, dv, lo, full_lo, k, v, Q_base, DO_base, LSE_row, DELTA_row, start_n, offs_n, offs_d,
                        stride_ql, stride_qd, stride_gl, stride_gd, doc_k, img_k, k_doc_lo, k_doc_hi, k_img_lo,
                        k_img_hi, META, meta_row, stride_mf, L, qk_scale, HEAD_DIM, BLOCK_M, EVEN_D, True,
                        IS_CAUSAL, HAS_DOC, HAS_IMG, INPUT_PRECISION)
    dk, dv = _dkdv_loop(dk, dv, full_lo, full_hi, k, v, Q_base, DO_base, LSE_row, DELTA_row, start_n, offs_n,
                        offs_d, stride_ql, stride_qd, stride_gl, stride_gd, doc_k, img_k, k_doc_lo, k_doc_hi,
                        k_img_lo, k_img_hi, META, meta_row, stride_mf, L, qk_scale, HEAD_DIM, BLOCK_M, EVEN_D,
                        False, IS_CAUSAL, HAS_DOC, HAS_IMG, INPUT_PRECISION)
    dk, dv = _dkdv_loop(dk, dv, full_hi, hi, k, v, Q_base, DO_base, LSE_row, DELTA_row, start_n, offs_n, offs_d,
                        stride_ql, stride_qd, stride_gl, stride_gd, doc_k, img_k, k_doc_lo, k_doc_hi, k_img_lo,
                        k_img_hi, META, meta_row, stride_mf, L, qk_scale, HEAD_DIM, BLOCK_M, EVEN_D, True,
                        IS_CAUSAL, HAS_DOC, HAS_IMG, INPUT_PRECISION)

    dk = dk * sm_scale
    _store_tile(DK + off_b * stride_dkb + off_h * stride_dkh, dk.to(DK.dtype.element_ty), offs_n, offs_d,
                stride_dkl, stride_dkd, L, HEAD_DIM, EVEN_D)
    _store_tile(DV + off_b * stride_dvb + off_h * stride_dvh, dv.to(DV.dtype.element_ty), offs_n, offs_d,
                stride_dvl, stride_dvd, L, HEAD_DIM, EVEN_D)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, K_base, V_base, start_n, offs_m, offs_d, stride_kl, stride_kd,
             stride_vl, stride_vd, doc_q, img_q, META, meta_row, stride_mf, L, qk_scale,
             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
             IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_IMG: tl.constexpr,
             INPUT_PRECISION: tl.constexpr):
    """One key tile's contribution to dQ of a query tile."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(K_base, offs_n, offs_d, stride_kl, stride_kd, L, HEAD_DIM, EVEN_D, MASKED)
    v = _load_tile(V_base, offs_n, offs_d, stride_vl, stride_vd, L, HEAD_DIM, EVEN_D, MASKED)
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
def _dq_loop(dq, first, last, q, do, lse, delta, K_base, V_base, offs_m, offs_d, stride_kl, stride_kd,
             stride_vl, stride_vd, doc_q, img_q, q_doc_lo, q_doc_hi, q_img_lo, q_img_hi, q_last,
             META, meta_row, stride_mf, L, qk_scale,
             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
             IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_IMG: tl.constexpr,
             INPUT_PRECISION: tl.constexpr):
    """Key tiles [first, last) of dQ (MASKED: skip the tiles that cannot meet)."""
    for start_n in range(first, last, BLOCK_N):
        if MASKED:
            _, _, k_doc_lo, k_doc_hi, k_img_lo, k_img_hi = _tile_meta(
                META, meta_row, stride_mf, start_n + tl.arange(0, BLOCK_N), L, HAS_DOC, HAS_IMG)
            if _may_meet(q_doc_lo, q_doc_hi, k_doc_lo, k_doc_hi, q_img_lo, q_img_hi, k_img_lo, k_img_hi,
                         q_last, start_n, IS_CAUSAL, HAS_DOC, HAS_IMG):
                dq = _dq_tile(dq, q, do, lse, delta, K_base, V_base, start_n, offs_m, offs_d, stride_kl,
                              stride_kd, stride_vl, stride_vd, doc_q, img_q, META, meta_row, stride_mf, L,
                              qk_scale, HEAD_DIM, BLOCK_N, EVEN_D, True, IS_CAUSAL, HAS_DOC, HAS_IMG,
                              INPUT_PRECISION)
        else:
            dq = _dq_tile(dq, q, do, lse, delta, K_base, V_base, start_n, offs_m, offs_d, stride_kl, stride_kd,
                          stride_vl, stride_vd, doc_q, img_q, META, meta_row, stride_mf, L, qk_scale, HEAD_DIM,
                          BLOCK_N, EVEN_D, False, IS_CAUSAL, HAS_DOC, HAS_IMG, INPUT_PRECISION)
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
    pid_m, off_b, off_h, off_row = _program_ids(H, L, BLOCK_M)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    HAS_META: tl.constexpr = HAS_DOC or HAS_IMG
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_last = tl.minimum(start_m + BLOCK_M, L) - 1
    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh, offs_m, offs_d, stride_ql, stride_qd, L, HEAD_DIM,
                   EVEN_D, True)
    do = _load_tile(DO + off_b * stride_gb + off_h * stride_gh, offs_m, offs_d, stride_gl, stride_gd, L, HEAD_DIM,
                    EVEN_D, True)
    lse = tl.load(LSE + off_row + offs_m, mask=offs_m < L, other=float("inf"))
    delta = tl.load(DELTA + off_row + offs_m, mask=offs_m < L, other=0.0)
    K_base = K + off_b * stride_kb + off_h * stride_kh
    V_base = V + off_b * stride_vb + off_h * stride_vh
    meta_row = off_b * stride_mb
    doc_q, img_q, q_doc_lo, q_doc_hi, q_img_lo, q_img_hi = _tile_meta(META, meta_row, stride_mf, offs_m, L,
                                                                      HAS_DOC, HAS_IMG)
    lo, full_lo, full_hi, hi = _key_loop_bounds(META, meta_row, stride_mf, start_m, offs_m, q_last, L,
                                                BLOCK_N, IS_CAUSAL, HAS_META)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # masked tiles before the fully visible run, the run, masked tiles after it
    dq = _dq_loop(dq, lo, full_lo, q, do, lse, delta, K_base, V_base, offs_m, offs_d, stride_kl, stride_kd,
                  stride_vl, stride_vd, doc_q, img_q, q_doc_lo, q_doc_hi, q_img_lo, q_img_hi, q_last, META,
                  meta_row, stride_mf, L, qk_scale, HEAD_DIM, BLOCK_N, EVEN_D, True, IS_CAUSAL, HAS_DOC, HAS_IMG,
                  INPUT_PRECISION)
    dq = _dq_loop(dq, full_lo, full_hi, q, do, lse, delta, K_base, V_base, offs_m, offs_d, stride_kl, stride_kd,
                  stride_vl, stride_vd, doc_q, img_q, q_doc_lo, q_doc_hi, q_img_lo, q_img_hi, q_last, META,
                  meta_row, stride_mf, L, qk_scale, HEAD_DIM, BLOCK_N, EVEN_D, False, IS_CAUSAL, HAS_DOC,
                  HAS_IMG, INPUT_PRECISION)
    dq = _dq_loop(dq, full_hi, hi, q, do, lse, delta, K_base, V_base, offs_m, offs_d, stride_kl, stride_kd,
                  stride_vl, stride_vd, doc_q, img_q, q_doc_lo, q_doc_hi, q_img_lo, q_img_hi, q_last, META,
                  meta_row, stride_mf, L, qk_scale, HEAD_DIM, BLOCK_N, EVEN_D, True, IS_CAUSAL, HAS_DOC, HAS_IMG,
                  INPUT_PRECISION)

    dq = dq * sm_scale
    _store_tile(DQ + off_b * stride_dqb + off_h * stride_dqh, dq.to(DQ.dtype.element_ty), offs_m, offs_d,
                stride_dql, stride_dqd, L, HEAD_DIM, EVEN_D)
