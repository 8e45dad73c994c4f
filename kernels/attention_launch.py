"""Host side of :mod:`lcl_fast.kernels.attention`: the mask metadata, tile choice and launchers.

``prepare_metadata`` turns document / image ids into the int32 table the kernels read
(O(B L) work, no host sync); ``attention_forward`` / ``attention_backward`` check shapes,
pick the tiles and launch.

Tiles: by default the target's first candidate (:func:`~lcl_fast.kernels.tiles.attention_tile`),
the tile the ahead-of-time audit compiled for the device (``benchmarks/aot_audit.json``): no
autotuning, so training and evaluation start without compiling alternatives and every new text
length costs one compile, not five. ``LCL_FAST_AUTOTUNE=1`` autotunes per (L, head dim, mask flags,
dtype) over the candidates :func:`~lcl_fast.kernels.tiles.attention_candidates` keeps for the
device's compute capability and shared memory (pruned before anything compiles). Triton's
autotuner caches its pick per key, not per device: a process driving two different GPU models
should leave autotuning off.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from lcl_fast.kernels import tiles
from lcl_fast.kernels.attention import _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_dq, _attn_fwd

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


# --------------------------------------------------------------------------------- launchers

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TUNE_KEY = ["L", "HEAD_DIM", "IS_CAUSAL", "HAS_DOC", "HAS_IMG"]
_KERNELS = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}
# the interpreter runs numpy per tile op: one fixed, moderate tile keeps the tests quick
_INTERPRETER_BLOCKS = (32, 32)


def _autotune_space() -> list[tiles.AttnTile]:
    """Every tile any target may try: the autotuner prunes it per device before compiling."""
    space: list[tiles.AttnTile] = [tiles.SMALLEST_ATTN_TILE]
    for target in tiles.AOT_TARGETS.values():
        for kind in _KERNELS:
            for dtype in _DTYPES:
                for head_dim in (32, 64, 128, 256):
                    space += [t for t in tiles.attention_candidates(target, kind, dtype, head_dim) if t not in space]
    return space


def _pruner(kind: str, target: Optional[tiles.Target] = None):
    """Keep the candidates of ``target`` (default: the device of ``Q``) for the key's dtype and head dim."""

    def prune(configs, named_args, **kwargs):
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 64))
        q = named_args["Q"]
        where = target or tiles.device_target(q.device)
        keep = tiles.attention_candidates(where, kind, q.dtype, head_dim)
        kept = [c for c in configs
                if tiles.AttnTile(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep]
        return kept or configs[:1]  # the smallest tile: fits anywhere

    return prune


@functools.cache
def _tuned(kind: str):
    """The autotuned version of a kernel, built on first use (never at import)."""
    configs = [triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n}, num_warps=t.num_warps,
                             num_stages=t.num_stages) for t in _autotune_space()]
    return triton.autotune(configs=configs, key=_TUNE_KEY,
                           prune_configs_by={"early_config_prune": _pruner(kind)})(_KERNELS[kind])


def _autotune() -> bool:
    """Opt-in (``LCL_FAST_AUTOTUNE=1``): by default the launchers run the audited tile."""
    return not triton_interpreter() and os.environ.get("LCL_FAST_AUTOTUNE", "0") == "1"


def _default_blocks(kind: str, q: torch.Tensor) -> tiles.AttnTile:
    """The tile when autotuning is off: the target's default (:func:`tiles.attention_tile`)."""
    if triton_interpreter():
        return tiles.AttnTile(*_INTERPRETER_BLOCKS, 4, 1)
    return tiles.attention_tile(tiles.device_target(q.device), kind, q.dtype, q.shape[-1])


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
    """Run ``kernel`` autotuned, or with ``blocks`` (BLOCK_M, BLOCK_N) / the target's default tiles.

    One program per (row tile, batch·head), folded into grid dimension 0 (tile fastest, as a
    2-D grid would order them) so that B·H may exceed the 65535 of grid dimension 1.
    """
    q = args[0]
    if blocks is None and _autotune():
        row_block = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
        with tiles.device_guard(q):
            _tuned(kind)[lambda meta: (triton.cdiv(grid_rows, meta[row_block]) * batch_heads,)](*args, **consts)
        return
    if blocks is None:
        block_m, block_n, warps, stages = _default_blocks(kind, q)
    else:
        (block_m, block_n), warps, stages = blocks, 4, 2
    row_block = block_n if kind == "dkdv" else block_m
    with tiles.device_guard(q):
        kernel[(triton.cdiv(grid_rows, row_block) * batch_heads,)](
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

    ``blocks=(BLOCK_M, BLOCK_N)`` fixes the tiles (tests); otherwise the device's audited tile
    (autotuned with ``LCL_FAST_AUTOTUNE=1``).
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
    if triton_interpreter():
        pre = tiles.AttnTile(32, 0, 4, 1)
    else:
        pre = tiles.delta_tile(tiles.device_target(q.device), q.dtype, head_dim)
    with tiles.device_guard(q):
        _attn_bwd_delta[(triton.cdiv(length, pre.block_m) * batch * heads,)](
            out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, length,
            HEAD_DIM=head_dim, BLOCK_D=consts["BLOCK_D"], BLOCK_M=pre.block_m, num_warps=pre.num_warps,
            num_stages=pre.num_stages,
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
