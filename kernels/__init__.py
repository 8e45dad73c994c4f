"""Triton kernels of lcl-fast, installed as ``lcl_fast.kernels``.

One op per module: the ``@triton.jit`` kernels and the launcher that checks shapes and
picks blocks (:mod:`~lcl_fast.kernels.tiles` chooses every kernel's tiles per GPU target).
The autograd Functions and the plain-torch paths live in ``lcl_fast.ops``.
Nothing here queries a device at import time.
"""
