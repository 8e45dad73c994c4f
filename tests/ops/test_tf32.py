"""The float32 launchers read torch's TF32 setting through whichever API the user set (issue 26).

torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision``; reading the legacy ``allow_tf32``
or ``get_float32_matmul_precision()`` after it was set raises ("mix of the legacy and new APIs").
The flags are process-wide: every test restores them.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the launchers need the triton package")
matmul = torch.backends.cuda.matmul
new_api = pytest.mark.skipif(not hasattr(matmul, "fp32_precision"), reason="torch < 2.9 has no fp32_precision")


_FLAGS = (torch.backends, torch.backends.mkldnn, matmul, torch.backends.mkldnn.matmul)  # what the setters touch


@pytest.fixture(autouse=True)
def _restore_flags():
    saved = [(module, getattr(module, "fp32_precision", None)) for module in _FLAGS]
    saved_legacy = (matmul.allow_tf32, torch.get_float32_matmul_precision()) if saved[2][1] is None else None
    yield
    for module, value in saved:  # the global first: the backends' own values override it
        if value is not None:
            module.fp32_precision = value
    if saved_legacy is not None:  # torch < 2.9
        matmul.allow_tf32 = saved_legacy[0]
        torch.set_float32_matmul_precision(saved_legacy[1])


def _launcher_precisions(monkeypatch) -> tuple[str, str]:
    """What the contrastive and LM-head launchers pick for float32 on an sm_90 GPU (no GPU needed)."""
    from lcl_fast.kernels import contrastive, linear_cross_entropy, tiles

    monkeypatch.setattr(contrastive, "triton_interpreter", lambda: False)
    monkeypatch.setattr(linear_cross_entropy, "triton_interpreter", lambda: False)
    monkeypatch.setattr(tiles, "device_target", lambda device=None: tiles.AOT_TARGETS["sm_90"])
    _, lm_head, _ = linear_cross_entropy._launch_config("forward", torch.float32, None, 768)
    return contrastive._dot_precision(torch.float32), lm_head


@new_api
@pytest.mark.parametrize("where", ["matmul", "global"])
@pytest.mark.parametrize("value,expected", [("tf32", "tf32"), ("ieee", "ieee")])
def test_new_api(monkeypatch, where, value, expected):
    from lcl_fast.kernels import tiles

    if where == "matmul":
        matmul.fp32_precision = value
    else:
        torch.backends.fp32_precision = value
    assert tiles.float32_dot_precision() == expected
    assert _launcher_precisions(monkeypatch) == (expected, expected)


@pytest.mark.parametrize("allow,expected", [(True, "tf32"), (False, "ieee")])
def test_legacy_api(monkeypatch, allow, expected):
    from lcl_fast.kernels import tiles

    matmul.allow_tf32 = allow
    assert tiles.float32_dot_precision() == expected
    assert _launcher_precisions(monkeypatch) == (expected, expected)
    torch.set_float32_matmul_precision("high" if allow else "highest")
    assert tiles.float32_dot_precision() == expected


def test_default_is_exact(monkeypatch):
    from lcl_fast.kernels import tiles

    assert tiles.float32_dot_precision() == "ieee"
    assert _launcher_precisions(monkeypatch) == ("ieee", "ieee")
