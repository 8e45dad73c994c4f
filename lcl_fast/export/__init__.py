"""Hand a pre-trained LCL encoder to the tools used next: transformers (LLaVA), timm, open_clip.

``python -m lcl_fast.export --model NAME_OR_JSON --pretrained CKPT --format hf|timm|open_clip --output DIR``,
or from Python::

    from lcl_fast.export import export
    export(model, "hf", "out/lcl-b32-hf")        # model: an lcl_fast.LCL

Every format is exact (same fp32 arithmetic, different names), and every folder also holds
``pooler.safetensors``: the attentive pooler that gives LCL's contrastive image embedding, applied
with :func:`lcl_fast.export.pooler.pooled_embedding` (plain torch). Writing needs ``safetensors``
(``pip install 'lcl-fast[export]'``); loading the results needs transformers / timm / open_clip.
Folders are written to a temporary sibling and renamed into place, so a failed export leaves nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ._common import ExportSource, source_from_model, write_folder
from .hf import write_hf
from .open_clip import write_open_clip
from .pooler import load_pooler, pooled_embedding, write_pooler
from .timm import write_timm

__all__ = ["FORMATS", "ExportSource", "export", "export_source", "load_pooler", "pooled_embedding", "source_from_model"]

_WRITERS = {"hf": write_hf, "timm": write_timm, "open_clip": write_open_clip}
FORMATS = tuple(_WRITERS)


def check_format(fmt: str) -> str:
    if fmt not in _WRITERS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {list(FORMATS)}")
    return fmt


def export_source(
    source: ExportSource, fmt: str, output: Union[str, os.PathLike], *, overwrite: bool = False
) -> Path:
    """Write ``source`` in format ``fmt`` to the folder ``output`` (atomically); returns the folder."""
    writer = _WRITERS[check_format(fmt)]

    def fill(folder: Path) -> None:
        writer(source, folder)
        if fmt != "open_clip":  # the open_clip checkpoint holds the pooler already
            write_pooler(source, folder)

    return write_folder(output, fill, overwrite=overwrite)


def export(
    model: nn.Module,
    fmt: str,
    output: Union[str, os.PathLike],
    *,
    name: str = "LCL_exported",
    model_config: Optional[dict] = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Export an :class:`lcl_fast.LCL` in format ``fmt`` (``"hf"``, ``"timm"`` or ``"open_clip"``) to ``output``.

    ``model_config`` (the JSON config the model was built from) is written into the open_clip export;
    without it one is rebuilt from the model. Tensors are written in ``dtype`` (default float32).
    """
    check_format(fmt)
    # hf and timm need the vision tower and the pooler only; open_clip is the whole model.
    prefixes = None if fmt == "open_clip" else ("visual.", "pool_project.")
    source = source_from_model(model, name=name, model_config=model_config, dtype=dtype, prefixes=prefixes)
    return export_source(source, fmt, output, overwrite=overwrite)
