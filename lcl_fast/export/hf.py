"""Export to a Hugging Face ``transformers.CLIPVisionModel`` folder (what LLaVA-1.5's ``--vision_tower`` loads).

The mapping is exact: open_clip's ViT and ``CLIPVisionModel`` compute the same function with
different names. Two differences in layout, none in arithmetic:

- the packed ``in_proj_weight [3W, W]`` splits into ``q_proj``, ``k_proj``, ``v_proj`` (rows in that order);
- ``post_layernorm`` (LCL's ``ln_post``) is applied by transformers only to the pooled class token, so
  LCL's token features are ``vision_model.post_layernorm(out.last_hidden_state)[:, 1:]``.

The folder is written without transformers (config and weights are plain files), in the layout
``save_pretrained`` gives: ``config.json``, ``model.safetensors`` and ``preprocessor_config.json``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ._common import LAYER_NORM_EPS, ExportSource, check_all_used, image_mean_std, save_safetensors, take, write_json

PREFIX = "vision_model."


def hf_config(source: ExportSource) -> dict:
    """``CLIPVisionConfig`` as ``config.json``."""
    v = source.vision
    return {
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": v.width,
        "intermediate_size": int(v.width * v.mlp_ratio),
        "num_hidden_layers": v.layers,
        "num_attention_heads": v.heads,
        "num_channels": 3,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "hidden_act": "quick_gelu" if source.quick_gelu else "gelu",  # "gelu" is exact erf GELU in transformers
        "layer_norm_eps": LAYER_NORM_EPS,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "torch_dtype": str(source.state_dict["visual.conv1.weight"].dtype).replace("torch.", ""),
    }


def preprocessor_config(source: ExportSource) -> dict:
    """``CLIPImageProcessor`` settings: LCL's eval transform (shorter side to size, bicubic, centre crop, CLIP norm)."""
    size = source.vision.image_size
    mean, std = image_mean_std()
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,  # PIL bicubic
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
    }


def hf_state_dict(source: ExportSource) -> dict[str, torch.Tensor]:
    """The vision tower under ``CLIPVisionModel``'s names; raises if a tensor has no place there."""
    t, used = source.visual, set()
    g = lambda k: take(t, used, k)
    out = {
        "embeddings.patch_embedding.weight": g("conv1.weight"),
        "embeddings.class_embedding": g("class_embedding"),
        "embeddings.position_embedding.weight": g("positional_embedding"),
    }
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):  # sic: transformers' name
        for w in ("weight", "bias"):
            out[f"{theirs}.{w}"] = g(f"{ours}.{w}")
    for i in range(source.vision.layers):
        s, d = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for w in ("weight", "bias"):
            for c, part in zip("qkv", g(f"{s}attn.in_proj_{w}").chunk(3, dim=0)):
                out[f"{d}self_attn.{c}_proj.{w}"] = part.clone()
            out[f"{d}self_attn.out_proj.{w}"] = g(f"{s}attn.out_proj.{w}")
            out[f"{d}layer_norm1.{w}"] = g(f"{s}ln_1.{w}")
            out[f"{d}layer_norm2.{w}"] = g(f"{s}ln_2.{w}")
            out[f"{d}mlp.fc1.{w}"] = g(f"{s}mlp.c_fc.{w}")
            out[f"{d}mlp.fc2.{w}"] = g(f"{s}mlp.c_proj.{w}")
    check_all_used(t, used, "hf", " (CLIPVisionModel has no layer scale; use --format timm or open_clip)")
    return {PREFIX + k: v for k, v in out.items()}


def write_hf(source: ExportSource, folder: Path) -> None:
    weights = hf_state_dict(source)
    write_json(hf_config(source), folder / "config.json")
    save_safetensors(weights, folder / "model.safetensors")
    write_json(preprocessor_config(source), folder / "preprocessor_config.json")
