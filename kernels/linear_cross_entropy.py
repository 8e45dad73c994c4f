"""Triton kernels for the fused linear + cross-entropy (the LM head's loss without logits).

Algorithm (Cut Cross-Entropy style, arXiv 2411.09009), for ``logits = H @ W.T``,
``H [T, D]``, ``W [V, D]``:

- ``_lse_forward_kernel``, grid ``(ceil(T / BLOCK_T), splits)``: each program owns a block of
  tokens and one contiguous slice of the vocabulary, walks that slice in ``[BLOCK_T, BLOCK_V]``
  logit tiles (``tl.dot`` over ``D`` in ``BLOCK_D`` steps, float32 accumulation), keeps an online
  max / sum-exp per token and picks up the label's logit when the label falls in its slice. It
  writes one partial log-sum-exp per split; the launcher merges the splits with a
  ``torch.logsumexp`` over a ``[splits, T]`` tensor. Splitting the vocabulary keeps the GPU busy
  when ``T`` is small; each token's label logit has exactly one writer, so no atomics.
- ``_backward_kernel``, grid ``ceil(T / BLOCK_T) * ceil(V / BLOCK_V)`` (grouped so neighbouring
  programs share token blocks): each program recomputes one logit tile, forms
  ``G = (softmax - onehot) * token_scale`` in registers, then for every ``BLOCK_D`` slice adds
  ``G @ W[v-block]`` into ``dH[t-block]`` and ``G.T @ H[t-block]`` into ``dW[v-block]`` with
  float32 atomics (relaxed): four matmul-sized passes in all (one forward, three backward).
  Token blocks whose scale is all zero (every token ignored) return at once.

Memory: nothing of size ``T * V`` exists; besides the inputs, the kernels need the
``[splits, T]`` partial log-sum-exps, the label logits, and float32 ``dH [T, D]`` and
``dW [V, D]`` accumulators (the gradients themselves for float32 inputs).

Why atomics rather than two backward kernels (one over token blocks for ``dH``, one over vocab
blocks for ``dW``, each accumulating in registers): that variant is deterministic but recomputes
the logits twice (five matmul-sized passes instead of four) and, at D = 512..768, its
``[BLOCK_T, D]`` register accumulators would spill. The atomics cost ``T*D*V/BLOCK_V`` +
``V*D*T/BLOCK_T`` float32 adds, hence the large 128x128 tiles.

Known limits: float atomics make the gradients' last bits depend on scheduling (run-to-run
differences of about one float32 ulp of the accumulated sums); no gradient filtering (CCE
skips tiles whose softmax is below the output precision), so the backward does the full work
and the results are exact up to rounding; labels outside ``[0, V)`` that are not ignored are
not detected here (the label logit stays 0). The GPU blocks are chosen per target by
:func:`lcl_fast.kernels.tiles.lm_head_tile`; ``python -m benchmarks.aot_audit`` checks, with the
wheel's ptxas and no GPU, that they compile for sm_80/86/89/90 without register spills and fit
in shared memory. They are untuned: no GPU was at hand. Nor is the atomics' cost measured: on
sm_80/86/89 float atomics are scalar (four-wide only on sm_90), one per ``BLOCK_V`` (dH) or
``BLOCK_T`` (dW) multiply-adds of a tile; whether they bound the backward awaits a GPU run
(``benchmarks/bench_generation_loss.py``) before trading them for partial sums.
Under ``TRITON_INTERPRET=1`` ``tl.dot`` on bfloat16 operands is wrong in Triton 3.9's
interpreter, so there (only) the operands are upcast to float32 before the dot (``UPCAST``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from lcl_fast.kernels import tiles

from lcl_fast._impl import triton_interpreter

# Blocks for the compiled path: :func:`lcl_fast.kernels.tiles.lm_head_tile` per device target
# (block_t, block_v, block_d = its block_m, block_n, block_k). The interpreter gets small blocks
# so that CPU tests cover many tiles, partial last tiles included, and several vocabulary splits.
INTERPRETER_BLOCKS = {"block_t": 16, "block_v": 32, "block_d": 16, "num_warps": 4, "num_stages": 1}
INTERPRETER_VOCAB_SPLITS = 3
_GROUP_T = 8  # token blocks that sweep the vocabulary together in the backward (L2 reuse)


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, offs_t, offs_v, mask_t, mask_v, D,
    stride_ht, stride_hd, stride_wv, stride_wd,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """``H[offs_t] @ W[offs_v].T`` as a float32 ``[BLOCK_T, BLOCK_V]`` tile (masked rows/cols are 0)."""
    acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    h_rows = h_ptr + offs_t.to(tl.int64)[:, None] * stride_ht
    w_cols = w_ptr + offs_v.to(tl.int64)[None, :] * stride_wv
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=mask_t[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_cols + offs_d[:, None] * stride_wd, mask=mask_d[:, None] & mask_v[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _lse_forward_kernel(
    h_ptr, w_ptr, labels_ptr, lse_part_ptr, label_logit_ptr,
    T, V, D, vocab_per_split, ignore_index,
    stride_ht, stride_hd, stride_wv, stride_wd,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    labels = tl.load(labels_ptr + offs_t, mask=mask_t, other=ignore_index)
    v_begin = pid_s * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, V)

    row_max = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    sum_exp = tl.zeros([BLOCK_T], dtype=tl.float32)
    label_logit = tl.zeros([BLOCK_T], dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        logits = _logits_tile(
            h_ptr, w_ptr, offs_t, offs_v, mask_t, mask_v, D,
            stride_ht, stride_hd, stride_wv, stride_wd,
            BLOCK_T, BLOCK_V, BLOCK_D, DOT_PRECISION, UPCAST,
        )
        logits = tl.where(mask_v[None, :], logits, float("-inf"))
        # every tile holds at least one real column, so new_max is finite and exp(-inf) = 0 is safe
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        row_max = new_max
        is_label = offs_v[None, :] == labels[:, None]
        label_logit += tl.sum(tl.where(is_label, logits, 0.0), axis=1)

    tl.store(lse_part_ptr + pid_s * T + offs_t, row_max + tl.log(sum_exp), mask=mask_t)
    in_split = (labels >= v_begin) & (labels < v_end)
    tl.store(label_logit_ptr + offs_t, label_logit, mask=mask_t & in_split)


@triton.jit
def _backward_kernel(
    h_ptr, w_ptr, labels_ptr, lse_ptr, scale_ptr, dh_ptr, dw_ptr,
    T, V, D,
    stride_ht, stride_hd, stride_wv, stride_wd,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_T: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    n_t = tl.cdiv(T, BLOCK_T)
    n_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_T * n_v
    first_t = (pid // per_group) * GROUP_T
    group_size = tl.minimum(n_t - first_t, GROUP_T)
    pid_t = first_t + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    # 0 for ignored tokens and rows past T: they contribute nothing
    scale = tl.load(scale_ptr + offs_t, mask=mask_t, other=0.0)
    if tl.max(tl.abs(scale), axis=0) > 0.0:
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        logits = _logits_tile(
            h_ptr, w_ptr, offs_t, offs_v, mask_t, mask_v, D,
            stride_ht, stride_hd, stride_wv, stride_wd,
            BLOCK_T, BLOCK_V, BLOCK_D, DOT_PRECISION, UPCAST,
        )
        lse = tl.load(lse_ptr + offs_t, mask=mask_t, other=0.0)
        labels = tl.load(labels_ptr + offs_t, mask=mask_t, other=-1)
        prob = tl.exp(logits - lse[:, None])
        grad = tl.where(offs_v[None, :] == labels[:, None], prob - 1.0, prob) * scale[:, None]
        grad = tl.where(mask_v[None, :], grad, 0.0)
        if UPCAST:
            grad_op = grad
        else:
            grad_op = grad.to(h_ptr.dtype.element_ty)

        h_rows = h_ptr + offs_t.to(tl.int64)[:, None] * stride_ht
        w_rows = w_ptr + offs_v.to(tl.int64)[:, None] * stride_wv
        dh_rows = dh_ptr + offs_t.to(tl.int64)[:, None] * D
        dw_rows = dw_ptr + offs_v.to(tl.int64)[:, None] * D
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            mask_td = mask_t[:, None] & mask_d[None, :]
            mask_vd = mask_v[:, None] & mask_d[None, :]
            if COMPUTE_DH:
                w = tl.load(w_rows + offs_d[None, :] * stride_wd, mask=mask_vd, other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                dh = tl.dot(grad_op, w, input_precision=DOT_PRECISION)
                tl.atomic_add(dh_rows + offs_d[None, :], dh, mask=mask_td, sem="relaxed")
            if COMPUTE_DW:
                h = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=mask_td, other=0.0)
                if UPCAST:
                    h = h.to(tl.float32)
                dw = tl.dot(tl.trans(grad_op), h, input_precision=DOT_PRECISION)
                tl.atomic_add(dw_rows + offs_d[None, :], dw, mask=mask_vd, sem="relaxed")


# --------------------------------------------------------------------------------------------------
# launchers


def _check(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> None:
    if hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton kernels take float16/bfloat16/float32, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"need hidden [T, D] and weight [V, D], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"labels must be [{hidden.shape[0]}], got {tuple(labels.shape)}")


def gpu_blocks(target: tiles.Target, kernel: str, dtype: torch.dtype | str, dim: int) -> dict:
    """The launch blocks of ``kernel`` ("forward"/"backward") on ``target`` (a pure function)."""
    tile = tiles.lm_head_tile(target, kernel, dtype, dim)
    return {"block_t": tile.block_m, "block_v": tile.block_n, "block_d": tile.block_k,
            "num_warps": tile.num_warps, "num_stages": tile.num_stages}


def _launch_config(kernel: str, dtype: torch.dtype, device: torch.device | None = None,
                   dim: int = 0) -> tuple[dict, str, bool]:
    """(blocks, tl.dot input precision, upcast-before-dot) for ``kernel`` ("forward"/"backward")."""
    if triton_interpreter():
        return INTERPRETER_BLOCKS, "ieee", dtype == torch.bfloat16
    fp32 = dtype == torch.float32
    # float32 follows torch's own matmul setting: TF32 only when the user allowed it; the flag
    # does not concern 16-bit operands
    precision = "tf32" if not fp32 else tiles.float32_dot_precision()
    return gpu_blocks(tiles.device_target(device), kernel, dtype, dim), precision, False


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _vocab_splits(n_t_blocks: int, n_v_blocks: int, device: torch.device) -> int:
    if triton_interpreter() or device.type != "cuda":
        return min(INTERPRETER_VOCAB_SPLITS, n_v_blocks)
    # aim for about four programs per SM; never more splits than vocabulary blocks
    target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(n_v_blocks, triton.cdiv(target, n_t_blocks)))


def lse_forward(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``logsumexp(H @ W.T)`` and the label's logit, both float32 ``[T]``.

    The label logit is 0 where the label lies outside ``[0, V)`` (ignored tokens).
    """
    _check(hidden, weight, labels)
    T, D = hidden.shape
    V = weight.shape[0]
    labels = labels.contiguous()
    blocks, precision, upcast = _launch_config("forward", hidden.dtype, hidden.device, D)
    n_t = triton.cdiv(T, blocks["block_t"])
    n_v = triton.cdiv(V, blocks["block_v"])
    splits = _vocab_splits(n_t, n_v, hidden.device)
    vocab_per_split = triton.cdiv(n_v, splits) * blocks["block_v"]
    splits = triton.cdiv(V, vocab_per_split)
    lse_part = torch.empty(splits, T, device=hidden.device, dtype=torch.float32)
    label_logit = torch.zeros(T, device=hidden.device, dtype=torch.float32)
    if T == 0:
        return lse_part.sum(0), label_logit
    with tiles.device_guard(hidden):
        _lse_forward_kernel[(n_t, splits)](
            hidden, weight, labels, lse_part, label_logit,
            T, V, D, vocab_per_split, ignore_index,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            BLOCK_T=blocks["block_t"], BLOCK_V=blocks["block_v"], BLOCK_D=blocks["block_d"],
            DOT_PRECISION=precision, UPCAST=upcast,
            num_warps=blocks["num_warps"], num_stages=blocks["num_stages"],
        )
    lse = lse_part[0] if splits == 1 else torch.logsumexp(lse_part, dim=0)
    return lse, label_logit


