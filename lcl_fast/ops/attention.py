"""Causal attention over interleaved image/text sequences, with packing and padding.

``interleaved_attention(q, k, v, doc_ids=, image_ids=, causal=)`` computes softmax attention
for ``q, k, v [B, H, L, D]`` under the mask given by per-token integer metadata:

- ``doc_ids [B, L]`` (optional): query i sees key j only when both carry the same id; a
  negative id is padding, seen by no one, and its own output is zero;
- causal order (``causal=True``): key j <= query i;
- ``image_ids [B, L]`` (optional, causal only): tokens with the same non-negative id (the
  latents of one image) see each other in both directions; ``-1`` marks text.

Three implementations (see :mod:`lcl_fast._impl`):

- ``"triton"``: the fused kernel of :mod:`lcl_fast.kernels.attention`; reads the metadata in
  the kernel, never builds an ``L x L`` mask, skips masked tiles and padding.
- ``"torch"``: exact and memory-lean: one ``scaled_dot_product_attention`` per document
  (plain causal inside it); the rows of an image are recomputed without the causal limit.
  No ``L x L`` mask is built when images are contiguous runs (the normal case).
- ``"reference"``: what the published code does: a dense additive float mask and one
  ``scaled_dot_product_attention`` over the whole padded length.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lcl_fast._impl import resolve_impl
from lcl_fast.ops.library import autograd_inside_op

__all__ = ["interleaved_attention", "dense_attention_mask"]


def _check_inputs(q, k, v, doc_ids, image_ids) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, L, D], got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must have the same shape [B, H, L, D]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    batch, _, length, _ = q.shape
    for name, ids in (("doc_ids", doc_ids), ("image_ids", image_ids)):
        if ids is None:
            continue
        if tuple(ids.shape) != (batch, length):
            raise ValueError(f"{name} must be [B, L] = [{batch}, {length}], got {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers, got {ids.dtype}")
        if ids.device != q.device:
            raise ValueError(f"{name} is on {ids.device} but q is on {q.device}")


def dense_attention_mask(
    length: int,
    *,
    doc_ids: Optional[torch.Tensor] = None,
    image_ids: Optional[torch.Tensor] = None,
    causal: bool = True,
    device=None,
) -> torch.Tensor:
    """The boolean visibility matrix ``[B or 1, L, L]`` (True: query i may see key j).

    Quadratic in ``L``: for the reference path and for tests only.
    """
    if doc_ids is not None:
        device = doc_ids.device
    elif image_ids is not None:
        device = image_ids.device
    pos = torch.arange(length, device=device)
    allowed = torch.ones(1, length, length, dtype=torch.bool, device=device)
    if causal:
        visible = (pos[None, :] <= pos[:, None])[None]
        if image_ids is not None:
            same_image = (image_ids[:, :, None] == image_ids[:, None, :]) & (image_ids[:, :, None] >= 0)
            visible = visible | same_image
        allowed = allowed & visible
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :]) & (doc_ids[:, :, None] >= 0)
    return allowed


# ----------------------------------------------------------------------------- reference path


def _reference_attention(q, k, v, doc_ids, image_ids, causal, scale):
    """Dense additive ``-inf`` mask and one attention call, as the published code does."""
    length = q.shape[2]
    if doc_ids is None and image_ids is None:
        if not causal:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        # open_clip's text mask: a float [L, L] matrix, -inf above the diagonal
        mask = torch.full((length, length), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    allowed = dense_attention_mask(length, doc_ids=doc_ids, image_ids=image_ids, causal=causal, device=q.device)
    pad = None
    if doc_ids is not None:
        pad = doc_ids < 0
        # a padding row sees nothing; let it see itself so softmax stays finite, zero it below
        allowed = allowed | (torch.diag_embed(pad) if pad.any() else False)
    mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)
    if pad is not None:
        out = out.masked_fill(pad[:, None, :, None], 0.0)
    return out


# --------------------------------------------------------------------------------- torch path


def _runs(values: list[int]) -> list[tuple[int, int, int]]:
    """``(value, start, end)`` for each maximal run of equal values."""
    runs = []
    start = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            runs.append((values[start], start, i))
            start = i
    return runs


def _sdpa(q, k, v, **kwargs):
    """SDPA on ``[H, n, D]`` through a 4-D call: on the CPU only 4-D inputs take the flash kernel."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None], **kwargs)[0]


