"""Which tiles each Triton kernel runs with on which GPU: one pure function per kernel.

A *target* is what decides whether a tile fits: the compute capability (which instructions and
register allocator, sm_90's wgmma keeping operands in shared memory) and the shared memory one
block may opt in to. The tile functions take (target, dtype, head dim or model dim) and nothing
else, so the launchers (which read the live device's target) and the ahead-of-time audit
(``python -m benchmarks.aot_audit``, which compiles for :data:`AOT_TARGETS` without a GPU) use
the very same choice. Nothing here touches a device at import time.

How the tables were chosen: candidates compiled with Triton 3.9's bundled ptxas for sm_80,
sm_86 and sm_90 at head dims 64 and 128 with every mask flag on (the most live registers). On
sm_80/86/89 (mma.sync: both operands and the float32 accumulators in registers, 255 per thread
at most) the default tiles compile without spills and with registers to spare (at most 240 at
head dim 64, where sm_90's tiles hit 255 and spill); sm_90 (wgmma, operands in shared memory)
keeps the tiles it was tuned for, except the 16-bit dkdv at head dim 64: its 64×128 tile spills
8 B at 255 registers under Triton 3.6 (ptxas 12.8, the GPU image's), so 32×128 (196-202
registers under both releases) leads. The others in each list are autotuning alternatives. Every
list is filtered by :func:`attention_shared_bytes`, an upper bound on what Triton allocates,
against the target's limit: on sm_86/89 (99 KiB) the deeper pipelines that sm_80 (163 KiB) and
sm_90 (227 KiB) afford drop out by themselves. ``benchmarks/aot_audit.json`` holds what the
compiler reported for the defaults on all four targets, under Triton 3.6 and 3.9.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import NamedTuple, Union

import torch

__all__ = [
    "AOT_TARGETS", "AttnTile", "GemmTile", "Target", "attention_candidates", "attention_shared_bytes",
    "attention_tile", "contrastive_tile", "delta_tile", "device_guard", "device_target", "dtype_name",
    "float32_dot_precision", "lm_head_tile",
]


@dataclass(frozen=True)
class Target:
    """A GPU as the compiler sees it: ``arch`` = 10·major + minor, ``shared_limit`` in bytes per block."""

    arch: int
    shared_limit: int

    @property
    def name(self) -> str:
        return f"sm_{self.arch}"


# The GPUs people train on, with their opt-in shared memory per block (CUDA programming guide,
# "compute capabilities" table): A100, RTX 30xx / A10 / A40, L4 / L40 / RTX 40xx, H100 / H200.
AOT_TARGETS = {
    "sm_80": Target(80, 166912),
    "sm_86": Target(86, 101376),
    "sm_89": Target(89, 101376),
    "sm_90": Target(90, 232448),
}


class AttnTile(NamedTuple):
    """Attention tiles: ``block_m`` queries × ``block_n`` keys per step."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


