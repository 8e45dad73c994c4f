"""One batch through model and loss, eager or compiled: the part of a training step ``--torchcompile`` compiles.

The value-dependent work of a batch (which ``<start_of_img>`` tokens pair with which images,
which positions predict a label) comes with it from the data loader, computed on the host; the
checks on token ids run here in eager mode, once per batch (:func:`prepare_batch`); the compiled
region (:func:`model_and_loss`) then depends on token values through no shape. Counts that vary
from batch to batch (images, pairs, generation tokens) are marked dynamic, so that one compiled
graph serves them all instead of one per count.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from .distributed import unwrap

# batch keys a compiled step receives, and the dimension of each that varies between batches
_DYNAMIC_DIMS = {"images": 0, "pair_text_index": 0, "pair_image_index": 0, "gen_index": 0}


def prepare_batch(model: nn.Module, batch: dict, *, check: bool = True) -> dict[str, Any]:
    """The model's inputs for ``batch`` (loader dict): images, text, packing ids and :meth:`LCL.batch_targets`
    (the loader's, computed on the host, when its ``target_token_ids`` are the model's).

    ``check`` runs :meth:`LCL.check_inputs` (clear errors on bad token ids), on the loader's host-side
    ``text_stats`` when it has them (else one host sync).
    """
    lcl = unwrap(model)
    text, doc_ids, position_ids = batch["text_ids"], batch.get("doc_ids"), batch.get("position_ids")
    from_loader = tuple(batch.get("target_token_ids") or ()) == lcl.target_token_ids
    targets = batch.get("targets") if from_loader else None
    if targets is None:
        targets = lcl.batch_targets(text, doc_ids, position_ids)
    if check:
        stats = batch.get("text_stats") if from_loader else None
        lcl.check_inputs(batch["images"], text, doc_ids=doc_ids, position_ids=position_ids, targets=targets,
                         text_stats=stats)
    return {"images": batch["images"], "text": text, "doc_ids": doc_ids, "position_ids": position_ids, **targets}


def mark_dynamic(inputs: dict[str, Any]) -> None:
    """Mark the varying counts dynamic (a hint: a count that never varies may still specialise)."""
    for key, dim in _DYNAMIC_DIMS.items():
        t = inputs.get(key)
        if isinstance(t, torch.Tensor):
            torch._dynamo.maybe_mark_dynamic(t, dim)


def model_and_loss(
    model: nn.Module,
    loss_fn: nn.Module,
    images: torch.Tensor,
    text: torch.Tensor,
    doc_ids: Optional[torch.Tensor],
    position_ids: Optional[torch.Tensor],
    pair_text_index: torch.Tensor,
    pair_image_index: torch.Tensor,
    gen_index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted contrastive loss, weighted generation loss) of one batch: the compiled region.
    The inputs come from :func:`prepare_batch`, which checked them: the forward does not again."""
    out = model(
        images, text, doc_ids=doc_ids, position_ids=position_ids,
        pair_text_index=pair_text_index, pair_image_index=pair_image_index, gen_index=gen_index, check=False,
    )  # fmt: skip
    losses = loss_fn(**out, output_dict=True)
    return losses["contrastive_loss"], losses["caption_loss"]


class StepFunction:
    """``model_and_loss`` over a prepared batch; with ``compile``, through one ``torch.compile``'d callable.

    ``fullgraph=True``: a graph break inside model or loss is an error, not a silent slowdown.
    ``backend``/``mode`` pass to ``torch.compile`` (tests use ``"aot_eager"``).
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, *, compile: bool = False,
                 backend: Any = "inductor", mode: Optional[str] = None, fullgraph: bool = True) -> None:
        self.model, self.loss_fn, self.compiled = model, loss_fn, compile
        fn: Callable = model_and_loss
        if compile:
            fn = torch.compile(model_and_loss, backend=backend, mode=mode, fullgraph=fullgraph, dynamic=None)
        self._fn = fn

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = prepare_batch(self.model, batch)
        if self.compiled:
            mark_dynamic(inputs)
        return self._fn(self.model, self.loss_fn, **inputs)


def compilations() -> int:
    """Graphs Dynamo has compiled in this process so far (first compilations and recompilations)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))
