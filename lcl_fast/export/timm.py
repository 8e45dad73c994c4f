"""Export to a timm folder: ``timm.create_model("local-dir:DIR", pretrained=True)`` loads it.

timm's CLIP ViTs (``vit_base_patch16_clip_224`` and kin) are open_clip's ViT: ``pre_norm=True`` gives
``norm_pre`` (``ln_pre``) and a bias-free patch embedding, the class token is kept, and ``norm``
(``ln_post``) is applied to every token, so LCL's token features are ``model.forward_features(x)[:, 1:]``.
``config.json`` names a registered CLIP architecture and overrides its arguments to this tower's
sizes; ``num_classes=0`` (no head) and ``global_pool="token"`` (``forward`` returns the normed class
token). The folder is written without timm.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ._common import ExportSource, check_all_used, image_mean_std, save_safetensors, take, write_json


def timm_architecture(source: ExportSource) -> str:
    """The registered timm name closest to this tower (its arguments are overridden to match exactly)."""
    act = "_quickgelu" if source.quick_gelu else ""
    patch = 32 if source.vision.patch_size == 32 else 16
    return f"vit_base_patch{patch}_clip{act}_224"


def timm_model_args(source: ExportSource) -> dict:
    v = source.vision
    args = {
        "img_size": v.image_size,
        "patch_size": v.patch_size,
        "embed_dim": v.width,
        "depth": v.layers,
        "num_heads": v.heads,
        "mlp_ratio": v.mlp_ratio,
        "pre_norm": True,
        "class_token": True,
        "global_pool": "token",
        "fc_norm": False,
        "num_classes": 0,
        "act_layer": "quick_gelu" if source.quick_gelu else "gelu",  # timm's "gelu" is exact erf GELU
    }
    if v.ls_init_value is not None:
        args["init_values"] = v.ls_init_value  # creates ls1/ls2; the exported gammas overwrite the init
    return args


def timm_config(source: ExportSource) -> dict:
    """timm's hub ``config.json``: architecture, model arguments and the pretrained (preprocessing) config."""
    v = source.vision
    mean, std = image_mean_std()
    return {
        "architecture": timm_architecture(source),
        "num_classes": 0,
        "num_features": v.width,
        "global_pool": "token",
        "model_args": timm_model_args(source),
        "pretrained_cfg": {
            "tag": "lcl_fast",
            "custom_load": False,
            "input_size": [3, v.image_size, v.image_size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": mean,
            "std": std,
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


def timm_state_dict(source: ExportSource) -> dict[str, torch.Tensor]:
    """The vision tower under timm ``VisionTransformer`` names; raises if a tensor has no place there."""
    t, used = source.visual, set()
    g = lambda k: take(t, used, k)
    out = {
        "patch_embed.proj.weight": g("conv1.weight"),
        "cls_token": g("class_embedding").reshape(1, 1, -1),
        "pos_embed": g("positional_embedding").unsqueeze(0),
    }
    for ours, theirs in (("ln_pre", "norm_pre"), ("ln_post", "norm")):
        for w in ("weight", "bias"):
            out[f"{theirs}.{w}"] = g(f"{ours}.{w}")
    for i in range(source.vision.layers):
        s, d = f"transformer.resblocks.{i}.", f"blocks.{i}."
        for w in ("weight", "bias"):
            out[f"{d}attn.qkv.{w}"] = g(f"{s}attn.in_proj_{w}")  # same q, k, v row order as nn.MultiheadAttention
            out[f"{d}attn.proj.{w}"] = g(f"{s}attn.out_proj.{w}")
            out[f"{d}norm1.{w}"] = g(f"{s}ln_1.{w}")
            out[f"{d}norm2.{w}"] = g(f"{s}ln_2.{w}")
            out[f"{d}mlp.fc1.{w}"] = g(f"{s}mlp.c_fc.{w}")
            out[f"{d}mlp.fc2.{w}"] = g(f"{s}mlp.c_proj.{w}")
        for n in "12":
            if f"{s}ls_{n}.gamma" in t:
                out[f"{d}ls{n}.gamma"] = g(f"{s}ls_{n}.gamma")
    check_all_used(t, used, "timm")
    return out


def write_timm(source: ExportSource, folder: Path) -> None:
    weights = timm_state_dict(source)
    write_json(timm_config(source), folder / "config.json")
    save_safetensors(weights, folder / "model.safetensors")
