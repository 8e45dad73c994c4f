"""Attention over interleaved sequences, forward + backward, at the published text-model shapes.

- MMC4 (B/32 text model): L = 2048, width 512, 8 heads, 4 documents packed per row
  (block-diagonal causal mask), the shape of the kernel targets.
- B/16 LAION: L = 280, width 768, 12 heads, plain causal mask.

Contenders: ``reference`` (dense additive mask, as the published code), lcl-fast's ``torch``
and ``triton`` paths, and when present on CUDA: FlexAttention (``torch.compile``d, block mask
built from the document ids inside the timed call), FlashAttention-2 ``flash_attn_varlen_func``
(``cu_seqlens`` from the document ids inside the timed call) and xformers
``BlockDiagonalCausalMask``. Each gets its inputs in its own native layout, made outside the
timed call.

Throughput: tokens/s, and TFLOP/s counting 4·B·H·L²·D forward FLOPs halved for causality
(the usual convention; document masking is not subtracted) and 2.5× that for the backward.
"""

from __future__ import annotations

import functools
from typing import Callable

import pytest
import torch

from benchmarks import _harness as h

# name, batch, length, heads, head_dim, documents per row (0: no document ids)
CASES = h.by_scale(
    smoke=[("mmc4", 1, 256, 2, 64, 4), ("laion_b16", 2, 64, 2, 64, 0)],
    small=[("mmc4", 1, 2048, 8, 64, 4), ("laion_b16", 8, 280, 12, 64, 0)],
    full=[("mmc4", 8, 2048, 8, 64, 4), ("laion_b16", 128, 280, 12, 64, 0)],
)
IMPLS = ["reference", "torch", "triton", "flex_attention", "flash_attn", "xformers"]


def document_ids(batch: int, length: int, docs: int, gen: torch.Generator) -> torch.Tensor:
    """``[B, L]`` ids of ``docs`` contiguous documents per row, random lengths (seeded)."""
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(length - 1, generator=gen)[: docs - 1] + 1
        bounds = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([length])])
        rows.append(torch.repeat_interleave(torch.arange(docs), bounds.diff()))
    return torch.stack(rows)


def _segments(doc_ids: torch.Tensor) -> torch.Tensor:
    """Lengths of the runs of equal ids, row after row (``[n_segments]``, on the ids' device)."""
    flat = doc_ids.flatten()
    new = torch.ones_like(flat, dtype=torch.bool)
    new[1:] = flat[1:] != flat[:-1]
    new[:: doc_ids.shape[1]] = True  # every row starts a segment
    starts = new.nonzero().flatten()
    return torch.diff(starts, append=torch.tensor([flat.numel()], device=flat.device))


def _lcl(impl: str) -> Callable:
    h.require_impl(impl)
    interleaved_attention = h.import_or_skip("lcl_fast.ops.attention", "interleaved_attention")
    return functools.partial(interleaved_attention, impl=impl)


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _contender(impl: str, batch: int, length: int, heads: int, dim: int, doc_ids: torch.Tensor | None):
    """(layout of q/k/v, function(q, k, v) -> out) for one contender."""
    if impl in ("reference", "torch", "triton"):
        attend = _lcl(impl)
        if doc_ids is None:
            return "bhld", lambda q, k, v: attend(q, k, v, causal=True)
        # A fresh ids tensor per call: the Triton path caches its metadata per tensor, and FlexAttention
        # below rebuilds its block mask every call, so both pay for their mask construction in the timing.
        return "bhld", lambda q, k, v: attend(q, k, v, doc_ids=doc_ids.clone(), causal=True)
    if not h.on_cuda():
        pytest.skip(f"{impl} is benchmarked on CUDA only")
    if impl == "flex_attention":
        fa = h.import_or_skip("torch.nn.attention.flex_attention", reason=" (needs torch >= 2.5)")
        flex = _compiled_flex()
        # One mask_mod object for every call: a new closure per call would make the compiled
        # flex_attention recompile. The block mask itself is rebuilt in the timed call, as a
        # trainer must do for every batch of new documents.
        if doc_ids is None:
            def mask_mod(b, hd, qi, ki):
                return qi >= ki
        else:
            def mask_mod(b, hd, qi, ki):
                return (qi >= ki) & (doc_ids[b, qi] == doc_ids[b, ki])

        def flex_call(q, k, v):
            block_mask = fa.create_block_mask(mask_mod, batch, None, length, length, device=q.device)
            return flex(q, k, v, block_mask=block_mask)

        return "bhld", flex_call
    if impl == "flash_attn":
        flash = h.import_or_skip("flash_attn", reason=" (pip install flash-attn)")
        if doc_ids is None:
            return "blhd", lambda q, k, v: flash.flash_attn_func(q, k, v, causal=True)

        def varlen(q, k, v):
            seqlens = _segments(doc_ids)
            cu = torch.nn.functional.pad(seqlens.cumsum(0), (1, 0)).to(torch.int32)
            longest = int(seqlens.max())
            return flash.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True)

        return "thd", varlen
    if impl == "xformers":
        fmha = h.import_or_skip("xformers.ops.fmha", reason=" (pip install xformers)")
        if doc_ids is None:
            return "blhd", lambda q, k, v: fmha.memory_efficient_attention(
                q, k, v, attn_bias=fmha.attn_bias.LowerTriangularMask()
            )

        def block_diagonal(q, k, v):
            bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(_segments(doc_ids).tolist())
            return fmha.memory_efficient_attention(q, k, v, attn_bias=bias)

        return "1thd", block_diagonal
    raise ValueError(f"unknown contender {impl!r}")


def _tensor(layout: str, batch: int, length: int, heads: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    shape = {
        "bhld": (batch, heads, length, dim),
        "blhd": (batch, length, heads, dim),
        "thd": (batch * length, heads, dim),
        "1thd": (1, batch * length, heads, dim),
    }[layout]
    x = torch.randn(shape, generator=gen, device=h.device(), dtype=h.compute_dtype())
    return x.requires_grad_()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_attention(benchmark, impl: str, case: tuple) -> None:
    name, batch, length, heads, dim, docs = case
    doc_ids = document_ids(batch, length, docs, torch.Generator().manual_seed(0)) if docs else None
    if doc_ids is not None:
        doc_ids = doc_ids.to(h.device())
    layout, attend = _contender(impl, batch, length, heads, dim, doc_ids)
    gen = h.generator(0)
    q, k, v, grad_out = (_tensor(layout, batch, length, heads, dim, gen) for _ in range(4))
    grad_out = grad_out.detach()

    def fwd_bwd():
        out = attend(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    dtype = str(h.compute_dtype()).removeprefix("torch.")
    fwd_flop = 4.0 * batch * heads * length * length * dim * 0.5
    h.measure(
        benchmark,
        fwd_bwd,
        group=f"attention fwd+bwd {name} B={batch} L={length} H={heads} D={dim} docs/row={docs or 1} {dtype}",
        impl=impl,
        work={"tokens": batch * length, "flop": 3.5 * fwd_flop},
        params={"op": "attention", "case": name, "batch": batch, "length": length, "heads": heads,
                "head_dim": dim, "docs_per_row": docs or 1, "dtype": dtype},
    )
