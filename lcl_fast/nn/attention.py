"""Multi-head self-attention with the reference's parameter names, over ``interleaved_attention``.

The parameters are those of ``torch.nn.MultiheadAttention`` (``in_proj_weight [3W, W]``,
``in_proj_bias [3W]``, ``out_proj``), so open_clip checkpoints load unchanged. The input is
batch first ``[B, L, W]``. ``impl="reference"`` runs ``F.multi_head_attention_forward`` with
the reference's additive ``-inf`` mask; the other impls project once, attend with
:func:`lcl_fast.ops.attention.interleaved_attention` (document packing, padding, image
blocks) and project back.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lcl_fast._impl import check_impl
from lcl_fast.ops.attention import interleaved_attention

__all__ = ["MultiheadSelfAttention"]


class MultiheadSelfAttention(nn.MultiheadAttention):
    """Self-attention ``[B, L, W] -> [B, L, W]`` with ``heads`` heads of ``W / heads`` channels.

    A ``torch.nn.MultiheadAttention`` by type, so code that finds attention by module type treats it as
    the reference's (open_clip's ``convert_weights_to_lp`` casts ``in_proj_*`` for ``--precision bf16``;
    quantisation and FSDP wrapping policies match it the same way); same parameters and state-dict keys.
    Only :meth:`forward` differs: batch-first self-attention over the interleaved-attention ops.
    """

    def __init__(self, width: int, heads: int, *, impl: str = "auto") -> None:
        if width <= 0 or heads <= 0 or width % heads:
            raise ValueError(f"width ({width}) must be a positive multiple of heads ({heads})")
        # torch's constructor draws the initialisation (xavier in_proj, zero biases): the reference's.
        super().__init__(width, heads, batch_first=True)
        self.width = width
        self.heads = heads
        self.impl = check_impl(impl)
        # out_proj drawn once more, as lcl-fast 0.1 did: a seed gives the same model as before
        self.out_proj.reset_parameters()
        nn.init.zeros_(self.out_proj.bias)

    def reset_parameters(self) -> None:
        """The initialisation of ``torch.nn.MultiheadAttention``."""
        self._reset_parameters()

    def extra_repr(self) -> str:
        return f"width={self.width}, heads={self.heads}, impl={self.impl!r}"

    def forward(  # type: ignore[override]  # self-attention over one input, not (query, key, value)
        self,
        x: torch.Tensor,
        *,
        causal: bool = True,
        doc_ids: Optional[torch.Tensor] = None,
        image_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Attend over ``x [B, L, W]``; see ``interleaved_attention`` for the metadata."""
        if x.dim() != 3 or x.shape[-1] != self.width:
            raise ValueError(f"x must be [B, L, {self.width}], got {tuple(x.shape)}")
        batch, length, _ = x.shape
        if self.impl == "reference" and doc_ids is None and image_ids is None:
            return self._reference_forward(x, causal)
        head_dim = self.width // self.heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = interleaved_attention(q, k, v, doc_ids=doc_ids, image_ids=image_ids, causal=causal, impl=self.impl)
        out = out.transpose(1, 2).reshape(batch, length, self.width)
        return self.out_proj(out)

    def _reference_forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        """open_clip's text attention: ``nn.MultiheadAttention`` with a float ``-inf`` mask."""
        length = x.shape[1]
        mask = None
        if causal:
            mask = torch.full((length, length), float("-inf"), dtype=x.dtype, device=x.device).triu_(1)
        xt = x.transpose(0, 1)
        out, _ = F.multi_head_attention_forward(
            xt, xt, xt, self.width, self.heads,
            self.in_proj_weight, self.in_proj_bias,
            None, None, False, 0.0,
            self.out_proj.weight, self.out_proj.bias,
            training=self.training, need_weights=False, attn_mask=mask,
        )
        return out.transpose(0, 1)
