"""One batch through model and loss, eager or compiled: the part of a training step ``--torchcompile`` compiles.

The value-dependent work of a batch (which ``<start_of_img>`` tokens pair with which images,
which positions predict a label) comes with it from the data loader, computed on the host; the
checks on token ids run here in eager mode, once per batch (:func:`prepare_batch`); the compiled
region (:func:`model_and_loss`) then depends on token values through no shape. Counts that vary
from batch to batch (images, pairs, generation tokens) are marked dynamic, so that one compiled
graph serves them all instead of one per count.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
from torch import nn

from .distributed import residual_blocks, unwrap

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


def _is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def compile_wrapped(model: nn.Module, **options: Any) -> str:
    """Compile the module under a DDP / FSDP2 wrapper so that the wrapper's hooks run outside the graphs.

    Dynamo cannot trace DDP's forward (its reducer bookkeeping) nor FSDP2's hooks (they are marked
    skipped), so a ``fullgraph`` compile of a function that calls the wrapped model fails. As in
    torchtitan: under DDP the inner LCL module is compiled whole (``nn.Module.compile``: DDP calls
    it between its pre- and post-forward); under FSDP2 each residual block is compiled (``fully_shard``
    wraps each block: its all-gather and reduce-scatter hooks run between the blocks' graphs), and
    one graph serves every block of a tower. Returns what was compiled (``"module"`` / ``"blocks"``).
    """
    lcl = unwrap(model)
    if _is_fsdp(lcl):
        for block in residual_blocks(lcl):
            block.compile(**options)
        return "blocks"
    lcl.compile(**options)
    return "module"


class StepFunction:
    """``model_and_loss`` over a prepared batch; with ``compile``, through ``torch.compile``'d code.

    One process: model + loss compile as one graph. Under DDP / FSDP2 (a wrapped ``model``) the
    wrapper's hooks run eagerly around the compiled module (DDP) or blocks (FSDP2), see
    :func:`compile_wrapped`; the loss then runs eagerly: its contrastive half gathers a ragged
    number of pairs from every rank (counts read on the host), which no graph can hold.
    ``fullgraph=True``: a graph break inside what is compiled is an error, not a silent slowdown.
    ``backend``/``mode`` pass to ``torch.compile`` (tests use ``"aot_eager"``); the default backend is
    ``$LCL_FAST_COMPILE_BACKEND``, else ``"inductor"``.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, *, compile: bool = False,
                 backend: Any = None, mode: Optional[str] = None, fullgraph: bool = True) -> None:
        self.model, self.loss_fn, self.compiled = model, loss_fn, compile
        fn: Callable = model_and_loss
        self.compiled_part = None  # "step" (model + loss) / "module" (DDP) / "blocks" (FSDP2)
        if compile:
            backend = backend or os.environ.get("LCL_FAST_COMPILE_BACKEND") or "inductor"
            options = {"backend": backend, "mode": mode, "fullgraph": fullgraph, "dynamic": None}
            if unwrap(model) is model and not _is_fsdp(model):
                fn, self.compiled_part = torch.compile(model_and_loss, **options), "step"
            else:
                self.compiled_part = compile_wrapped(model, **options)
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