class GemmTile(NamedTuple):
    """A ``block_m × block_n`` output tile reduced over the model dim in steps of ``block_k``."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


DType = Union[str, torch.dtype]
_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_ITEMSIZE = {"fp16": 2, "bf16": 2, "fp32": 4}


def dtype_name(dtype: DType) -> str:
    """``"fp16" | "bf16" | "fp32"`` for a torch dtype or one of those names."""
    name = _NAMES.get(dtype, dtype)
    if name not in _ITEMSIZE:
        raise ValueError(f"the Triton kernels take float16, bfloat16 or float32, got {dtype}")
    return name


# --------------------------------------------------------------------------- the live device


@functools.cache
def _live_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    shared = getattr(props, "shared_memory_per_block_optin", 0)
    if not shared:  # older torch: ask Triton's driver (the same cuDeviceGetAttribute)
        import triton

        shared = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return Target(10 * props.major + props.minor, int(shared))


def device_target(device: Union[torch.device, int, None] = None) -> Target:
    """The target of a CUDA device (default: the current one), read from the driver once per device."""
    if isinstance(device, torch.device):
        device = device.index
    return _live_target(torch.cuda.current_device() if device is None else int(device))


def float32_dot_precision() -> str:
    """``"tf32"`` when torch's own float32 matmuls may use TF32, else ``"ieee"`` (exact).

    Reads whichever API the user set: torch >= 2.9's ``torch.backends.cuda.matmul.fp32_precision``
    (or the global ``torch.backends.fp32_precision`` it inherits) when not ``"none"``, else the legacy
    ``allow_tf32``. Reading the legacy flag after the new API was used raises ("mix of the legacy
    and new APIs"); the legacy setters also update the new value, so this order never mixes them.
    """
    matmul = torch.backends.cuda.matmul
    new = getattr(matmul, "fp32_precision", None)
    if new is not None and new != "none":
        return "tf32" if new == "tf32" else "ieee"
    return "tf32" if matmul.allow_tf32 else "ieee"


def device_guard(x: torch.Tensor):
    """Run under ``x``'s device: Triton launches on the current CUDA device, not on the tensors' one."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


# ---------------------------------------------------------------------------------- attention

# Ordered candidates per (family, kind, operand width, BLOCK_D): the first that fits shared
# memory is the default tile, all that fit are the autotuning space. "hopper" is sm_90 (wgmma,
# operands from shared memory, so few registers); "ampere" is sm_80/86/89 (mma.sync, both
# operands and the float32 accumulators in registers: 255 registers per thread at most).
_H, _A = "hopper", "ampere"
_ATTN = {
    # 16-bit operands, head dim 64
    (_H, "fwd", 2, 64): [(128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
    (_H, "dkdv", 2, 64): [(32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 8, 3), (32, 64, 8, 3), (64, 128, 8, 2)],
    (_H, "dq", 2, 64): [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
    (_A, "fwd", 2, 64): [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3)],
    (_A, "dkdv", 2, 64): [(32, 128, 8, 3), (32, 64, 8, 3), (64, 128, 8, 3), (32, 32, 4, 2)],
    (_A, "dq", 2, 64): [(128, 16, 8, 3), (32, 64, 8, 3), (128, 32, 8, 3), (32, 32, 4, 3)],
    # 16-bit operands, head dims 65..128 (80, 96, 128)
    (_H, "fwd", 2, 128): [(128, 64, 8, 3), (128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)],
    (_H, "dkdv", 2, 128): [(32, 64, 8, 3), (32, 128, 8, 3), (64, 64, 8, 3), (32, 64, 8, 2)],
    (_H, "dq", 2, 128): [(128, 64, 8, 3), (64, 64, 8, 3), (128, 32, 8, 3), (64, 32, 8, 3)],
    (_A, "fwd", 2, 128): [(64, 32, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3), (32, 32, 4, 3)],
    (_A, "dkdv", 2, 128): [(32, 64, 8, 3), (32, 64, 8, 2), (64, 64, 8, 3), (32, 32, 8, 3)],
    (_A, "dq", 2, 128): [(64, 32, 8, 3), (64, 32, 8, 2), (32, 64, 8, 3), (32, 32, 4, 3)],
    # float32 operands (exact dots on the FMA units, operands in registers: a checking path,
    # 8 warps to spread them), any family
    ("any", "fwd", 4, 64): [(32, 32, 8, 2), (32, 32, 4, 2)],
    ("any", "dkdv", 4, 64): [(32, 32, 8, 2), (16, 32, 4, 2)],
    ("any", "dq", 4, 64): [(32, 32, 8, 2), (32, 16, 4, 2)],
    ("any", "fwd", 4, 128): [(32, 32, 8, 2), (16, 32, 4, 2)],
    ("any", "dkdv", 4, 128): [(16, 32, 8, 2), (16, 16, 4, 2)],
    ("any", "dq", 4, 128): [(32, 16, 8, 2), (16, 16, 4, 2)],
}
_KINDS = ("fwd", "dkdv", "dq")
# the last resort when nothing in a list fits (head dim 256 at float32): always within 99 KiB
SMALLEST_ATTN_TILE = AttnTile(16, 16, 4, 1)


def _block_d(head_dim: int) -> int:
    return max(16, 1 << (max(head_dim, 1) - 1).bit_length())


def attention_shared_bytes(target: Target, kind: str, tile: AttnTile, dtype: DType, head_dim: int) -> int:
    """An upper bound on the shared memory Triton gives one program of ``kind`` with ``tile``.

    The two streamed tiles (k, v or q, dO) are buffered ``num_stages`` deep; the resident tiles
    (q, or k and v, or q and dO) pass through shared memory once for their layout change (on
    sm_90 they stay there as wgmma operands). The audit checks this bound against the compiler.
    """
    isz = _ITEMSIZE[dtype_name(dtype)]
    row = _block_d(head_dim) * isz
    stream_rows, resident_rows, n_resident = {
        "fwd": (tile.block_n, tile.block_m, 1), "dkdv": (tile.block_m, tile.block_n, 2),
        "dq": (tile.block_n, tile.block_m, 2)}[kind]
    streamed = 2 * tile.num_stages * stream_rows * row
    if kind == "dkdv":
        streamed += 2 * tile.num_stages * tile.block_m * 4  # the streamed logsumexp and delta rows
    scores = tile.block_m * tile.block_n * isz if kind != "fwd" else 0  # dS or P re-laid out
    return streamed + n_resident * resident_rows * row + scores


def _family(target: Target) -> str:
    # sm_100 (tcgen05) is closer to sm_90 than to mma.sync; sm_120 (consumer Blackwell) is not
    return _H if 90 <= target.arch < 120 else _A


def attention_candidates(target: Target, kind: str, dtype: DType, head_dim: int) -> list[AttnTile]:
    """The tiles of ``kind`` (``"fwd" | "dkdv" | "dq"``) that fit ``target``, best first (never empty)."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    isz = _ITEMSIZE[dtype_name(dtype)]
    block_d = _block_d(head_dim)
    key_d = 64 if block_d <= 64 else 128
    family = "any" if isz == 4 else _family(target)
    tiles = [AttnTile(*t) for t in _ATTN[(family, kind, isz, key_d)]]
    if block_d > 128:  # head dims up to 256: halve the tiles (the same registers per row of D)
        tiles = list(dict.fromkeys(AttnTile(max(16, t.block_m // 2), max(16, t.block_n // 2), t.num_warps,
                                            t.num_stages) for t in tiles))
    fits = [t for t in tiles if attention_shared_bytes(target, kind, t, dtype, head_dim) <= target.shared_limit]
    return fits or [SMALLEST_ATTN_TILE]


def attention_tile(target: Target, kind: str, dtype: DType, head_dim: int) -> AttnTile:
    """The default tile of ``kind`` on ``target`` (what runs when autotuning is off)."""
    return attention_candidates(target, kind, dtype, head_dim)[0]


def delta_tile(target: Target, dtype: DType, head_dim: int) -> AttnTile:
    """Rows per program of the backward's ``delta = rowsum(dO·O)`` pre-pass (no dots, no pipeline).

    Two float32 ``[block_m, BLOCK_D]`` tiles in registers: 32 values per thread per tile at 4 warps.
    """
    block_m = max(16, 64 * 64 // _block_d(head_dim))
    return AttnTile(block_m, 0, 4, 1)


# ------------------------------------------------------------------------ contrastive, LM head

# One float32 [block_m, block_n] accumulator plus the operand tiles; 16-bit tiles keep the
# tensor cores busy, float32 ones run on the FMA units (IEEE) or TF32 tensor cores. The
# contrastive tiles keep ``block_n`` on every target: the loss aligns its column chunks to it.
# Float32 entries: the smaller ones spill a few bytes (ptxas caps them at 128 registers).
_CONTRASTIVE = {
    (_H, 2): GemmTile(128, 128, 64, 8, 3), (_A, 2): GemmTile(128, 128, 32, 8, 3),
    (_H, "tf32"): GemmTile(128, 64, 32, 8, 3), (_A, "tf32"): GemmTile(128, 64, 32, 8, 3),
    (_H, "ieee"): GemmTile(64, 64, 32, 4, 3), (_A, "ieee"): GemmTile(64, 64, 16, 4, 3),
}
_LM_HEAD = {
    ("forward", _H, 2): GemmTile(128, 128, 64, 8, 3), ("forward", _A, 2): GemmTile(128, 128, 32, 8, 3),
    ("backward", _H, 2): GemmTile(128, 128, 32, 8, 3), ("backward", _A, 2): GemmTile(128, 128, 32, 8, 2),
    ("forward", _H, 4): GemmTile(64, 128, 32, 8, 2), ("forward", _A, 4): GemmTile(64, 128, 32, 8, 2),
    ("backward", _H, 4): GemmTile(64, 128, 16, 8, 2), ("backward", _A, 4): GemmTile(64, 128, 16, 8, 2),
}


def gemm_shared_bytes(tile: GemmTile, dtype: DType) -> int:
    """Shared memory of the pipelined ``[block_m, block_k] × [block_k, block_n]`` operand loop.

    Only what decides the pipeline depth: the LM-head backward's extra dots need more, which the
    audit measures (``benchmarks/aot_audit.json``).
    """
    isz = _ITEMSIZE[dtype_name(dtype)]
    return tile.num_stages * (tile.block_m + tile.block_n) * tile.block_k * isz


def _fit_stages(target: Target, tile: GemmTile, dtype: DType) -> GemmTile:
    while tile.num_stages > 1 and gemm_shared_bytes(tile, dtype) > target.shared_limit:
        tile = tile._replace(num_stages=tile.num_stages - 1)
    return tile


def contrastive_tile(target: Target, dtype: DType, dim: int, precision: str = "ieee") -> GemmTile:
    """Tiles of the contrastive kernels (``_lse``, ``_label_logits``, ``_grad_logits``); ``dim`` = d.

    ``precision`` (``"ieee" | "tf32"``) matters for float32 only.
    """
    name = dtype_name(dtype)
    key = 2 if name != "fp32" else ("tf32" if precision == "tf32" else "ieee")
    return _fit_stages(target, _CONTRASTIVE[(_family(target), key)], name)


def lm_head_tile(target: Target, kernel: str, dtype: DType, dim: int) -> GemmTile:
    """Tiles of the LM-head kernels (``kernel``: ``"forward" | "backward"``): tokens × vocab × D step."""
    if kernel not in ("forward", "backward"):
        raise ValueError(f"kernel must be 'forward' or 'backward', got {kernel!r}")
    name = dtype_name(dtype)
    return _fit_stages(target, _LM_HEAD[(kernel, _family(target), _ITEMSIZE[name])], name)
