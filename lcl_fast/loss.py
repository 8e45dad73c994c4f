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

    Empty batches: where the reference divides by zero, lcl-fast returns 0. A batch (or a rank) with no
    image/context pair gives a contrastive loss of 0, and a batch whose generation labels are all
    padding gives a generation loss of 0; the reference returns NaN for both (a mean over nothing).
    The zero still backpropagates (zero gradients), and this holds for every ``impl``, ``"reference"``
    included: that path reproduces the reference's computation strategy, and a NaN on one rank would
    reach every rank's ``logit_scale`` gradient through the data-parallel all-reduce and ruin the run.
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
        generation_live: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if logits is not None:
            if logits.shape[:-1] != labels.shape:
                raise ValueError(f"logits {list(logits.shape)} do not match labels {list(labels.shape)}")
            # The mean over the non-pad labels, as F.cross_entropy's; with none the reference returns NaN,
            # this a zero that still backprops (see the class docstring). Sum / count reads no value on the
            # host (compiles whole).
            total = F.cross_entropy(logits, labels, ignore_index=self.pad_id, reduction="sum")
            return total / (labels != self.pad_id).sum().clamp_min(1).to(total.dtype)
        if hidden is None or lm_head_weight is None:
            raise ValueError("LCLLoss needs either logits or (hidden, lm_head_weight)")
        if hidden.shape[0] != labels.shape[0]:
            raise ValueError(f"hidden has {hidden.shape[0]} rows but labels has {labels.shape[0]}")
        if generation_live is not None and generation_live.shape != labels.shape:
            raise ValueError(
                f"generation_live {list(generation_live.shape)} does not match labels {list(labels.shape)}"
            )
        if lm_head_weight.dim() == 2 or lm_head_weight.shape[0] == 1:
            # One micro-batch (the static shape says so: no host sync): every row carries gradients.
            # squeeze, not [0]: a view's backward reshapes; indexing's fills a vocabulary-sized zero tensor
            weight = lm_head_weight if lm_head_weight.dim() == 2 else lm_head_weight.squeeze(0)
            return linear_cross_entropy(hidden, weight, labels, ignore_index=self.pad_id, impl=self.impl)
        # open_clip's cached-feature accumulation concatenated k micro-batches: rows of the others were
        # computed without gradients. Through logits they would reach nothing; here they must not reach
        # the LM head's weight either, so they see a detached copy. Same mean over every labelled row.
        if generation_live is None:
            raise ValueError("lm_head_weight holds several micro-batches' copies: pass generation_live too")
        weight = _stacked_lm_head_weight(lm_head_weight)
        live, cached = generation_live, ~generation_live
        sums = [
            linear_cross_entropy(hidden[rows], w, labels[rows], ignore_index=self.pad_id, reduction="sum",
                                 impl=self.impl)
            for rows, w in ((live, weight), (cached, weight.detach()))
        ]
        count = (labels != self.pad_id).sum().clamp(min=1)
        return (sums[0] + sums[1]) / count

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logits: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        logit_scale=None,
        output_dict: bool = False,
        *,
        hidden: Optional[torch.Tensor] = None,
        lm_head_weight: Optional[torch.Tensor] = None,
        generation_live: Optional[torch.Tensor] = None,
    ):
        """The reference's ``forward(image_features, text_features, logits, labels, logit_scale)``.

        From ``LCL(..., fused_generation_loss=True)`` the model's output has ``hidden``, ``lm_head_weight``
        and ``generation_live`` in place of ``logits``: pass the whole dict (``loss(**out)``).
        """
        if labels is None or logit_scale is None:
            raise ValueError("LCLLoss needs labels and logit_scale (pass the model's output: loss(**out))")
        contrastive = torch.tensor(0)
        if self.contrastive_loss_weight:
            contrastive = self.contrastive_loss_weight * self.contrastive(image_features, text_features, logit_scale)
        generation = self.generation_loss_weight * self.generation(
            logits, labels, hidden, lm_head_weight, generation_live
        )
        if output_dict:
            return {"contrastive_loss": contrastive, "caption_loss": generation}
        return contrastive, generation


def _stacked_lm_head_weight(weight: torch.Tensor) -> torch.Tensor:
    """The LM head's ``[V, W]`` weight from ``[k, V, W]``: one identical copy per concatenated micro-batch.
    The value is the first copy; the gradient reaches each copy that carries one (only the micro-batch
    being recomputed does)."""
    if weight.dim() != 3:
        raise ValueError(f"lm_head_weight must be [V, W] or [k, V, W], got {list(weight.shape)}")
    return weight[0].detach() + (weight - weight.detach()).sum(0)