def grad_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    token_scale: torch.Tensor,
    need_dh: bool = True,
    need_dw: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Float32 ``dH [T, D]`` and ``dW [V, D]`` of ``sum_t token_scale[t] * CE_t``.

    ``token_scale`` (float32 ``[T]``) carries the reduction and the incoming gradient, and is 0
    for ignored tokens; ``lse`` is :func:`lse_forward`'s first output.
    """
    _check(hidden, weight, labels)
    T, D = hidden.shape
    V = weight.shape[0]
    dh = torch.zeros(T, D, device=hidden.device, dtype=torch.float32) if need_dh else None
    dw = torch.zeros(V, D, device=hidden.device, dtype=torch.float32) if need_dw else None
    if T == 0 or not (need_dh or need_dw):
        return dh, dw
    blocks, precision, upcast = _launch_config("backward", hidden.dtype, hidden.device, D)
    grid = (triton.cdiv(T, blocks["block_t"]) * triton.cdiv(V, blocks["block_v"]),)
    dummy = lse  # any float32 tensor stands in for the gradient not asked for (never touched)
    with tiles.device_guard(hidden):
        _backward_kernel[grid](
            hidden, weight, labels.contiguous(), lse.contiguous(), token_scale.to(torch.float32).contiguous(),
            dh if need_dh else dummy, dw if need_dw else dummy,
            T, V, D,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            BLOCK_T=blocks["block_t"], BLOCK_V=blocks["block_v"], BLOCK_D=blocks["block_d"], GROUP_T=_GROUP_T,
            COMPUTE_DH=need_dh, COMPUTE_DW=need_dw, DOT_PRECISION=precision, UPCAST=upcast,
            num_warps=blocks["num_warps"], num_stages=blocks["num_stages"],
        )
    return dh, dw
