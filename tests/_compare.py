"""Comparison helper that says where two tensors differ instead of a bare allclose."""

from __future__ import annotations

import torch


def assert_close(actual, expected, *, rtol: float, atol: float, name: str = "tensor") -> None:
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if not torch.isfinite(a).all() and torch.isfinite(e).all():
        bad = (~torch.isfinite(a)).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: non-finite values at {bad}")
    err = (a - e).abs()
    tol = atol + rtol * e.abs()
    over = err > tol
    if over.any():
        idx = over.nonzero()[:5].tolist()
        worst = int(torch.argmax(err - tol))
        raise AssertionError(
            f"{name}: {int(over.sum())}/{a.numel()} elements outside rtol={rtol:g} atol={atol:g}; "
            f"first at {idx}; max abs err {err.max().item():.3e}, "
            f"max rel err {(err / e.abs().clamp_min(1e-300)).max().item():.3e}; "
            f"worst flat index {worst}: got {a.flatten()[worst].item():.10g}, "
            f"expected {e.flatten()[worst].item():.10g}"
        )


def rel_err(actual, expected) -> float:
    """Relative error in the max norm: max|a-e| / max|e|."""
    a = torch.as_tensor(actual).detach().to(torch.float64).cpu()
    e = torch.as_tensor(expected).detach().to(torch.float64).cpu()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-300))
