"""``LCLLoss``: a drop-in for the reference's loss, with lcl-fast's lean implementations behind it.

Contrastive part: :func:`lcl_fast.ops.contrastive.contrastive_loss` (chunked logsumexp, ragged
all-gather across ranks: no padded rows). Generation part: cross-entropy on the model's logits,
or :func:`lcl_fast.ops.linear_cross_entropy.linear_cross_entropy` when the model hands over hidden
states and the LM-head weight (``LCL(..., fused_generation_loss=True)``), so full logits never exist.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ._impl import check_impl
from .ops.contrastive import contrastive_loss
from .ops.linear_cross_entropy import linear_cross_entropy


class LCLLoss(nn.Module):
    """``weight_c · contrastive + weight_g · generation``, returned as the reference returns them.

    Constructor and ``forward`` match the reference; ``impl`` and ``chunk_size`` are lcl-fast's own.
    Under an initialised process group every rank's pairs take part (``local_loss`` semantics, as
    the reference requires), with different pair counts per rank.
    """

    def __init__(
        self,
        generation_loss_weight: float,
        contrastive_loss_weight: float,
        pad_id: int = 0,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        impl: str = "auto",
        chunk_size: Optional[int] = None,
    ):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod=True is not supported: launch with torchrun (torch.distributed)")
        self.generation_loss_weight = generation_loss_weight
        self.contrastive_loss_weight = contrastive_loss_weight
        self.pad_id = pad_id
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels  # accepted for compatibility; labels are implicit here
        self.rank = rank
        self.world_size = world_size
        self.impl = check_impl(impl)
        self.chunk_size = chunk_size

    def contrastive(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale) -> torch.Tensor:
        if image_features.shape != text_features.shape:
            raise ValueError(
                f"image_features {list(image_features.shape)} and text_features {list(text_features.shape)} "
                "must have the same shape (one row per image/context pair)"
            )
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed and not self.local_loss:
            raise ValueError(
                "LCLLoss under torch.distributed needs local_loss=True (the LCL reference supports only the local loss)"
            )
        return contrastive_loss(
            image_features, text_features, logit_scale,
            impl=self.impl, chunk_size=self.chunk_size, gather_with_grad=self.gather_with_grad,
        )

    def generation(
        self,
        logits: Optional[torch.Tensor],
        labels: torch.Tensor,
        hidden: Optional[torch.Tensor] = None,
        lm_head_weight: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if logits is not None:
            if logits.shape[:-1] != labels.shape:
                raise ValueError(f"logits {list(logits.shape)} do not match labels {list(labels.shape)}")
            # The mean over the non-pad labels, as F.cross_entropy's; with none the reference returns NaN,
            # this a zero that still backprops. Sum / count reads no value on the host (compiles whole).
            total = F.cross_entropy(logits, labels, ignore_index=self.pad_id, reduction="sum")
            return total / (labels != self.pad_id).sum().clamp_min(1).to(total.dtype)
        if hidden is None or lm_head_weight is None:
            raise ValueError("LCLLoss needs either logits or (hidden, lm_head_weight)")
        if hidden.shape[0] != labels.shape[0]:
            raise ValueError(f"hidden has {hidden.shape[0]} rows but labels has {labels.shape[0]}")
        return linear_cross_entropy(hidden, lm_head_weight, labels, ignore_index=self.pad_id, impl=self.impl)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logits: Optional[torch.Tensor],
        labels: torch.Tensor,
        logit_scale,
        output_dict: bool = False,
        *,
        hidden: Optional[torch.Tensor] = None,
        lm_head_weight: Optional[torch.Tensor] = None,
    ):
        contrastive = torch.tensor(0)
        if self.contrastive_loss_weight:
            contrastive = self.contrastive_loss_weight * self.contrastive(image_features, text_features, logit_scale)
        generation = self.generation_loss_weight * self.generation(logits, labels, hidden, lm_head_weight)
        if output_dict:
            return {"contrastive_loss": contrastive, "caption_loss": generation}
        return contrastive, generation