def _document_attention(q, k, v, image_row: Optional[list[int]], causal: bool, scale: float):
    """Attention inside one document ``[H, n, D]``; ``image_row`` holds its tokens' image ids."""
    if not causal:
        return _sdpa(q, k, v, scale=scale)
    images = [r for r in _runs(image_row) if r[0] >= 0] if image_row is not None else []
    if not images:
        return _sdpa(q, k, v, is_causal=True, scale=scale)
    if len({r[0] for r in images}) != len(images):
        # an image split into several runs sees later keys that are not a prefix: mask this document
        ids = torch.tensor(image_row, device=q.device)
        n = len(image_row)
        allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril_()
        allowed |= (ids[:, None] == ids[None, :]) & (ids[:, None] >= 0)
        return _sdpa(q, k, v, attn_mask=allowed, scale=scale)
    # Text rows see only earlier keys: plain causal attention is exact for them. The rows of an
    # image [a, b) see the whole prefix [0, b): recompute them without a mask.
    causal_out = _sdpa(q, k, v, is_causal=True, scale=scale)
    cuts = sorted({0, len(image_row)} | {c for _, a, b in images for c in (a, b)})
    sizes = [b - a for a, b in zip(cuts[:-1], cuts[1:])]
    image_ends = {a: b for _, a, b in images}
    pieces = []
    for start, q_part, out_part in zip(cuts, q.split(sizes, dim=1), causal_out.split(sizes, dim=1)):
        end = image_ends.get(start)
        pieces.append(out_part if end is None else _sdpa(q_part, k[:, :end], v[:, :end], scale=scale))
    return torch.cat(pieces, dim=1)


def _torch_attention(q, k, v, doc_ids, image_ids, causal, scale):
    """Exact attention without an ``L x L`` mask: one SDPA call per document of each row."""
    if doc_ids is None and (image_ids is None or not causal):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    batch, _, length, _ = q.shape
    doc_rows = doc_ids.tolist() if doc_ids is not None else [[0] * length] * batch
    image_rows = image_ids.tolist() if (image_ids is not None and causal) else [None] * batch
    # one split per tensor (never many slices: each slice's backward writes a full-size gradient)
    q_rows, k_rows, v_rows = q.unbind(0), k.unbind(0), v.unbind(0)
    rows = []
    for b in range(batch):
        docs, image_row = doc_rows[b], image_rows[b]
        runs = _runs(docs)
        valid = [r for r in runs if r[0] >= 0]
        if not valid:
            rows.append(q_rows[b] * 0)  # padding only (kept in the graph: zero gradients)
        elif len({r[0] for r in valid}) == len(valid):  # every document one contiguous run
            sizes = [end - start for _, start, end in runs]
            parts = zip(runs, q_rows[b].split(sizes, 1), k_rows[b].split(sizes, 1), v_rows[b].split(sizes, 1))
            rows.append(torch.cat([
                _document_attention(qd, kd, vd, image_row and image_row[start:end], causal, scale)
                if doc >= 0 else qd.new_zeros(qd.shape)
                for (doc, start, end), qd, kd, vd in parts
            ], dim=1))
        else:  # scattered documents: gather each, attend, scatter back
            positions: dict[int, list[int]] = {}
            for i, d in enumerate(docs):
                if d >= 0:
                    positions.setdefault(d, []).append(i)
            outs, index = [], []
            for pos in positions.values():
                idx = torch.tensor(pos, device=q.device)
                qd, kd, vd = (t[b].index_select(1, idx) for t in (q, k, v))
                doc_images = None if image_row is None else [image_row[i] for i in pos]
                outs.append(_document_attention(qd, kd, vd, doc_images, causal, scale))
                index.extend(pos)
            idx = torch.tensor(index, device=q.device)
            rows.append(q.new_zeros(q.shape[1:]).index_copy(1, idx, torch.cat(outs, dim=1)))
    return torch.stack(rows)


# ------------------------------------------------------- torch path with saved statistics (compile)
#
# Under torch.compile the per-document loop is one opaque custom op, so autograd cannot see the
# SDPA calls inside it. Rather than recompute the forward in the backward, the op keeps what
# SDPA's own backward keeps, the output and each row's log-sum-exp, and calls the CPU flash
# kernels' backward per document. A text row's output comes from the document's causal call; an
# image row's from its own call over the prefix. The causal call's backward gets the image rows'
# output gradient zeroed, which makes their softmax statistics irrelevant (dP = dO Vᵀ = 0 and
# D = rowsum(dO ∘ O) = 0 there), so the final output serves as that call's output.

