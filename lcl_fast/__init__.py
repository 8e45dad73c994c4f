"""lcl-fast: Latent Compression Learning, the reference's mathematics, faster and leaner.

Public API: :class:`LCL`, :class:`LCLLoss`, :func:`create_model`, :func:`get_tokenizer`,
:func:`build_paired_text` (text ids for image–caption pairs),
:func:`caption`/:func:`generate` (text from LCL's language model) and the
functional ops :func:`contrastive_loss`, :func:`interleaved_attention`, :func:`linear_cross_entropy`.
Names are imported on first use, so ``import lcl_fast`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LCL": "lcl_fast.model",
    "LCLLoss": "lcl_fast.loss",
    "add_model_config": "lcl_fast.factory",
    "create_model": "lcl_fast.factory",
    "get_model_config": "lcl_fast.factory",
    "list_models": "lcl_fast.factory",
    "load_checkpoint": "lcl_fast.factory",
    "get_tokenizer": "lcl_fast.data.tokenizer",
    "build_paired_text": "lcl_fast.data.sequences",
    "contrastive_loss": "lcl_fast.ops.contrastive",
    "interleaved_attention": "lcl_fast.ops.attention",
    "linear_cross_entropy": "lcl_fast.ops.linear_cross_entropy",
    "caption": "lcl_fast.eval.caption",
    "generate": "lcl_fast.generation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lcl_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
