"""``create_model``: the published configurations and the reference's checkpoint format."""

from __future__ import annotations

import copy
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .model import LCL

_MODEL_KEYS = ("embed_dim", "vision_cfg", "text_cfg", "pool_project_cfg", "special_token_ids",
               "quick_gelu", "init_logit_scale", "init_logit_bias", "cast_dtype")


# Configurations added at run time (``add_model_config``), by name; they shadow shipped ones.
_REGISTERED: dict[str, dict] = {}


def _shipped_models() -> list[str]:
    files = resources.files("lcl_fast.model_configs").iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".json"))


def list_models() -> list[str]:
    """Names of the shipped configurations and of those added with :func:`add_model_config`."""
    return sorted(set(_shipped_models()) | set(_REGISTERED))


def add_model_config(path_or_config: Union[str, os.PathLike, dict], name: Optional[str] = None) -> list[str]:
    """Register configurations, as open_clip's ``add_model_config`` does: a JSON file (named after its
    stem), a folder of JSON files, or a config dict (``name`` required). Returns the names added."""
    if isinstance(path_or_config, dict):
        if not name:
            raise ValueError("add_model_config(dict) needs a name")
        _REGISTERED[name] = copy.deepcopy(path_or_config)
        return [name]
    path = Path(path_or_config)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise ValueError(f"add_model_config: {path} is neither a JSON file nor a folder holding JSON files")
    added = []
    for file in files:
        try:
            cfg = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"add_model_config: could not read {file}: {err}") from err
        if not isinstance(cfg, dict) or not {"vision_cfg", "text_cfg"} <= set(cfg):
            raise ValueError(f"add_model_config: {file} is not a model config (needs vision_cfg and text_cfg)")
        key = name if (name and len(files) == 1) else file.stem
        _REGISTERED[key] = cfg
        added.append(key)
    return added


def get_model_config(name_or_path: Union[str, os.PathLike, dict]) -> dict:
    """A registered or shipped configuration by name, a JSON file by path, or a config dict (a deep copy
    you may edit)."""
    if isinstance(name_or_path, dict):
        return copy.deepcopy(name_or_path)
    name_or_path = str(name_or_path)
    if name_or_path in _REGISTERED:
        return copy.deepcopy(_REGISTERED[name_or_path])
    if name_or_path in _shipped_models():
        text = resources.files("lcl_fast.model_configs").joinpath(f"{name_or_path}.json").read_text()
        return json.loads(text)
    if os.path.isfile(name_or_path):
        try:
            return json.loads(Path(name_or_path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"model config {name_or_path} is not valid JSON: {err}") from err
    raise ValueError(f"unknown model {name_or_path!r}: not a file, and not one of {list_models()}")


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


def load_checkpoint(model: LCL, path: Union[str, os.PathLike], *, weights_only: bool = True) -> LCL:
    """Load a reference (open_clip training) checkpoint, a lcl-fast checkpoint or a bare state dict.

    ``weights_only=True`` (the default) unpickles tensors, containers and, besides, the numpy scalars and
    dtypes that open_clip's trainer writes into the optimizer state; any other object is refused.

    Raises a ``ValueError`` naming the missing and unexpected keys when the file does not fit the model.
    """
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:  # an unpickling error names the offending global; keep it
        raise ValueError(
            f"could not load checkpoint {path}: {err}\n(if you trust this file, pass weights_only=False)"
        ) from err
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        state_dict = ckpt["state_dict"]
    elif isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        state_dict = ckpt["model"]
    elif isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state_dict = ckpt
    else:
        raise ValueError(f"{path}: no 'state_dict' (or 'model') entry and not a bare state dict")
    state_dict = _strip(state_dict)
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit this model: {len(missing)} missing keys {missing[:10]}"
            f"{' …' if len(missing) > 10 else ''}, {len(unexpected)} unexpected keys {unexpected[:10]}"
            f"{' …' if len(unexpected) > 10 else ''}"
        )
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"checkpoint {path}: shape mismatch (key, checkpoint, model): {wrong[:10]}")
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
        raise ValueError(f"model config has unknown keys {unknown}; expected a subset of {list(_MODEL_KEYS)}")
    cfg.update(model_kwargs)
    model = LCL(**cfg)
    if pretrained is not None:
        load_checkpoint(model, pretrained, weights_only=weights_only)
    if device is not None:
        model = model.to(device)
    return model
