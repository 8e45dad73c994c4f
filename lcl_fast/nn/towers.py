"""The three parts of LCL with the reference's parameter names: ViT, attentive pooler, causal text model."""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..config import PoolProjectCfg, TextCfg, VisionCfg
from .transformer import LayerNorm, Transformer


def _set_trainable(groups: Sequence[Any], trainable: bool) -> None:
    """``requires_grad = trainable`` for every parameter of ``groups`` (modules, parameters, nested lists)."""
    for group in groups:
        if isinstance(group, nn.Parameter):
            group.requires_grad_(trainable)
        elif isinstance(group, nn.Module):
            for p in group.parameters():
                p.requires_grad_(trainable)
        else:
            _set_trainable(group, trainable)


def _lock_groups(tower: nn.Module, groups: list[Any], unlocked: int, what: str) -> None:
    """open_clip's tower locking: every parameter frozen, then the last ``unlocked`` groups trainable again."""
    if isinstance(unlocked, bool) or not isinstance(unlocked, int) or not 0 <= unlocked <= len(groups):
        raise ValueError(f"{what} must be an int in [0, {len(groups)}] (this tower's groups), got {unlocked!r}")
    _set_trainable([tower], False)
    if unlocked:
        _set_trainable(groups[-unlocked:], True)


class VisionTower(nn.Module):
    """open_clip's ViT as LCL uses it: every patch token after ``ln_post``, class token dropped, no ``proj``."""

    def __init__(self, cfg: VisionCfg, *, quick_gelu: bool = False, fp32_norm: bool = False, impl: str = "auto"):
        super().__init__()
        self.cfg = cfg
        width, grid = cfg.width, cfg.grid
        # open_clip's ViT attributes: its factory reads ``visual.image_size`` to build the preprocessing.
        self.image_size = (cfg.image_size, cfg.image_size)
        self.patch_size = (cfg.patch_size, cfg.patch_size)
        self.grid_size = (grid, grid)
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width, fp32=fp32_norm)
        self.transformer = Transformer(
            width, cfg.layers, cfg.heads, causal=False, mlp_ratio=cfg.mlp_ratio,
            ls_init_value=cfg.ls_init_value, quick_gelu=quick_gelu, fp32_norm=fp32_norm, impl=impl,
        )
        self.ln_post = LayerNorm(width, fp32=fp32_norm)
        self.transformer.init_parameters()

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the tower as open_clip's ``VisionTransformer.lock`` does (LiT, ``--lock-image``).

        Groups, first to last: the stem (``conv1``, ``class_embedding``, ``positional_embedding``,
        ``ln_pre``), each block but the last, then the last block with ``ln_post`` (there is no ``proj``).
        The last ``unlocked_groups`` of them stay trainable. ``freeze_bn_stats``: accepted for the
        trainer's call; a ViT has no batch norm.
        """
        blocks = list(self.transformer.resblocks)
        stem = [self.conv1, self.class_embedding, self.positional_embedding, self.ln_pre]
        groups = [stem, *blocks[:-1], [*blocks[-1:], self.ln_post]]
        _lock_groups(self, groups, unlocked_groups, "unlocked_groups")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` → patch tokens ``[N, grid², width]``."""
        x = self.conv1(images).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x)[:, 1:]


