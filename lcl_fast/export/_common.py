"""What every export format shares: the tower's description, its tensors, and writing a folder atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

from ..config import PoolProjectCfg, TextCfg, VisionCfg
from ..data.decode import CLIP_MEAN, CLIP_STD

EXTRA_HINT = "pip install 'lcl-fast[export]'"
# Files whose presence means a folder already holds an exported model (any of the three formats).
MODEL_FILES = ("config.json", "model.safetensors", "open_clip_pytorch_model.bin", "pooler.safetensors")
LAYER_NORM_EPS = 1e-5  # open_clip's LayerNorm default, which LCL's towers use everywhere


@dataclass
class ExportSource:
    """An LCL model reduced to what the exporters need: its configuration and its fp32 (or ``dtype``) tensors.

    ``visual`` holds the vision tower's tensors without the ``visual.`` prefix, ``pooler`` the attentive
    pooler's without ``pool_project.``; ``state_dict`` is the whole model (reference key names).
    """

    name: str
    model_config: dict
    vision: VisionCfg
    pool: PoolProjectCfg
    quick_gelu: bool
    state_dict: dict[str, torch.Tensor]

    @property
    def visual(self) -> dict[str, torch.Tensor]:
        return {k[len("visual."):]: v for k, v in self.state_dict.items() if k.startswith("visual.")}

    @property
    def pooler(self) -> dict[str, torch.Tensor]:
        p = "pool_project."
        return {k[len(p):]: v for k, v in self.state_dict.items() if k.startswith(p)}


def _non_default(cfg: Any) -> dict:
    """A config dataclass as a dict of the fields that differ from their defaults (what the JSON configs list)."""
    defaults = type(cfg)()
    names = [f.name for f in dataclasses.fields(cfg)]
    return {n: getattr(cfg, n) for n in names if getattr(cfg, n) != getattr(defaults, n)}


def _uses_quick_gelu(model: nn.Module) -> bool:
    """Whether the vision tower's MLPs use QuickGELU (``quick_gelu=True``) or exact GELU."""
    kinds = set()
    for module in model.visual.modules():
        if isinstance(module, nn.GELU):
            if module.approximate != "none":
                raise ValueError(f"the vision tower uses GELU(approximate={module.approximate!r}); exports need exact")
            kinds.add(False)
        elif type(module).__name__ == "QuickGELU":
            kinds.add(True)
    if len(kinds) > 1:
        raise ValueError("the vision tower mixes GELU and QuickGELU; no export format represents that")
    return kinds.pop() if kinds else False


def model_config_of(model: nn.Module) -> dict:
    """The constructor config of an :class:`lcl_fast.LCL` (the published JSON layout, non-default fields only)."""
    cfg = {
        "embed_dim": model.embed_dim,
        "vision_cfg": _non_default(model.vision_cfg),
        "text_cfg": _non_default(model.text_cfg),
        "pool_project_cfg": dataclasses.asdict(model.pool_project_cfg),
        "special_token_ids": dict(model.special_token_ids),
    }
    if _uses_quick_gelu(model):
        cfg["quick_gelu"] = True
    cfg["custom_text"] = True  # the reference builds LCL (not CLIP) only for custom-text configs
    return cfg


def source_from_model(
    model: nn.Module,
    *,
    name: str = "LCL_exported",
    model_config: Optional[dict] = None,
    dtype: torch.dtype = torch.float32,
    prefixes: Optional[tuple[str, ...]] = None,
) -> ExportSource:
    """Describe ``model`` (an :class:`lcl_fast.LCL`) for the exporters; tensors copied to the CPU in ``dtype``.

    ``prefixes``: copy only the tensors whose keys start with one of them (default: the whole model).
    """
    for attr in ("visual", "pool_project", "vision_cfg", "pool_project_cfg"):
        if not hasattr(model, attr):
            raise TypeError(f"expected an lcl_fast.LCL model, got {type(model).__name__} (no .{attr})")
    if not isinstance(model.vision_cfg, VisionCfg) or not isinstance(model.text_cfg, TextCfg):
        raise TypeError("model.vision_cfg / model.text_cfg are not lcl_fast config objects")
    cfg = dict(model_config) if model_config is not None else model_config_of(model)
    cfg.setdefault("custom_text", True)
    state = {
        k: v.detach().to(device="cpu", dtype=dtype if v.is_floating_point() else v.dtype).contiguous().clone()
        for k, v in model.state_dict().items()
        if prefixes is None or k.startswith(prefixes)
    }
    return ExportSource(name, cfg, model.vision_cfg, model.pool_project_cfg, _uses_quick_gelu(model), state)


def take(tensors: Mapping[str, torch.Tensor], used: set, key: str) -> torch.Tensor:
    """``tensors[key]``, remembering that it was mapped (leftovers are reported by :func:`check_all_used`)."""
    if key not in tensors:
        raise ValueError(f"the vision tower has no tensor {key!r}: not an LCL / open_clip ViT state dict")
    used.add(key)
    return tensors[key]


def check_all_used(tensors: Mapping[str, torch.Tensor], used: set, fmt: str, hint: str = "") -> None:
    """Refuse to drop weights silently: every vision tensor must have a place in the exported model."""
    left = sorted(set(tensors) - used)
    if left:
        raise ValueError(f"format {fmt!r} has no place for the vision tensors {left[:8]}{hint}")


def image_mean_std() -> tuple[list[float], list[float]]:
    """The normalisation LCL trains with (OpenAI CLIP's mean and std, as in ``lcl_fast.data``)."""
    return list(CLIP_MEAN), list(CLIP_STD)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Optional[dict] = None) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError as err:
        raise ImportError(f"writing .safetensors needs the safetensors package: {EXTRA_HINT}") from err
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt", **(metadata or {})})


def write_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def check_output(output: Union[str, os.PathLike], overwrite: bool) -> Path:
    """The output folder, refused up front if it is a file or (without ``overwrite``) already holds files."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        held = sorted(p.name for p in out.iterdir())
        what = "a model" if any(n in MODEL_FILES for n in held) else "files"
        raise FileExistsError(
            f"--output {out} already holds {what} ({', '.join(held[:6])}{' …' if len(held) > 6 else ''}); "
            "choose a new folder or pass --overwrite"
        )
    return out


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def ordinary_permissions(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a plain ``mkdir``/``open`` would under the umask
    (0755 / 0644 under umask 022): ``mkdtemp`` makes 0700 folders and some writers 0600 files."""
    mask = _umask()
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def write_folder(output: Union[str, os.PathLike], fill: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Let ``fill(tmp)`` write the export into a temporary folder beside ``output``, then rename it into place.

    Nothing half-written is left: on any error the temporary folder is removed, and ``output`` (if it
    existed) is untouched. The folder and its files get ordinary permissions (the umask's, as ``mkdir``
    gives). With ``overwrite`` an existing ``output`` is replaced only once the new one is complete.
    """
    out = check_output(output, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    old: Optional[Path] = None
    try:
        fill(tmp)
        ordinary_permissions(tmp)
        if out.is_dir() and any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "previous")
        elif out.is_dir():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        if old is not None and not out.exists():  # put the previous export back
            os.rename(old / "previous", out)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out
