"""``create_model``: the published configurations and the reference's checkpoint format.

The configurations themselves (``list_models``, ``add_model_config``, ``get_model_config``) live in
:mod:`lcl_fast.model_configs`, below the model and the data layer; they are re-exported here."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .errors import CheckpointError, CheckpointMismatchError, UserError
from .model import LCL
from .model_configs import add_model_config, get_model_config, list_models

__all__ = ["add_model_config", "create_model", "get_model_config", "list_models", "load_checkpoint",
           "read_checkpoint"]

_MODEL_KEYS = ("embed_dim", "vision_cfg", "text_cfg", "pool_project_cfg", "special_token_ids",
               "quick_gelu", "init_logit_scale", "init_logit_bias", "cast_dtype")


def _strip(state_dict: dict) -> dict:
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _numpy_safe_globals() -> list:
    """What open_clip training checkpoints hold besides tensors: numpy scalars (the scheduler's learning
    rates in the optimizer state) and their dtypes. Allowed by name, nothing else: ``weights_only`` stays on.

    Files written under numpy 1 name the scalar constructor ``numpy.core.multiarray.scalar``; numpy 2
    moved it to ``numpy._core``: both spellings are allowed.
    """
    try:
        import numpy as np
    except ImportError:  # no numpy, no numpy scalars in anything this process wrote
        return []
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    dtype_classes = {type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDGUS"}
    return [
        scalar,
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *sorted(dtype_classes, key=lambda t: t.__name__),
    ]


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6
_PICKLE_MAGIC = b"\x80"  # the legacy format (and plain pickles) start with a pickle PROTO opcode


def read_checkpoint(path: Union[str, os.PathLike], *, weights_only: bool = True) -> Any:
    """``torch.load(path)`` on the CPU with the numpy scalars open_clip checkpoints hold allowed.

    Raises :class:`~lcl_fast.errors.CheckpointError` with one line saying what is wrong: no such file, a
    folder, an empty or truncated file, a file that is not a PyTorch checkpoint at all, or (only then
    with the advice to pass ``weights_only=False``) objects that ``weights_only`` loading refuses.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise CheckpointError(f"checkpoint {path}: cannot read it ({err.strerror or err})") from err
    if not head:
        raise CheckpointError(f"{path} is empty, not a PyTorch checkpoint")
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle; "
            f"it starts with {head!r})"
        )
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as err:
        text = str(err)
        if weights_only and text.startswith("Weights only load failed"):
            lines = [ln.strip() for ln in text.splitlines() if "WeightsUnpickler error" in ln or "Unsupported" in ln]
            why = lines[-1].split(". Please use")[0] if lines else "it holds objects besides tensors"
            raise CheckpointError(
                f"checkpoint {path} holds objects that weights_only loading refuses ({why}); "
                "if you trust this file, pass weights_only=False"
            ) from err
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (unpickling failed: {text})") from err
    except Exception as err:  # a truncated zip, a corrupt pickle: torch's errors vary by damage
        what = "a truncated or corrupt zip archive" if head.startswith(_ZIP_MAGIC) else "a corrupt pickle"
        detail = " ".join(str(err).split(". ")[0].split()) or type(err).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({what}: {detail})") from err


def load_checkpoint(model: LCL, path: Union[str, os.PathLike], *, weights_only: bool = True) -> LCL:
    """Load a reference (open_clip training) checkpoint, a lcl-fast checkpoint or a bare state dict.

    ``weights_only=True`` (the default) unpickles tensors, containers and, besides, the numpy scalars and
    dtypes that open_clip's trainer writes into the optimizer state; any other object is refused.

    Raises :class:`~lcl_fast.errors.CheckpointError` (a ``ValueError``) when the file is not a checkpoint
    (:func:`read_checkpoint`), and naming the missing and unexpected keys when it does not fit the model.
    """
    ckpt = read_checkpoint(path, weights_only=weights_only)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        state_dict = ckpt["state_dict"]
    elif isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        state_dict = ckpt["model"]
    elif isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state_dict = ckpt
    else:
        raise CheckpointError(f"{path}: no 'state_dict' (or 'model') entry and not a bare state dict")
    state_dict = _strip(state_dict)
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not fit this model: {len(missing)} missing keys {missing[:10]}"
            f"{' …' if len(missing) > 10 else ''}, {len(unexpected)} unexpected keys {unexpected[:10]}"
            f"{' …' if len(unexpected) > 10 else ''}"
        )
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items() if v.shape != own[k].shape]
    if wrong:
        raise CheckpointMismatchError(f"checkpoint {path}: shape mismatch (key, checkpoint, model): {wrong[:10]}")
    model.load_state_dict(state_dict, strict=True)
    return model


def create_model(
    name_or_config: Union[str, dict],
    pretrained: Optional[Union[str, os.PathLike]] = None,
    *,
    device: Union[str, torch.device, None] = None,
    weights_only: bool = True,
    **model_kwargs: Any,
) -> LCL:
    """Build an :class:`LCL` from a registered name, a JSON path or a config dict; optionally load weights.

    ``model_kwargs`` go to the constructor (``impl=``, ``fused_generation_loss=``, ...).
    """
    cfg = get_model_config(name_or_config)
    cfg.pop("custom_text", None)
    unknown = sorted(set(cfg) - set(_MODEL_KEYS))
    if unknown:
        raise UserError(f"model config has unknown keys {unknown}; expected a subset of {list(_MODEL_KEYS)}")
    cfg.update(model_kwargs)
    model = LCL(**cfg)
    if pretrained is not None:
        load_checkpoint(model, pretrained, weights_only=weights_only)
    if device is not None:
        model = model.to(device)
    return model
