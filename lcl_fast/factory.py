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


def list_models() -> list[str]:
    """Names of the shipped configurations."""
    files = resources.files("lcl_fast.model_configs").iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".json"))


def get_model_config(name_or_path: str) -> dict:
    """A shipped configuration by name, or a JSON file by path (a deep copy you may edit)."""
    if name_or_path in list_models():
        text = resources.files("lcl_fast.model_configs").joinpath(f"{name_or_path}.json").read_text()
        return json.loads(text)
    if os.path.isfile(name_or_path):
        return json.loads(Path(name_or_path).read_text())
    raise ValueError(f"unknown model {name_or_path!r}: not a file, and not one of {list_models()}")


def _strip(state_dict: dict) -> dict:
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def load_checkpoint(model: LCL, path: Union[str, os.PathLike], *, weights_only: bool = True) -> LCL:
    """Load a reference (open_clip training) checkpoint, a lcl-fast checkpoint or a bare state dict.

    Raises a ``ValueError`` naming the missing and unexpected keys when the file does not fit the model.
    """
    try:
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
    if isinstance(name_or_config, dict):
        cfg = copy.deepcopy(name_or_config)
    else:
        cfg = get_model_config(str(name_or_config))
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
