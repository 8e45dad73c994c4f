"""Choosing between the implementations every heavy op offers.

Each op takes ``impl`` in ``"reference" | "torch" | "triton" | "auto"``:

- ``"reference"``: the computation strategy of the published LCL code (dense masks, full
  logits matrices). The benchmarks' baseline; kept faithful on purpose.
- ``"torch"``: plain PyTorch, exact and memory-lean; the CPU default and the test oracle.
- ``"triton"``: the fused Triton kernels in :mod:`lcl_fast.kernels`. Needs CUDA tensors, or
  CPU tensors with ``TRITON_INTERPRET=1`` (slow; for tests).
- ``"auto"``: ``"triton"`` for CUDA tensors when Triton is importable, else ``"torch"``.

``LCL_FAST_IMPL`` in the environment overrides what ``"auto"`` picks (handy for A/B runs).
"""

from __future__ import annotations

import importlib.util
import os

import torch

IMPLS = ("reference", "torch", "triton", "auto")


# Looked up once at import (finding the spec does not import triton); a plain constant, so a
# compiled graph reads it without tracing a cached function.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported."""
    return _TRITON_FOUND


def triton_interpreter() -> bool:
    """Whether Triton kernels run on the CPU through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_impl(impl: str, choices: tuple[str, ...] = IMPLS) -> str:
    if impl not in choices:
        raise ValueError(f"impl must be one of {choices}, got {impl!r}")
    return impl


def resolve_impl(impl: str, *tensors: torch.Tensor, choices: tuple[str, ...] = IMPLS) -> str:
    """Turn ``impl`` into a concrete implementation for tensors on their device.

    ``"auto"`` becomes ``"triton"`` for CUDA tensors with Triton installed, ``"torch"``
    otherwise. An explicit ``"triton"`` on CPU tensors without the interpreter raises.
    """
    check_impl(impl, choices)
    on_cuda = any(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    if impl == "auto":
        forced = os.environ.get("LCL_FAST_IMPL")
        if forced:
            check_impl(forced, tuple(c for c in choices if c != "auto"))
            impl = forced
        elif on_cuda and triton_available() and "triton" in choices:
            return "triton"
        else:
            return "torch"
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' needs the `triton` package (pip install triton)")
        if not on_cuda and not triton_interpreter():
            raise ValueError(
                "impl='triton' needs CUDA tensors; on the CPU set TRITON_INTERPRET=1 "
                "(slow, for tests) or use impl='torch'"
            )
    return impl
