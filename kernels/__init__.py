"""Triton kernels of lcl-fast, installed as ``lcl_fast.kernels``.

One op per module: the ``@triton.jit`` kernels and the launcher that checks shapes and
picks blocks. The autograd Functions and the plain-torch paths live in ``lcl_fast.ops``.
Nothing here queries a device at import time.
"""
