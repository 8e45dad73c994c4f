"""The repository root is a safe place to stand: its top-level ``kernels/`` (installed as ``lcl_fast.kernels``)
does not shadow the PyPI package ``kernels`` that transformers >= 5 imports (issue 25, item 2).

Each check is a fresh Python started with the working folder at the root, as ``python -c``, ``python -``
and ``python -m`` start after ``git clone && cd``; the export and the README's loading snippet run from
there in tests/test_readme.py.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = (REPO / "tests" / "_root_probe.py").read_text()
# Where `kernels` lives when the repository is not on the path (None: not installed).
_OUTSIDE = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != os.path.realpath(REPO)]
PYPI_SPEC = importlib.machinery.PathFinder.find_spec("kernels", _OUTSIDE)
needs_transformers = pytest.mark.skipif(
    importlib.machinery.PathFinder.find_spec("transformers", _OUTSIDE) is None, reason="transformers is not installed"
)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(args: list[str], stdin: str | None = None, env: dict | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, input=stdin, capture_output=True, text=True, env=env or _env(), timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


needs_pypi_kernels = pytest.mark.skipif(
    PYPI_SPEC is None or PYPI_SPEC.origin is None, reason="the PyPI package kernels is not installed"
)


@needs_transformers
@needs_pypi_kernels
def test_pypi_kernels_and_transformers_import_from_the_root():
    got = _run(["-c", PROBE])  # python -c: sys.path[0] is "" (the working folder)
    assert got["kernels"] == PYPI_SPEC.origin and got["find_spec"] == PYPI_SPEC.origin
    assert got["has_get_kernel"] and got["clip"].startswith("transformers.")


@needs_pypi_kernels
@pytest.mark.parametrize("how", ["-", "-m"])
def test_pypi_kernels_imports_from_the_root(how):
    """``python -`` (sys.path[0] "") and ``python -m`` (the root's absolute path) find PyPI's ``kernels``."""
    probe = "import json, kernels; print(json.dumps([kernels.__file__, hasattr(kernels, 'get_kernel')]))"
    if how == "-":
        got = _run(["-"], stdin=probe)
    else:
        got = _run(["-m", "tests._root_probe", "--kernels-only"])
    assert got == [PYPI_SPEC.origin, True]


def test_timm_imports_from_the_root():
    if importlib.machinery.PathFinder.find_spec("timm", _OUTSIDE) is None:
        pytest.skip("timm is not installed (pip install 'lcl-fast[export]')")
    probe = "import timm, kernels, json; print(json.dumps([timm.__file__, getattr(kernels, '__file__', None)]))"
    got = _run(["-c", probe])
    assert not got[0].startswith(str(REPO))
    assert got[1] is None or not got[1].startswith(str(REPO / "kernels"))


@needs_transformers
def test_without_pypi_kernels_the_folder_reads_as_not_installed(tmp_path):
    """PyPI ``kernels`` absent: ``import kernels`` from the root gives what a plain folder gives (an empty
    namespace module), which transformers' availability check reads as "not installed"."""
    site = Path(importlib.machinery.PathFinder.find_spec("transformers", _OUTSIDE).origin).parents[1]
    hidden = tmp_path / "site"
    hidden.mkdir()
    for entry in site.iterdir():  # the same site-packages, less kernels
        if entry.name != "kernels" and not entry.name.startswith("kernels-"):
            (hidden / entry.name).symlink_to(entry)
    probe = (  # transformers asks first (find_spec finds the folder; no metadata; it imports it), then the user
        "import json, sys, importlib.util as u; from transformers.utils.import_utils import is_kernels_available as a; "
        "found = u.find_spec('kernels').origin if 'kernels' not in sys.modules else 'imported'; available = a(); "
        "from transformers import CLIPVisionModel; import kernels; "
        "print(json.dumps([found, available, getattr(kernels, '__file__', None), list(kernels.__path__)]))"
    )
    env = dict(_env(), PYTHONPATH=str(hidden))
    assert _run(["-S", "-c", probe], env=env) == [str(REPO / "kernels" / "__init__.py"), False, None, []]
