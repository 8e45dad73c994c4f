"""Model configuration: the reference's field names and defaults (open_clip's CLIP*Cfg, LCL's PoolProjectCfg).

Configs arrive as dicts (from the published JSON files or a checkpoint) or as these dataclasses.
Fields the reference defines but lcl-fast does not implement are accepted at their default
values; any other value raises, naming the field, instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class VisionCfg:
    """open_clip's ``CLIPVisionCfg`` (the fields the LCL ViT uses, plus the rest at defaults)."""

    layers: int = 12
    width: int = 768
    head_width: int = 64
    mlp_ratio: float = 4.0
    patch_size: int = 16
    image_size: int = 224
    ls_init_value: Optional[float] = None
    patch_dropout: float = 0.0
    attentional_pool: bool = False
    attn_pooler_queries: int = 256
    attn_pooler_heads: int = 8
    no_ln_pre: bool = False
    pos_embed_type: str = "learnable"
    final_ln_after_pool: bool = False
    pool_type: str = "tok"
    output_tokens: bool = False
    act_kwargs: Optional[dict] = None
    norm_kwargs: Optional[dict] = None
    timm_model_name: Optional[str] = None
    timm_model_pretrained: bool = False
    timm_pool: str = "avg"
    timm_proj: str = "linear"
    timm_proj_bias: bool = False
    timm_drop: float = 0.0
    timm_drop_path: Optional[float] = None

    # Features of open_clip's ViT that the LCL encoder path never uses or that we do not implement.
    _unsupported = ("patch_dropout", "attentional_pool", "no_ln_pre", "pos_embed_type", "timm_model_name")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def heads(self) -> int:
        return self.width // self.head_width


@dataclass
class TextCfg:
    """open_clip's ``CLIPTextCfg``; in LCL the text tower is the causal model over interleaved tokens."""

    context_length: int = 77
    vocab_size: int = 49408
    hf_tokenizer_name: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    ls_init_value: Optional[float] = None
    embed_cls: bool = False
    pad_id: int = 0
    no_causal_mask: bool = False
    final_ln_after_pool: bool = False
    pool_type: str = "argmax"
    proj_bias: bool = False
    proj_type: str = "linear"
    output_tokens: bool = False
    act_kwargs: dict = field(default_factory=dict)
    norm_kwargs: dict = field(default_factory=dict)
    hf_model_name: Optional[str] = None
    hf_model_pretrained: bool = True
    hf_proj_type: str = "mlp"
    hf_pooler_type: str = "mean_pooler"

    _unsupported = ("embed_cls", "no_causal_mask", "proj_bias", "proj_type", "hf_model_name")


@dataclass
class PoolProjectCfg:
    """LCL's attentive pooling + projection (``pool_project``)."""

    pool_proj_type: str = "attn"
    input_dim: int = 768
    output_dim: int = 512
    attn_num_heads: int = 8

    _unsupported = ("pool_proj_type",)


def _build(cls, cfg: Any, what: str):
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, (cls, type)):
        cfg = dataclasses.asdict(cfg)  # another project's config class: checked like a dict
    if isinstance(cfg, cls):
        obj = cfg
    elif isinstance(cfg, dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"{what}: unknown field(s) {unknown}; known fields: {sorted(names)}")
        obj = cls(**cfg)
    else:
        raise TypeError(f"{what} must be a dict or {cls.__name__}, got {type(cfg).__name__}")
    defaults = cls()
    for name in cls._unsupported:
        value, default = getattr(obj, name), getattr(defaults, name)
        if value != default:
            raise ValueError(
                f"{what}.{name}={value!r} is not supported by lcl-fast (the LCL reference configs "
                f"use the default {default!r})"
            )
    return obj


def vision_cfg(cfg: Any) -> VisionCfg:
    obj = _build(VisionCfg, cfg, "vision_cfg")
    if obj.image_size % obj.patch_size:
        raise ValueError(f"vision_cfg: image_size {obj.image_size} is not a multiple of patch_size {obj.patch_size}")
    if obj.width % obj.head_width:
        raise ValueError(f"vision_cfg: width {obj.width} is not a multiple of head_width {obj.head_width}")
    return obj


def text_cfg(cfg: Any) -> TextCfg:
    obj = _build(TextCfg, cfg, "text_cfg")
    if obj.width % obj.heads:
        raise ValueError(f"text_cfg: width {obj.width} is not a multiple of heads {obj.heads}")
    return obj


def pool_project_cfg(cfg: Any) -> PoolProjectCfg:
    obj = _build(PoolProjectCfg, cfg, "pool_project_cfg")
    if obj.output_dim % obj.attn_num_heads:
        raise ValueError(
            f"pool_project_cfg: output_dim {obj.output_dim} is not a multiple of attn_num_heads {obj.attn_num_heads}"
        )
    return obj


SPECIAL_TOKEN_NAMES = ("<start_of_text>", "<end_of_text>", "<img_placehold>", "<start_of_img>", "<end_of_img>")


def special_token_ids(ids: dict) -> dict:
    missing = [n for n in SPECIAL_TOKEN_NAMES if n not in (ids or {})]
    if missing:
        raise ValueError(f"special_token_ids is missing {missing}; expected keys {list(SPECIAL_TOKEN_NAMES)}")
    return {n: int(ids[n]) for n in SPECIAL_TOKEN_NAMES}
