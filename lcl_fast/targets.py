"""Which tokens LCL's two losses read: the value-dependent part of a batch, as index tensors.

Computed where the token values already sit on the host (the data loader's collate) so that a
training step on CUDA never waits for ``nonzero`` to read them back, and by
:meth:`lcl_fast.model.LCL.batch_targets` when a batch arrives without them.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

PAD_ID = 0  # the reference treats id 0 as padding in the generation labels


def target_token_ids(special_token_ids: Mapping[str, int], pad_id: int = PAD_ID) -> tuple[int, int, int, int]:
    """``(<start_of_img>, <img_placehold>, <end_of_img>, pad)``: the ids :func:`loss_targets` reads."""
    ids = special_token_ids
    return int(ids["<start_of_img>"]), int(ids["<img_placehold>"]), int(ids["<end_of_img>"]), int(pad_id)


def loss_targets(
    text: torch.Tensor,
    doc_ids: Optional[torch.Tensor],
    position_ids: Optional[torch.Tensor],
    token_ids: tuple[int, int, int, int],
) -> dict[str, torch.Tensor]:
    """``pair_text_index [P]``, ``pair_image_index [P]``, ``gen_index [T]`` of ``text [B, L]``.

    ``pair_text_index``: flat ``B·L`` positions of the ``<start_of_img>`` tokens that have context
    (position > 0); ``pair_image_index``: their images, numbered in row-major ``<start_of_img>``
    order; ``gen_index``: flat ``B·(L-1)`` positions whose next token is a label (not an image
    placeholder, ``<end_of_img>`` or padding, and in packed rows not across a document boundary).
    """
    soi_id, img_id, eoi_id, pad_id = token_ids
    positions = position_ids if position_ids is not None else torch.arange(text.shape[1], device=text.device)
    soi = text == soi_id
    has_context = (positions > 0).expand_as(text)
    # Images are in row-major order of their <start_of_img>; those opening a document have no context.
    pair_text = torch.nonzero((soi & has_context).flatten()).squeeze(1)
    pair_image = torch.nonzero(has_context[soi]).squeeze(1)
    nxt = text[:, 1:]
    mask = (nxt != img_id) & (nxt != eoi_id) & (nxt != pad_id)
    if doc_ids is not None:  # packed rows: no prediction across a document boundary
        mask &= doc_ids[:, 1:] == doc_ids[:, :-1]
    return {
        "pair_text_index": pair_text,
        "pair_image_index": pair_image,
        "gen_index": torch.nonzero(mask.flatten()).squeeze(1),
    }


def text_stats(text: torch.Tensor, token_ids: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """``(min id, max id, <img_placehold> count, <start_of_img> count)`` of ``text``: what
    :meth:`lcl_fast.model.LCL.check_inputs` reads. The loader computes them on the host, where the
    tokens already are, so that the training step reads nothing back from the device to check them."""
    if not text.numel():
        return (0, 0, 0, 0)
    soi_id, img_id = token_ids[0], token_ids[1]
    lo, hi, n_img, n_soi = torch.stack(
        [text.min(), text.max(), (text == img_id).sum(), (text == soi_id).sum()]
    ).tolist()  # one transfer: the model's own check, given no stats, reads them this way on its device
    return lo, hi, n_img, n_soi
