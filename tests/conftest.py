import importlib
import importlib.util
import os
import sys
from pathlib import Path

# The repository root holds `kernels/` (installed as `lcl_fast.kernels`). Pytest puts the root first on
# sys.path (again for each test package), where that folder shadows the PyPI package `kernels` (Hugging
# Face's hub kernels, which transformers >= 5 imports when it is installed). Import the real one first,
# with the root out of the way, so that sys.modules answers every later `import kernels`.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_saved_path = list(sys.path)
try:
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _ROOT]
    _spec = importlib.util.find_spec("kernels") if "kernels" not in sys.modules else None
    if _spec is not None and os.path.dirname(str(_spec.origin)) != os.path.join(_ROOT, "kernels"):
        importlib.import_module("kernels")
finally:
    sys.path[:] = _saved_path

import pytest  # noqa: E402
import torch  # noqa: E402

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