class CrossAttention(nn.Module):
    """The pooler's attention: separate q/k/v maps without Linear bias, plus ``q_bias``/``k_bias``/``v_bias``."""

    def __init__(self, dim: int, out_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (out_dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, out_dim, bias=False)
        self.k = nn.Linear(dim, out_dim, bias=False)
        self.v = nn.Linear(dim, out_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(out_dim))
        self.k_bias = nn.Parameter(torch.zeros(out_dim))
        self.v_bias = nn.Parameter(torch.zeros(out_dim))
        self.proj = nn.Linear(out_dim, out_dim, bias=False)

    # Weights and biases are taken in the activations' dtype: open_clip's ``--precision bf16`` casts the
    # Linear weights (by type) but not the ``*_bias`` parameters nor the query token, and runs no autocast.
    def values(self, x_v: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x_v, self.v.weight.to(x_v.dtype), self.v_bias.to(x_v.dtype))

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``x_q [N, Q, dim]``, ``x_k [N, P, dim]``, ``v [N, P, out_dim]`` (already projected) → ``[N, Q, out_dim]``."""
        n, nq, _ = x_q.shape
        h = self.num_heads
        q = nn.functional.linear(x_q, self.q.weight.to(x_q.dtype), self.q_bias.to(x_q.dtype))
        q = q.unflatten(-1, (h, -1)).transpose(1, 2)
        k = nn.functional.linear(x_k, self.k.weight.to(x_k.dtype), self.k_bias.to(x_k.dtype))
        k = k.unflatten(-1, (h, -1)).transpose(1, 2)
        v = v.unflatten(-1, (h, -1)).transpose(1, 2)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(n, nq, -1))


class AttentiveBlock(nn.Module):
    def __init__(self, dim: int, out_dim: int, num_heads: int, fp32_norm: bool = False):
        super().__init__()
        self.norm1_q = LayerNorm(dim, fp32=fp32_norm)
        self.norm1_k = LayerNorm(dim, fp32=fp32_norm)
        self.norm1_v = LayerNorm(dim, fp32=fp32_norm)
        self.cross_attn = CrossAttention(dim, out_dim, num_heads)


class AttentivePoolingProjection(nn.Module):
    """One learned query pools the patches (contrastive feature); every patch is projected (causal-model input).

    Both outputs share ``norm1_v``, ``v`` and ``proj``; the values are computed once for both.
    """

    def __init__(self, cfg: PoolProjectCfg, fp32_norm: bool = False):
        super().__init__()
        self.query_token = nn.Parameter(torch.randn(1, 1, cfg.input_dim))
        self.pooler = AttentiveBlock(cfg.input_dim, cfg.output_dim, cfg.attn_num_heads, fp32_norm=fp32_norm)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [N, P, input_dim]`` → (pooled ``[N, output_dim]``, tokens ``[N, P, output_dim]``)."""
        p = self.pooler
        v = p.cross_attn.values(p.norm1_v(x))
        query = p.norm1_q(self.query_token.to(x.dtype).expand(x.shape[0], -1, -1))
        pooled = p.cross_attn(query, p.norm1_k(x), v).squeeze(1)
        tokens = p.cross_attn.proj(v)
        return pooled, tokens


class TextTower(nn.Module):
    """open_clip's text transformer used as LCL's causal model over interleaved sequences."""

    def __init__(
        self, cfg: TextCfg, embed_dim: int, *, quick_gelu: bool = False, fp32_norm: bool = False, impl: str = "auto"
    ):
        nn.Module.__init__(self)  # not super(): with open_clip loaded, its TextTransformer follows in the MRO
        self.cfg = cfg
        self.width = cfg.width
        self.context_length = cfg.context_length
        self.vocab_size = cfg.vocab_size
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(
            cfg.width, cfg.layers, cfg.heads, causal=True, mlp_ratio=cfg.mlp_ratio,
            ls_init_value=cfg.ls_init_value, quick_gelu=quick_gelu, fp32_norm=fp32_norm, impl=impl,
        )
        self.ln_final = LayerNorm(cfg.width, fp32=fp32_norm)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.width**-0.5)
        self.transformer.init_parameters()

    def lock(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze the tower as open_clip's text towers lock (``--lock-text``).

        Groups, first to last: the embeddings (``token_embedding``, ``positional_embedding``), each block
        but the last, the last block with ``ln_final``, then ``text_projection``. The last
        ``unlocked_layers`` groups stay trainable; ``freeze_layer_norm=False`` leaves every LayerNorm of
        the frozen groups trainable too.
        """
        blocks = list(self.transformer.resblocks)
        groups = [
            [self.token_embedding, self.positional_embedding], *blocks[:-1], [*blocks[-1:], self.ln_final],
            self.text_projection,
        ]
        _lock_groups(self, groups, unlocked_layers, "unlocked_layers")
        if not freeze_layer_norm:
            _set_trainable([m for m in self.modules() if isinstance(m, nn.LayerNorm)], True)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """``ln_final(h) @ text_projection``: the text feature at a ``<start_of_img>`` position."""
        x = self.ln_final(h)
        return x @ self.text_projection.to(x.dtype)


_OPEN_CLIP_TOWER = "OpenClipTextTower"


@functools.cache
def _with_open_clip_base(base: type) -> type:
    # Named as this module's attribute (see __getattr__) so that a pickled model finds its class again.
    attrs = {"__module__": __name__, "__qualname__": _OPEN_CLIP_TOWER, "__doc__": TextTower.__doc__}
    return type(_OPEN_CLIP_TOWER, (TextTower, base), attrs)


def __getattr__(name: str) -> type:
    if name == _OPEN_CLIP_TOWER:  # unpickling a model built inside open_clip's trainer
        import importlib

        return _with_open_clip_base(importlib.import_module("open_clip.transformer").TextTransformer)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def text_tower_class() -> type:
    """:class:`TextTower`, or, when open_clip is already imported (its trainer builds the model), a
    :class:`TextTower` that is also an instance of open_clip's ``TextTransformer``.

    open_clip's ``--precision bf16|fp16`` conversion (``convert_weights_to_lp``) converts
    ``text_projection`` only on modules of its own text classes (``isinstance(l, (CLIP, TextTransformer))``;
    older releases look for the attribute on any module): so it reaches ``text.text_projection`` as on
    the reference. Only the type is borrowed: TextTower's own methods and attributes come first, and
    open_clip is never imported from here.
    """
    base = getattr(sys.modules.get("open_clip.transformer"), "TextTransformer", None)
    if isinstance(base, type) and issubclass(base, nn.Module) and not issubclass(TextTower, base):
        return _with_open_clip_base(base)
    return TextTower
