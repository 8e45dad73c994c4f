"""Transformer building blocks with open_clip's parameter names (so reference checkpoints load).

Batch-first everywhere (``[B, L, W]``); the reference permutes to ``[L, B, W]`` around the same
computation. Attention goes through :class:`lcl_fast.nn.attention.MultiheadSelfAttention`, which
picks the reference, torch or Triton implementation.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import MultiheadSelfAttention


class LayerNorm(nn.LayerNorm):
    """LayerNorm that, like open_clip's ``LayerNormFp32``, can normalise in float32 for low-precision weights."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, *, fp32: bool = False):
        super().__init__(normalized_shape, eps=eps)
        self.fp32 = fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32 and x.dtype in (torch.float16, torch.bfloat16):
            return F.layer_norm(
                x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
            ).to(x.dtype)
        return super().forward(x)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        ls_init_value: Optional[float] = None,
        quick_gelu: bool = False,
        fp32_norm: bool = False,
        impl: str = "auto",
    ):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = LayerNorm(width, fp32=fp32_norm)
        self.attn = MultiheadSelfAttention(width, heads, impl=impl)
        self.ls_1 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ln_2 = LayerNorm(width, fp32=fp32_norm)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, hidden)),
                    ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
                    ("c_proj", nn.Linear(hidden, width)),
                ]
            )
        )
        self.ls_2 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), **attn_kwargs))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    """A stack of residual blocks under ``resblocks`` (open_clip's key names), with optional checkpointing."""

    def __init__(self, width: int, layers: int, heads: int, *, causal: bool, **block_kwargs):
        super().__init__()
        self.width = width
        self.layers = layers
        self.causal = causal
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, **block_kwargs) for _ in range(layers)]
        )

    def init_parameters(self) -> None:
        """open_clip's initialisation of the blocks."""
        attn_std = self.width**-0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, x: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        attn_kwargs.setdefault("causal", self.causal)
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False, **attn_kwargs)
            else:
                x = block(x, **attn_kwargs)
        return x
