"""The heavy ops as ``torch.library`` custom ops (namespace ``lcl_fast``), so ``torch.compile`` keeps them.

A Triton launch or a Python loop over chunks cannot be traced with fake tensors: Dynamo would
break the graph there, or fail. Registered as custom ops with a fake (meta) implementation and
``register_autograd``, each op is one opaque node of the compiled graph, forward and backward,
with shapes known from its inputs' shapes (symbolic sizes included: no recompile when a batch's
pair or token count changes).

Each op module defines its own ops at import, below its public function, with the helpers here
(this module imports no op module: the registry's helpers below, the ops above).

Ops (``torch.ops.lcl_fast.*``); ``impl`` is ``"torch"`` or ``"triton"``:

- ``contrastive_fwd`` / ``contrastive_bwd``: the chunked contrastive loss
  (defined in :mod:`lcl_fast.ops.contrastive`); the forward also returns its per-row statistics
  ``stats [3 | 4, n, 2]`` (symmetric: row lse, column lse, label logit; else each direction's row
  lse and label logit), which the backward reads. The Triton path keeps each logsumexp as a
  (max, log2 sum) pair; the torch path's logsumexp and every label logit fill slot 0 only.
- ``linear_cross_entropy_fwd`` / ``linear_cross_entropy_bwd``: LM head + cross-entropy without
  logits (:mod:`lcl_fast.ops.linear_cross_entropy`). The torch path's fused strategy returns the
  gradients from the forward (``dh``, ``dw``; empty when not needed), the others a per-token
  ``lse [T]`` for the backward to recompute from.
- ``attention_triton_fwd`` / ``attention_triton_bwd``: the Triton interleaved attention kernels
  on a precomputed metadata table (:mod:`lcl_fast.kernels.attention_launch`).
- ``attention_torch_fwd`` / ``attention_torch_bwd``: the torch path's per-document attention
  (host loops over document runs), used under ``torch.compile`` only; it saves the output and
  each row's log-sum-exp, and its backward calls the CPU flash kernels' backward per document
  (elsewhere, or for scattered documents, the backward recomputes the forward).

Gradients not asked for come back as empty ``[0]`` tensors (a custom op returns no None).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

__all__ = ["autograd_inside_op", "empty"]

_EMPTY = (0,)


def empty(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The ``[0]`` tensor a custom op returns for a gradient or statistic not asked for (an op returns no None)."""
    return like.new_empty(_EMPTY, dtype=dtype or like.dtype)


@contextlib.contextmanager
def autograd_inside_op():
    """Autograd back on inside a custom op's kernel (the dispatcher turns it off below the op's
    own autograd formula), so that the backward can differentiate the recomputed forward."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for name in dir(torch._C.DispatchKey):
        if name.startswith("Autograd") or name == "ADInplaceOrView":
            try:
                excluded = excluded.remove(getattr(torch._C.DispatchKey, name))
            except RuntimeError:  # not a key a set can hold
                pass
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded):
        with torch.enable_grad():
            yield
