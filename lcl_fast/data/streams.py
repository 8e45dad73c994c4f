"""Sample streams: which samples a stream reads, and in which order (the bottom of the stream layers).

A rank runs ``streams_per_rank`` streams (one per data-loader worker); stream ``s`` of
``n = world_size * streams_per_rank`` reads, in data epoch ``e``:

- **shard mode** (at least ``n`` shards): the shards ``perm_e[s::n]`` of a seeded permutation
  ``perm_e`` of the shard list, every sample of each;
- **sample mode** (fewer shards than streams): every shard in ``perm_e`` order, keeping the
  samples whose running index ``i`` satisfies ``i % n == s``.

Inside a shard the samples are visited in a seeded order (shuffled blocks, shuffled within each
block: a parquet row group is read once). Either way the streams of one data epoch partition the
samples: each is read exactly once. A stream never ends: after its last shard it starts data
epoch ``e + 1``. Its position is ``(data_epoch, shard_pos, offset)`` plus its skip counts, a few
integers; every sample's randomness (image placement, crop windows) comes from a seed mixed from
``(seed, data_epoch, shard, index)``, so a stream restarted from a position repeats itself exactly.

With ``resampled`` each stream draws its shards with replacement instead (as many per data epoch
as it would read without). Remote tars are read front to back instead of by index, and a sample
shuffle buffer may sit on top of either kind of stream: see :mod:`lcl_fast.data.streaming`.
Rows and batches are made above both, in :mod:`lcl_fast.data.batches`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Optional

from . import remote
from .errors import NoUsableData
from .readers import open_shard
from .remote import is_remote
from .sequences import MAX_IMAGES, SIM_THRESHOLD
from .skips import BadSample, SkipCounter


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    h = hashlib.blake2b(digest_size=8)
    for v in values:
        h.update(int(v).to_bytes(16, "little", signed=True))
    return int.from_bytes(h.digest(), "little") >> 1


@dataclass
class StreamConfig:
    """Everything a stream needs; picklable, shipped to data-loader workers."""

    dataset_type: str  # "webdataset" | "mmc4" | "obelics"
    shards: list[str]
    shard_sizes: Optional[list[int]]  # needed in sample mode only
    tokenizer: Any
    batch_size: int
    context_length: int
    num_img_token: int
    image_size: int
    img_first_prob: float = 0.5
    pack: bool = False
    world_size: int = 1
    rank: int = 0
    streams_per_rank: int = 1
    seed: int = 0
    backend: str = "pil"  # "pil": decode on the host; "dali": read headers, decode later
    image_root: Optional[str] = None
    shuffle: bool = True
    sim_threshold: float = SIM_THRESHOLD
    max_images: int = MAX_IMAGES
    shuffle_buffer: int = 0  # samples held by each stream's shuffle buffer (0: none)
    resampled: bool = False  # shards drawn with replacement (open_clip's --dataset-resampled)
    cache_dir: Optional[str] = None  # remote shards are copied whole here first (else streamed)

    @property
    def num_streams(self) -> int:
        return self.world_size * self.streams_per_rank

    @property
    def sample_mode(self) -> bool:
        return len(self.shards) < self.num_streams and not self.resampled

    @property
    def streamed(self) -> bool:
        """Remote tars without a cache: read front to back (no random access, no index)."""
        return self.dataset_type == "webdataset" and not self.cache_dir and any(map(is_remote, self.shards))


def new_position() -> dict[str, Any]:
    return {"data_epoch": 0, "shard_pos": 0, "offset": 0, "skips": {}}


class SampleStream:
    """The raw samples of stream ``stream_id``, forever, from a restorable position."""

    def __init__(self, cfg: StreamConfig, stream_id: int, position: Optional[dict[str, Any]] = None):
        if not 0 <= stream_id < cfg.num_streams:
            raise ValueError(f"stream_id {stream_id} outside [0, {cfg.num_streams})")
        if cfg.sample_mode and cfg.shard_sizes is None:
            raise ValueError("sample mode (fewer shards than streams) needs shard_sizes")
        self.cfg = cfg
        self.sid = stream_id
        pos = position or new_position()
        self.data_epoch, self.shard_pos, self.offset = pos["data_epoch"], pos["shard_pos"], pos["offset"]
        self.skips = SkipCounter(pos.get("skips"))
        self._plan: tuple[int, list[int]] = (-1, [])
        self._fetching: dict[str, Any] = {}  # url -> Future of a shard fetched ahead
        self._open: tuple[Any, ...] = ()  # (data_epoch, shard_pos, reader, order)
        # To fail loudly instead of spinning when a whole pass over the shards yields nothing.
        self._whole_epoch = self.shard_pos == 0 and self.offset == 0
        self._returned = 0

    def position(self) -> dict[str, Any]:
        return {
            "data_epoch": self.data_epoch,
            "shard_pos": self.shard_pos,
            "offset": self.offset,
            "skips": self.skips.snapshot(),
        }

    def plan(self, epoch: int) -> list[int]:
        """Shard ids (into ``cfg.shards``) this stream reads in data epoch ``epoch``."""
        if self._plan[0] != epoch and self.cfg.resampled:
            # With replacement: each stream draws its own shards, as many per data epoch as it
            # would read without replacement.
            rng = random.Random(mix_seed(self.cfg.seed, epoch, self.sid, 5))
            n = len(self.cfg.shards)
            self._plan = (epoch, [rng.randrange(n) for _ in range(-(-n // self.cfg.num_streams))])
        if self._plan[0] != epoch:
            order = list(range(len(self.cfg.shards)))
            if self.cfg.shuffle:
                random.Random(mix_seed(self.cfg.seed, epoch, 1)).shuffle(order)
            mine = order if self.cfg.sample_mode else order[self.sid :: self.cfg.num_streams]
            self._plan = (epoch, mine)
        return self._plan[1]

    def _sample_order(self, shard_id: int, reader: Any, plan: list[int]) -> list[int]:
        cfg = self.cfg
        rng = random.Random(mix_seed(cfg.seed, self.data_epoch, shard_id, 2))
        blocks = list(reader.blocks)
        if cfg.shuffle:
            rng.shuffle(blocks)
        order: list[int] = []
        for start, count in blocks:
            part = list(range(start, start + count))
            if cfg.shuffle:
                rng.shuffle(part)
            order.extend(part)
        if cfg.sample_mode:
            base = sum(cfg.shard_sizes[s] for s in plan[: self.shard_pos])
            n, sid = cfg.num_streams, self.sid
            order = [i for p, i in enumerate(order) if (base + p) % n == sid]
        return order

    def _close(self) -> None:
        if self._open:
            self._open[2].close()
        self._open = ()

    def _fetch_ahead(self, plan: list[int]) -> None:
        """Remote shards read whole (MMC4 jsonl; any shard with a cache folder): wait for the
        current one if it is being fetched, and start fetching the next one."""
        cfg = self.cfg
        if not (cfg.cache_dir or cfg.dataset_type == "mmc4"):
            return
        current = cfg.shards[plan[self.shard_pos]]
        pending = self._fetching.pop(current, None)
        if pending is not None:
            pending.exception()  # its errors (if any) come again, and are counted, when it is opened
        if self.shard_pos + 1 < len(plan):
            url = cfg.shards[plan[self.shard_pos + 1]]
            if is_remote(url) and url not in self._fetching:
                for stale in list(self._fetching):  # a restored stream may leave one behind
                    self._fetching.pop(stale).cancel()
                self._fetching[url] = remote.pool("shards", 2).submit(remote.prefetch_whole, url, cfg.cache_dir)

    def _next_data_epoch(self, shards: int) -> None:
        """Past the plan's last shard: start the next data epoch (a whole pass without one readable
        sample is an error, not an endless loop)."""
        self._close()
        if self._whole_epoch and self._returned == 0:
            raise NoUsableData(
                f"stream {self.sid}: a whole pass over its {shards} shards gave no readable sample; "
                f"skipped: {self.skips.snapshot()}; last: {self.skips.last}"
            )
        self.data_epoch, self.shard_pos, self.offset = self.data_epoch + 1, 0, 0
        self._whole_epoch, self._returned = True, 0

    def next(self) -> tuple[dict[str, Any], Any, int]:
        """``(raw sample, its shard reader, its seed)``; bad samples are counted and passed over."""
        cfg = self.cfg
        while True:
            plan = self.plan(self.data_epoch)
            if self.shard_pos >= len(plan):
                self._next_data_epoch(len(plan))
                continue
            if not self._open or self._open[:2] != (self.data_epoch, self.shard_pos):
                self._close()
                shard_id = plan[self.shard_pos]
                self._fetch_ahead(plan)
                try:
                    reader = open_shard(cfg.dataset_type, cfg.shards[shard_id], cfg.image_root, cfg.cache_dir)
                except BadSample as e:
                    self.skips.bad(e)
                    self.shard_pos, self.offset = self.shard_pos + 1, 0
                    continue
                self._open = (
                    self.data_epoch,
                    self.shard_pos,
                    reader,
                    self._sample_order(shard_id, reader, plan),
                )
            reader, order = self._open[2], self._open[3]
            if self.offset >= len(order):
                self._close()
                self.shard_pos, self.offset = self.shard_pos + 1, 0
                continue
            index = order[self.offset]
            self.offset += 1
            try:
                raw = reader.read(index)
            except BadSample as e:
                self.skips.bad(e)
                continue
            except Exception as e:  # web data finds every corner: never let one sample end the run
                self.skips.add("error", f"{reader.path}: sample {index}: {type(e).__name__}: {e}")
                continue
            self._returned += 1
            self.last_id = [self.data_epoch, self.shard_pos, index]
            return raw, reader, mix_seed(cfg.seed, self.data_epoch, plan[self.shard_pos], index, 3)

    def refetch(self, ids: list[list[int]]) -> list[Optional[tuple]]:
        """``(id, raw, reader, seed)`` of samples ``[data_epoch, shard_pos, index]`` read before
        (a restored shuffle buffer); None for one that cannot be read any more."""
        cfg, out, readers = self.cfg, [], {}
        for sample_id in ids:
            epoch, pos, index = sample_id[:3]
            shard_id = self.plan(epoch)[pos]
            try:
                if shard_id not in readers:
                    readers[shard_id] = open_shard(
                        cfg.dataset_type, cfg.shards[shard_id], cfg.image_root, cfg.cache_dir
                    )
                raw = readers[shard_id].read(index)
            except Exception as e:  # counted; the restored buffer is one sample short
                self.skips.add("error", f"{cfg.shards[shard_id]}: sample {index} on resume: {e}")
                out.append(None)
                continue
            out.append((list(sample_id), raw, readers[shard_id], mix_seed(cfg.seed, epoch, shard_id, index, 3)))
        for reader in readers.values():
            reader.close()
        return out
