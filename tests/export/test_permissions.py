"""Exports are created with the permissions of a plain ``mkdir``/``open`` under the user's umask."""

from __future__ import annotations

import os
import stat

import pytest

import lcl_fast.export as E
from tests.export.conftest import require


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    saved = os.umask(0o022)
    yield set_mask
    os.umask(saved)


@pytest.mark.parametrize("fmt, mask, folder_mode, file_mode", [
    ("hf", 0o022, 0o755, 0o644),
    ("open_clip", 0o027, 0o750, 0o640),
])  # fmt: skip
def test_export_permissions_follow_the_umask(small_models, tmp_path, umask, fmt, mask, folder_mode, file_mode):
    if fmt == "hf":
        require("safetensors")
    model, cfg = small_models("LCL_tiny")
    umask(mask)
    out = E.export(model, fmt, tmp_path / "out", model_config=cfg)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert stat.S_IMODE(out.stat().st_mode) == folder_mode
    assert modes == dict.fromkeys(modes, file_mode), modes  # .safetensors too (was 0600, the folder 0700)
