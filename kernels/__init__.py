"""Triton kernels of lcl-fast, installed as ``lcl_fast.kernels``.

One op per module: the ``@triton.jit`` kernels and the launcher that checks shapes and
picks blocks (:mod:`~lcl_fast.kernels.tiles` chooses every kernel's tiles per GPU target).
The autograd Functions and the plain-torch paths live in ``lcl_fast.ops``.
Nothing here queries a device at import time.

This folder sits at the top of the repository, so a Python started in the clone's root (``python -m``,
``-c``, ``-``, a notebook, pytest) finds it as a top-level ``kernels`` first, ahead of the unrelated
PyPI package ``kernels`` that transformers >= 5 imports. Imported under that name, this module hands
over: it loads what the rest of ``sys.path`` holds under ``kernels`` into ``sys.modules`` (the import
statement returns that), or, when nothing else holds it, the empty namespace module Python would make
for a plain folder (transformers reads that as "not installed"). Only the standard library runs here.
"""

if __name__ == "kernels":  # the repository root is on sys.path: stand aside
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    def _hand_over() -> None:
        root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
        path = [p for p in _sys.path if not isinstance(p, str) or _os.path.realpath(p or _os.getcwd()) != root]
        spec = _machinery.PathFinder.find_spec("kernels", path)
        if spec is None:  # not installed: what a folder without __init__.py gives (no __file__, no version)
            spec = _machinery.ModuleSpec("kernels", None, is_package=True)
            spec.submodule_search_locations = []
        module = _util.module_from_spec(spec)
        _sys.modules["kernels"] = module  # the import statement returns sys.modules["kernels"]
        try:
            if spec.loader is not None:
                spec.loader.exec_module(module)
        except BaseException:
            del _sys.modules["kernels"]
            raise

    _hand_over()