_FLASH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _flash_plans(q, doc_ids, image_ids, causal) -> Optional[list[list[tuple[int, int, list[tuple[int, int]]]]]]:
    """Per row, ``(start, end, [(image start, image end), ...])`` of each document (image spans
    relative to the document), or None where the saved-statistics path does not apply (not on the
    CPU, a dtype the flash kernels lack, scattered documents, an image split into several runs)."""
    if q.device.type != "cpu" or q.dtype not in _FLASH_DTYPES:
        return None
    batch, _, length, _ = q.shape
    doc_rows = doc_ids.tolist() if doc_ids is not None else [[0] * length] * batch
    image_rows = image_ids.tolist() if (image_ids is not None and causal) else [None] * batch
    plans = []
    for docs, image_row in zip(doc_rows, image_rows):
        valid = [r for r in _runs(docs) if r[0] >= 0]
        if len({r[0] for r in valid}) != len(valid):
            return None
        row = []
        for _, start, end in valid:
            spans = [] if image_row is None else [r for r in _runs(image_row[start:end]) if r[0] >= 0]
            if len({r[0] for r in spans}) != len(spans):
                return None
            row.append((start, end, [(a, b) for _, a, b in spans]))
        plans.append(row)
    return plans


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def torch_attention_with_stats(q, k, v, doc_ids, image_ids, causal: bool, scale: float):
    """``(out, lse_text, lse_image)`` (``[B, H, L, D]``, ``[B, H, L]`` twice), or None (see :func:`_flash_plans`)."""
    plans = _flash_plans(q, doc_ids, image_ids, causal)
    if plans is None:
        return None
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    lse_text = q.new_zeros(q.shape[:3], dtype=_stats_dtype(q.dtype))
    lse_image = torch.zeros_like(lse_text)
    for b, row in enumerate(plans):
        for start, end, spans in row:
            qd, kd, vd = (t[b : b + 1, :, start:end] for t in (q, k, v))
            o, lse = flash(qd, kd, vd, 0.0, causal, scale=scale)
            out[b : b + 1, :, start:end] = o
            lse_text[b : b + 1, :, start:end] = lse
            for a, e in spans:  # image rows see the document's whole prefix up to the image's end
                o, lse = flash(qd[:, :, a:e], kd[:, :, :e], vd[:, :, :e], 0.0, False, scale=scale)
                out[b : b + 1, :, start + a : start + e] = o
                lse_image[b : b + 1, :, start + a : start + e] = lse
    return out, lse_text, lse_image


