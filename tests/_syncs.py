"""Count the host syncs a piece of code would make on a GPU, by watching its ops on the CPU.

A CUDA host sync is an op whose result the host must wait for: reading a value back
(``.item()``, ``float(t)``, ``bool(t)``, ``if t:`` all reach ``aten._local_scalar_dense``;
``.tolist()``, ``.cpu()``, ``.numpy()`` are watched as methods, since on the CPU they dispatch no
copy), a device-to-host copy, a blocking host-to-device copy (``torch.tensor(data, device=...)``),
or an op whose output *shape* depends on the data (``nonzero``, ``masked_select``, ``unique``,
boolean-mask indexing...). A
``TorchDispatchMode`` sees each of them on the CPU as well. Tensors that stay on the host on a GPU
too (an optimizer's step counters, say) can be excluded by identity with ``host``.
"""

from __future__ import annotations

import traceback
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# ops whose output shape depends on tensor values: the host waits for the device to know it
_DATA_DEPENDENT = {
    aten.nonzero.default, aten.masked_select.default,
    aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.unique_dim_consecutive.default, aten.bincount.default, aten.repeat_interleave.Tensor,
    aten.argwhere.default,
}
_BOOL_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _to_host(func, args, kwargs, out) -> bool:
    """A copy from a non-CPU device into CPU memory."""
    if func is aten._to_copy.default:
        src = args[0]
        return isinstance(out, torch.Tensor) and src.device.type != "cpu" and out.device.type == "cpu"
    if func is aten.copy_.default:
        dst, src = args[0], args[1]
        return isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst.device.type == "cpu"
    return False


# Tensor methods that read a tensor into host memory without an op a dispatch mode sees on the CPU
# (on a GPU ``tolist``/``cpu`` copy device to host: ``aten._to_copy``).
_HOST_METHODS = ("tolist", "numpy", "cpu")
# Constructors from host data: given a ``device``, they copy to it and wait (a blocking copy syncs the
# stream on CUDA). Counted whenever a device is named: on the CPU that device is the CPU.
_FACTORIES = ("tensor", "as_tensor", "asarray")


class SyncCounter(TorchDispatchMode):
    """Record every op that would sync the host with a GPU, with the line of lcl_fast that asked for it.

    ``host()``: tensors (by identity) that live in host memory on a GPU run as well; reading them is free.
    ``paused``: while True nothing is recorded (a data loader's host-side work, say).
    """

    def __init__(self, host: Callable[[], Iterable[torch.Tensor]] = tuple) -> None:
        super().__init__()
        self.host = host
        self.events: list[tuple[str, str]] = []
        self.paused = False
        self._inside = 0  # in a patched method: its own ops are not counted again
        self._saved: dict[str, object] = {}

    def _on_host(self, t: torch.Tensor) -> bool:
        return any(t is h for h in self.host())

    def _patch(self, name: str) -> None:
        real = getattr(torch.Tensor, name)
        self._saved[name] = real
        counter = self

        def method(t, *args, **kwargs):
            if not counter.paused and not counter._inside and not counter._on_host(t):
                counter.events.append((f"{name}()", _caller(2)))
            counter._inside += 1
            try:
                return real(t, *args, **kwargs)
            finally:
                counter._inside -= 1

        setattr(torch.Tensor, name, method)

    def _patch_factory(self, name: str) -> None:
        """``torch.tensor(host data, device=d)``: on CUDA a blocking copy, which waits for the device."""
        real = getattr(torch, name)
        self._saved_factories[name] = real
        counter = self

        def factory(*args, **kwargs):
            if kwargs.get("device") is not None and not counter.paused and not counter._inside:
                counter.events.append((f"torch.{name}(device=)", _caller(2)))
            counter._inside += 1
            try:
                return real(*args, **kwargs)
            finally:
                counter._inside -= 1

        setattr(torch, name, factory)

    def __enter__(self):
        self._saved_factories: dict[str, object] = {}
        for name in _HOST_METHODS:
            self._patch(name)
        for name in _FACTORIES:
            self._patch_factory(name)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, real in self._saved.items():
                setattr(torch.Tensor, name, real)
            for name, real in self._saved_factories.items():
                setattr(torch, name, real)
            self._saved.clear()
            self._saved_factories.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused or self._inside:
            return out
        kind = None
        if func is aten._local_scalar_dense.default:
            if not self._on_host(args[0]):
                kind = "read"
        elif func in _DATA_DEPENDENT or (func in _BOOL_INDEXED and _bool_index(args)):
            kind = f"shape:{func}"
        elif _to_host(func, args, kwargs, out):
            kind = "copy"
        if kind is not None:
            self.events.append((kind, _caller(3)))
        return out


def _caller(skip: int) -> str:
    """The innermost frame in lcl_fast (else the innermost outside torch) that led to the op."""
    frames = [f for f in traceback.extract_stack()[:-skip] if "/torch/" not in f.filename]
    ours = [f for f in frames if "lcl_fast" in f.filename or "/kernels/" in f.filename]
    f = (ours or frames or [None])[-1]
    return f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.line}" if f is not None else "?"
