"""The model configurations: the shipped JSON files of this package and those added at run time.

The bottom layer (no torch, no model code): :func:`lcl_fast.create_model` builds from these, and the
tokenizer (:func:`lcl_fast.get_tokenizer`) reads its context length and special tokens from them.
"""

from __future__ import annotations

import copy
import json
import os
from importlib import resources
from pathlib import Path
from typing import Optional, Union

from ..errors import UserError

# Configurations added at run time (``add_model_config``), by name; they shadow shipped ones.
_REGISTERED: dict[str, dict] = {}


def _shipped_models() -> list[str]:
    files = resources.files(__name__).iterdir()
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
        raise UserError(f"add_model_config: {path} is neither a JSON file nor a folder holding JSON files")
    added = []
    for file in files:
        try:
            cfg = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"add_model_config: could not read {file}: {err}") from err
        if not isinstance(cfg, dict) or not {"vision_cfg", "text_cfg"} <= set(cfg):
            raise UserError(f"add_model_config: {file} is not a model config (needs vision_cfg and text_cfg)")
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
        text = resources.files(__name__).joinpath(f"{name_or_path}.json").read_text()
        return json.loads(text)
    if os.path.isfile(name_or_path):
        try:
            return json.loads(Path(name_or_path).read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"model config {name_or_path} is not valid JSON: {err}") from err
    raise UserError(f"unknown model {name_or_path!r}: not a file, and not one of {list_models()}")
