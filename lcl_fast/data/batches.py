"""Batches of one stream: raw samples become rows (tokens + prepared images), rows become batches.

:class:`RowMaker` turns a raw sample into a :class:`~lcl_fast.data.packing.Row` (or None, counted,
when nothing usable is left of it); :class:`BatchStream` packs the rows of one sample stream
(:mod:`lcl_fast.data.streams`, or a remote tar stream / shuffle buffer from
:mod:`lcl_fast.data.streaming`) into batches, each carrying the stream position right after it.

Layering: ``streams`` (positions, plans, random-access reading) <- ``streaming`` (remote tars,
the shuffle buffer) <- ``batches`` (rows and batches) <- ``loader``.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch

from .decode import prepare_image
from .errors import NoUsableData
from .packing import Row, RowPacker, add_targets, collate
from .sequences import InterleavedSequenceBuilder, PairedSequenceBuilder, select_mmc4_images
from .skips import BadSample, SkipCounter
from .streaming import make_sample_stream
from .streams import StreamConfig


class RowMaker:
    """Raw samples -> :class:`~lcl_fast.data.packing.Row` (tokens + prepared images), or None."""

    def __init__(self, cfg: StreamConfig):
        self.cfg = cfg
        if cfg.dataset_type == "webdataset":
            self.paired = PairedSequenceBuilder(
                cfg.tokenizer, cfg.context_length, cfg.num_img_token, cfg.img_first_prob
            )
        else:
            self.interleaved = InterleavedSequenceBuilder(
                cfg.tokenizer, cfg.context_length, cfg.num_img_token, cfg.img_first_prob
            )

    def _image(self, data: bytes, seed: int, skips: SkipCounter, where: str):
        try:
            return prepare_image(data, self.cfg.image_size, True, seed, self.cfg.backend)
        except ValueError as e:
            skips.add("image_decode", f"{where}: {e}")
            return None

    def __call__(self, raw: dict[str, Any], reader: Any, seed: int, skips: SkipCounter) -> Optional[Row]:
        rng = random.Random(seed)
        kind = self.cfg.dataset_type
        if kind == "webdataset":
            tokens = self.paired(raw["caption"], rng)
            image = self._image(raw["image"], rng.getrandbits(63), skips, f"{reader.path}: {raw['key']}")
            return None if image is None else Row(tokens, [image])
        if kind == "mmc4":
            return self._mmc4(raw, reader, rng, skips)
        return self._obelics(raw, reader, rng, skips)

    def _load(self, reader: Any, ref: Any, rng: random.Random, skips: SkipCounter, where: str):
        seed = rng.getrandbits(63)  # drawn whether or not the image loads: later draws stay put
        try:
            data = reader.read_image(ref)
        except BadSample as e:
            skips.bad(e)
            return None
        return self._image(data, seed, skips, where)

    def _mmc4(self, raw, reader, rng, skips) -> Optional[Row]:
        where = f"{reader.path}: doc {raw['key']}"
        sentences = raw["text_list"]
        chosen, malformed = select_mmc4_images(
            raw["image_info"],
            len(sentences),
            rng,
            sim_threshold=self.cfg.sim_threshold,
            max_images=self.cfg.max_images,
        )
        for _ in range(malformed):
            skips.add("image_info", f"{where}: malformed image_info entry")
        if hasattr(reader, "fetch_images"):  # remote images: all of the document's at once
            reader.fetch_images([name for _, name in chosen])
        loaded = [
            (ix, img)
            for ix, name in chosen
            if (img := self._load(reader, name, rng, skips, f"{where}: {name}")) is not None
        ]
        if not loaded:
            skips.add("doc_no_images", where)
            return None
        built = self.interleaved.from_sentences(
            sentences, [ix for ix, _ in loaded], self.interleaved.placements(len(loaded), rng)
        )
        if built is None:
            skips.add("doc_no_images", f"{where}: no image left after truncation")
            return None
        tokens, kept = built
        return Row(tokens, [img for _, img in loaded[:kept]])

    def _obelics(self, raw, reader, rng, skips) -> Optional[Row]:
        where = f"{reader.path}: row {raw['key']}"
        pieces: list[Optional[str]] = []
        images = []
        slots = 0
        for text, ref in zip(raw["texts"], raw["images"]):
            if ref is not None:
                slots += 1
                if slots > self.cfg.max_images:
                    continue
                img = self._load(reader, ref, rng, skips, where)
                if img is not None:
                    pieces.append(None)
                    images.append(img)
            elif isinstance(text, str):
                pieces.append(text)
        if not images:
            skips.add("doc_no_images", where)
            return None
        built = self.interleaved.from_pieces(pieces)
        if built is None:
            skips.add("doc_no_images", f"{where}: no image left after truncation")
            return None
        tokens, kept = built
        return Row(tokens, images[:kept])


class BatchStream:
    """Batches of one stream; each batch carries the stream position right after it."""

    def __init__(self, cfg: StreamConfig, stream_id: int, position: Optional[dict[str, Any]] = None):
        self.cfg = cfg
        self.samples = make_sample_stream(cfg, stream_id, position)
        self.make_row = RowMaker(cfg)
        self._carry: Optional[Row] = None
        self._carry_key: Optional[str] = None
        self.last_key = ""
        # To fail loudly instead of spinning when a whole data epoch gives no usable row. The
        # epoch is the one of the samples handed out (``last_id[0]``: never decreasing, a shuffle
        # buffer included), not the one the stream reads ahead in.
        pos = self.samples.position()
        fresh = pos["shard_pos"] == 0 and pos["offset"] == 0 and not pos.get("buffer")
        self._epoch: Optional[int] = pos["data_epoch"] if fresh else None
        self._whole, self._rows = fresh, 0  # whether _epoch was seen from its first sample

    def _next_row(self) -> Row:
        samples = self.samples
        while True:
            raw, reader, seed = samples.next()
            epoch = samples.last_id[0]
            if epoch != self._epoch:
                if self._whole and self._rows == 0:
                    raise NoUsableData(
                        f"stream {samples.sid}: a whole pass over its shards gave no usable sample; "
                        f"skipped: {samples.skips.snapshot()}; last: {samples.skips.last}"
                    )
                self._whole = self._epoch is not None
                self._epoch, self._rows = epoch, 0
            try:
                row = self.make_row(raw, reader, seed, samples.skips)
            except Exception as e:  # as above: counted and logged (rate-limited), never fatal
                samples.skips.add("error", f"{reader.path}: {raw.get('key')}: {type(e).__name__}: {e}")
                row = None
            if row is not None:
                self._rows += 1
                # what --data-audit records: data epoch, shard, key
                self.last_key = f"{samples.last_id[0]}\t{reader.path}\t{raw.get('key')}"
                return row

    def next_batch(self) -> dict[str, Any]:
        cfg = self.cfg
        packer = RowPacker(cfg.batch_size, cfg.context_length, cfg.pack)
        keys = []
        if self._carry is not None:
            packer.add(self._carry)
            keys.append(self._carry_key)
            self._carry = None
        while True:
            before = self.samples.position()
            row = self._next_row()
            if not packer.add(row):
                # The row opens the next batch; the position before it is where a restart resumes.
                self._carry, self._carry_key, position = row, self.last_key, before
                break
            keys.append(self.last_key)
            if packer.full():
                position = self.samples.position()
                break
        batch = collate(packer.take(), cfg.context_length, cfg.pack)
        add_targets(batch, cfg.tokenizer)  # in the worker: the step never reads token values back
        items = batch.pop("images")
        if items and all(isinstance(it, np.ndarray) for it in items):
            batch["images_u8"] = torch.from_numpy(np.stack(items))  # one shared-memory tensor from a worker
        else:
            batch["image_items"] = items
        batch["position"] = position
        batch["keys"] = keys
        return batch
