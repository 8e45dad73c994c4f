"""Rows into batches: one sample per row (zero padded), or several short samples per row (packing).

A packed row concatenates whole samples (never split) and carries, per token:

- ``doc_ids``: the sample's index inside its row (0, 1, ...), ``-1`` on the padding at the end:
  attention stays inside a document and the generation loss skips the position before each
  document start (``doc_ids[t + 1] != doc_ids[t]``), so every document's losses are what they
  would be on its own row;
- ``position_ids``: 0, 1, ... restarting at each document (0 on padding), so a document's
  positional embeddings, and its "image at position 0 has no context" rule, are unchanged.

:class:`RowPacker` fills ``batch_size`` rows first-fit, in arrival order, and closes the batch
at the first sample that fits in none of them (that sample opens the next batch), so the
packing depends only on the sample sequence. Images keep the row-major order of their
``<start_of_img>`` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..targets import PAD_ID, loss_targets, target_token_ids, text_stats


@dataclass
class Row:
    """One sample: its token ids (unpadded) and its images' payloads, in order of appearance."""

    tokens: list[int]
    images: list[Any] = field(default_factory=list)


class RowPacker:
    """First-fit packing of rows into ``batch_size`` bins of ``context_length`` tokens."""

    def __init__(self, batch_size: int, context_length: int, pack: bool):
        if batch_size < 1 or context_length < 1:
            raise ValueError(f"batch_size ({batch_size}) and context_length ({context_length}) must be >= 1")
        self.batch_size = batch_size
        self.context_length = context_length
        self.pack = pack
        self.bins: list[list[Row]] = []
        self._free: list[int] = []

    def add(self, row: Row) -> bool:
        """Place ``row``; False when the batch is full and the row must open the next one."""
        n = len(row.tokens)
        if n > self.context_length:
            raise ValueError(f"row of {n} tokens exceeds context_length {self.context_length}")
        if self.pack:
            for b, free in enumerate(self._free):
                if n <= free:
                    self.bins[b].append(row)
                    self._free[b] -= n
                    return True
        if len(self.bins) >= self.batch_size:
            return False
        self.bins.append([row])
        self._free.append(self.context_length - n)
        return True

    def full(self) -> bool:
        """No more rows will fit (unpacked: ``batch_size`` rows; packed: every bin exactly full)."""
        return len(self.bins) >= self.batch_size and (not self.pack or not any(self._free))

    def take(self) -> list[list[Row]]:
        bins, self.bins, self._free = self.bins, [], []
        return bins


def collate(bins: Sequence[Sequence[Row]], context_length: int, packed: bool) -> dict[str, Any]:
    """Bins of rows -> ``text_ids [B, C]``, ``doc_ids``/``position_ids`` (None unless ``packed``),
    ``num_images [B]`` (images per row), ``images`` (payloads in row-major order), ``pad_tokens``."""
    batch = len(bins)
    text = torch.zeros(batch, context_length, dtype=torch.long)
    doc_ids = torch.full((batch, context_length), -1, dtype=torch.long) if packed else None
    positions = torch.zeros(batch, context_length, dtype=torch.long) if packed else None
    num_images = torch.zeros(batch, dtype=torch.long)
    images: list[Any] = []
    used = 0
    for b, rows in enumerate(bins):
        start = 0
        for d, row in enumerate(rows):
            n = len(row.tokens)
            text[b, start : start + n] = torch.tensor(row.tokens, dtype=torch.long)
            if packed:
                doc_ids[b, start : start + n] = d
                positions[b, start : start + n] = torch.arange(n)
            start += n
            images.extend(row.images)
            num_images[b] += len(row.images)
        used += start
    return {
        "text_ids": text,
        "doc_ids": doc_ids,
        "position_ids": positions,
        "num_images": num_images,
        "images": images,
        "pad_tokens": batch * context_length - used,
    }


def add_targets(batch: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """Add the losses' index tensors (:func:`lcl_fast.targets.loss_targets`), the counts the model's
    input checks read (``text_stats``) and the token ids they were computed with (``target_token_ids``)
    to a collated batch, when ``tokenizer`` names LCL's special tokens; the training step uses them
    when the model's ids agree."""
    special = getattr(tokenizer, "special_token_ids", None)
    try:
        token_ids = target_token_ids(special)
    except (KeyError, TypeError):
        return batch
    batch["targets"] = loss_targets(batch["text_ids"], batch.get("doc_ids"), batch.get("position_ids"), token_ids)
    batch["text_stats"] = text_stats(batch["text_ids"], token_ids)
    batch["target_token_ids"] = token_ids
    return batch


def sample_token_counts(
    text: torch.Tensor, doc_ids: Optional[torch.Tensor], pad_id: int = PAD_ID
) -> tuple[int, int]:
    """(samples, tokens) of a batch, as users count them.

    Samples are image–text pairs (paired data: one per row) or documents (interleaved data; a
    packed row holds several, numbered ``0, 1, ...`` in ``doc_ids``), never rows. Tokens are the
    non-padding ``text`` slots that reach the model: packed, those with ``doc_ids >= 0``;
    unpacked, each row up to its last non-``pad_id`` token (the collate pads at the end only).
    One read of two integers (a host sync for device tensors).
    """
    if doc_ids is not None:
        counts = torch.stack([(doc_ids.amax(dim=1) + 1).clamp_min(0).sum(), (doc_ids >= 0).sum()])
    else:
        nonpad = text != pad_id
        # length of each row = position after its last non-pad token (0 for an all-pad row)
        last = text.shape[1] - torch.argmax(nonpad.flip(1).int(), dim=1)
        lengths = torch.where(nonpad.any(dim=1), last, torch.zeros_like(last))
        counts = torch.stack([torch.tensor(text.shape[0], device=text.device), lengths.sum()])
    samples, tokens = counts.tolist()
    return int(samples), int(tokens)


def drop_rows(batch: dict[str, Any], rows: Sequence[int]) -> dict[str, Any]:
    """``batch`` without the given rows (and their images); used when an image fails late.
    Its loss targets, if any, are recomputed for the rows kept."""
    drop = set(rows)
    keep = [b for b in range(batch["text_ids"].shape[0]) if b not in drop]
    out = dict(batch)
    for key in ("text_ids", "doc_ids", "position_ids", "num_images"):
        if out.get(key) is not None:
            out[key] = out[key][keep]
    if out.get("target_token_ids") is not None:
        token_ids = out["target_token_ids"]
        out["targets"] = loss_targets(out["text_ids"], out.get("doc_ids"), out.get("position_ids"), token_ids)
        out["text_stats"] = text_stats(out["text_ids"], token_ids)
    return out


def row_of_image(num_images: torch.Tensor) -> list[int]:
    """For each image (row-major), the row holding it."""
    return [b for b, n in enumerate(num_images.tolist()) for _ in range(n)]
