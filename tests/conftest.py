import os
from pathlib import Path

import pytest
import torch

# The repository root (which pytest puts on sys.path) holds `kernels/`; it stands aside for the PyPI
# package `kernels` by itself (kernels/__init__.py), so transformers >= 5 imports here as anywhere.
# Without a GPU, Triton kernels run in the interpreter. Set before any kernel module is imported (kernels
# are decorated at import time); spawned processes inherit it. With CUDA the kernels compile as usual.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
# The reference's outputs live in the repository (tests/golden/README.md says where they come from);
# LCL_GOLDEN_DIR points the suite at another copy, for example freshly regenerated files.
GOLDEN = Path(os.environ.get("LCL_GOLDEN_DIR", REPO / "tests" / "golden"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.fail(f"golden files not found at {GOLDEN} (LCL_GOLDEN_DIR overrides tests/golden)")
    return GOLDEN