def torch_attention_backward(grad_out, q, k, v, out, lse_text, lse_image, doc_ids, image_ids, causal, scale):
    """``(dq, dk, dv)`` of :func:`torch_attention_with_stats` from its saved output and statistics."""
    plans = _flash_plans(q, doc_ids, image_ids, causal)
    assert plans is not None, "the forward saved statistics for these ids"
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    dq, dk, dv = (torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    for b, row in enumerate(plans):
        for start, end, spans in row:
            sl = (slice(b, b + 1), slice(None), slice(start, end))
            qd, kd, vd, od = q[sl], k[sl], v[sl], out[sl]
            go = grad_out[sl].contiguous()
            go_text = go.clone() if spans else go
            for a, e in spans:
                go_text[:, :, a:e] = 0
            gq, gk, gv = flash_bwd(go_text, qd, kd, vd, od, lse_text[sl], 0.0, causal, scale=scale)
            dq[sl], dk[sl], dv[sl] = gq, gk, gv
            for a, e in spans:
                gq, gk, gv = flash_bwd(
                    go[:, :, a:e].contiguous(), qd[:, :, a:e], kd[:, :, :e], vd[:, :, :e], od[:, :, a:e],
                    lse_image[b : b + 1, :, start + a : start + e], 0.0, False, scale=scale,
                )
                dq[b : b + 1, :, start + a : start + e] += gq
                dk[b : b + 1, :, start : start + e] += gk
                dv[b : b + 1, :, start : start + e] += gv
    return dq, dk, dv


# -------------------------------------------------------------------------------- triton path

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class _MetadataCache:
    """The last metadata built, reused while the same id tensors come back unmodified.

    Every layer of a model attends with the same ``doc_ids``/``image_ids``: building the
    per-token table once per forward instead of once per layer saves a dozen small launches.
    """

    def __init__(self) -> None:
        self.key = None
        self.refs: tuple = ()
        self.value = None

    def get(self, doc_ids, image_ids, causal: bool, length: int):
        from lcl_fast.kernels.attention_launch import prepare_metadata

        tensors = (doc_ids, image_ids)
        key = (causal, length) + tuple(None if t is None else (t._version, t.device) for t in tensors)
        if self.key == key and all(
            (r is None and t is None) or (r is not None and r() is t) for r, t in zip(self.refs, tensors)
        ):
            return self.value
        value = prepare_metadata(doc_ids, image_ids, causal, length)
        self.key, self.value = key, value
        self.refs = tuple(None if t is None else weakref.ref(t) for t in tensors)
        return value


_metadata = _MetadataCache().get


# ----------------------------------------------------------------------------------- entry


def interleaved_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    doc_ids: Optional[torch.Tensor] = None,
    image_ids: Optional[torch.Tensor] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    impl: str = "auto",
    blocks: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """Softmax attention ``[B, H, L, D]`` under document, causal and image-block masking.

    Args:
        q, k, v: ``[B, H, L, D]``, one dtype and device (any strides).
        doc_ids: ``[B, L]`` integers; tokens attend only within their document; negative
            ids are padding (never attended to; their output is zero).
        image_ids: ``[B, L]`` integers; with ``causal``, tokens of one image (same
            non-negative id) see each other in both directions; ``-1`` for text.
        causal: key j is visible to query i only when j <= i (image blocks excepted).
        softmax_scale: multiplies ``q k^T``; default ``D ** -0.5``.
        impl: ``"auto" | "triton" | "torch" | "reference"`` (see :mod:`lcl_fast._impl`);
            ``"auto"`` falls back to ``"torch"`` for dtypes the kernel lacks (float64).
        blocks: ``(BLOCK_M, BLOCK_N)`` for the Triton kernels (tests); default: the audited tile
            (``LCL_FAST_AUTOTUNE=1``: autotuned).

    Returns:
        ``[B, H, L, D]`` in the dtype of ``q``.
    """
    _check_inputs(q, k, v, doc_ids, image_ids)
    explicit_triton = impl == "triton"
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    impl = resolve_impl(impl, q, k, v)
    if impl == "triton" and q.dtype not in _TRITON_DTYPES:
        if not explicit_triton:
            impl = "torch"
        else:
            raise ValueError(f"impl='triton' supports {_TRITON_DTYPES}, got {q.dtype}")
    if impl == "reference":
        return _reference_attention(q, k, v, doc_ids, image_ids, causal, scale)
    compiling = torch.compiler.is_compiling()
    if impl == "torch":
        if compiling and (doc_ids is not None or (image_ids is not None and causal)):
            # per-document loops read the ids on the host: one opaque custom op in a compiled graph
            return attention_torch_op(q, k, v, doc_ids, image_ids, causal, scale)
        return _torch_attention(q, k, v, doc_ids, image_ids, causal, scale)
    if compiling:  # traced once per graph: no cache (it keys on tensor identity)
        from lcl_fast.kernels.attention_launch import prepare_metadata

        meta = prepare_metadata(doc_ids, image_ids, causal, q.shape[2])
    else:
        meta = _metadata(doc_ids, image_ids, causal, q.shape[2])
    return attention_triton_op(q, k, v, meta, scale, blocks)

# ============================================================================ custom ops
# Registered at import (namespace lcl_fast; see lcl_fast.ops.library): torch.compile keeps each one whole.

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





@torch.library.custom_op("lcl_fast::attention_torch_fwd", mutates_args=())
def attention_torch_fwd(q: Tensor, k: Tensor, v: Tensor, doc_ids: Optional[Tensor], image_ids: Optional[Tensor],
                        causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The torch path's exact per-document attention ``[B, H, L, D]`` (contiguous), with the
    log-sum-exp of its text and image rows ``[B, H, L]`` (:func:`torch_attention_with_stats`;
    zeros where the backward recomputes instead)."""
    saved = torch_attention_with_stats(q, k, v, doc_ids, image_ids, causal, scale)
    if saved is not None:
        return saved
    out = _torch_attention(q, k, v, doc_ids, image_ids, causal, scale).contiguous()
    lse = q.new_zeros(q.shape[:3], dtype=_stats_dtype(q.dtype))
    return out, lse, lse.clone()


@attention_torch_fwd.register_fake
def _(q, k, v, doc_ids, image_ids, causal, scale):
    lse = q.new_empty(q.shape[:3], dtype=_stats_dtype(q.dtype))
    return q.new_empty(q.shape), lse, lse.new_empty(lse.shape)


@torch.library.custom_op("lcl_fast::attention_torch_bwd", mutates_args=())
def attention_torch_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse_text: Tensor,
                        lse_image: Tensor, doc_ids: Optional[Tensor], image_ids: Optional[Tensor], causal: bool,
                        scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv: from the saved output and statistics (CPU flash kernels' backward), or, where
    the forward saved none, by recomputing the forward under autograd."""
    if _flash_plans(q, doc_ids, image_ids, causal) is not None:
        return torch_attention_backward(grad_out, q, k, v, out, lse_text, lse_image, doc_ids, image_ids,
                                          causal, scale)
    with autograd_inside_op():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = _torch_attention(*leaves, doc_ids, image_ids, causal, scale)
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
