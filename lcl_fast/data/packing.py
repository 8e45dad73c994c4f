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
from typing import Any

import torch


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


def drop_rows(batch: dict[str, Any], rows: Sequence[int]) -> dict[str, Any]:
    """``batch`` without the given rows (and their images); used when an image fails late."""
    drop = set(rows)
    keep = [b for b in range(batch["text_ids"].shape[0]) if b not in drop]
    out = dict(batch)
    for key in ("text_ids", "doc_ids", "position_ids", "num_images"):
        if out.get(key) is not None:
            out[key] = out[key][keep]
    return out


def row_of_image(num_images: torch.Tensor) -> list[int]:
    """For each image (row-major), the row holding it."""
    return [b for b, n in enumerate(num_images.tolist()) for _ in range(n)]
