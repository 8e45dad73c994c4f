"""Streamed remote tars and the sample shuffle buffer, both restorable from a few integers.

:class:`TarStream` reads the webdataset tars of a stream's plan front to back (``tarfile`` stream
mode over :class:`~lcl_fast.data.remote.ReadAhead`: bounded memory, the next shard fetched while
the current one is consumed). Its position adds to :class:`~lcl_fast.data.streams.SampleStream`'s
``(data_epoch, shard_pos, offset)`` the byte where the next sample's first header starts, so a
restart (or a retry after a dropped connection) opens the object there with a range request.
Compressed tars (``.tar.gz``) and pipes cannot seek: a restart reads the shard again and drops
the samples already consumed. A shard that cannot be read after retries is counted
(``shard_unreadable``, or ``shard_missing`` when it does not exist) and the stream goes on.

:class:`ShuffleBuffer` is webdataset's sample shuffle: it holds ``n`` samples, and each call puts
in the next sample of the stream and takes out a random one. It holds one data epoch at a time:
when the next epoch's first sample comes in, it waits until this epoch's samples are all out, so
a stream's share of the data smaller than ``n`` is simply held whole (small data needs no
smaller buffer) and the samples handed out keep the data epochs in order. The draws come from
``(seed, stream, draw count)``, so the order is a function of the seed; the buffer's state is the
ids of the samples it holds (``[data_epoch, shard_pos, index, byte]``) plus the draw count. A
restored buffer reads those samples again (by index from local shards; remote tars are streamed
again from the earliest byte needed), so resuming gives exactly the uninterrupted order.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import Any, Optional

from .readers import _KEY_EXT, IMAGE_EXTS, pair_from_members
from .remote import ReadAhead, ShardReadError, is_remote
from .skips import BadSample
from .streams import SampleStream, StreamConfig, mix_seed

_WANTED = (*IMAGE_EXTS, "txt", "json")


class _Source:
    """What the row maker needs of a streamed shard: its name."""

    def __init__(self, path: str):
        self.path = path

    def close(self) -> None:
        pass


def byte_seekable(url: str) -> bool:
    """Uncompressed tars over a seekable filesystem resume by byte; the rest by skipping samples."""
    return url.endswith(".tar") and not url.startswith("pipe:")


def tar_samples(fileobj: Any, base: int = 0, first: int = 0) -> Iterator[tuple[int, int, str, dict, int]]:
    """``(index, start byte, key, {ext: bytes or None}, next sample's start byte)`` of a tar read
    front to back; ``base`` / ``first``: byte and sample index where ``fileobj`` starts. The next
    start is -1 after the last sample. Members of other types are passed over (their ext kept, as
    ``None``, so an incomplete sample can name them)."""
    index, key, members, start = first, None, {}, base
    with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
        for member in tf:
            if not member.isfile():
                continue
            m = _KEY_EXT.match(member.name)
            if m is None:
                continue
            prefix, ext = m.group(1), m.group(2).lower()
            if key is None or prefix != key or ext in members:
                if key is not None:
                    yield index, start, key, members, base + member.offset
                    index += 1
                key, members, start = prefix, {}, base + member.offset
            members[ext] = tf.extractfile(member).read() if ext in _WANTED else None
    if key is not None:
        yield index, start, key, members, -1


class TarStream(SampleStream):
    """A :class:`SampleStream` over remote tars, read front to back (see the module docstring)."""

    def __init__(self, cfg: StreamConfig, stream_id: int, position: Optional[dict[str, Any]] = None):
        super().__init__(cfg, stream_id, position)
        self.byte = int((position or {}).get("byte", 0))
        self._gen: Optional[Iterator] = None
        self._key: tuple[int, int] = (-1, -1)
        self._ahead: Optional[ReadAhead] = None
        self._next_ahead: Optional[tuple[tuple[int, int], ReadAhead]] = None

    def position(self) -> dict[str, Any]:
        return {**super().position(), "byte": self.byte}

    def _stream_from(self, url: str, byte: int, first: int, prefetched: Optional[ReadAhead] = None):
        """A sample generator for ``url`` starting at sample ``first`` (at ``byte`` when seekable)."""
        seekable = byte_seekable(url)
        ahead = prefetched or ReadAhead(url, byte if seekable else 0)

        def gen():
            skip = 0 if seekable else first
            for item in tar_samples(ahead, byte if seekable else 0, first if seekable else 0):
                if skip:  # read again from the start: drop what was consumed (indices stay absolute)
                    skip -= 1
                    continue
                yield item

        return ahead, gen()

    def _close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
        self._ahead, self._gen, self._key = None, None, (-1, -1)

    def _prefetch(self, plan: list[int]) -> None:
        """Start reading the shard after the current one (the next data epoch's first at the end)."""
        if self.shard_pos + 1 < len(plan):
            key, shard_id = (self.data_epoch, self.shard_pos + 1), plan[self.shard_pos + 1]
        else:
            key, shard_id = (self.data_epoch + 1, 0), self.plan(self.data_epoch + 1)[0]
            self.plan(self.data_epoch)  # keep the current epoch's plan cached
        if self._next_ahead is None or self._next_ahead[0] != key:
            self._drop_prefetch()
            self._next_ahead = (key, ReadAhead(self.cfg.shards[shard_id], 0))

    def _drop_prefetch(self) -> None:
        if self._next_ahead is not None:
            self._next_ahead[1].close()
        self._next_ahead = None

    def _advance(self) -> None:
        self._close()
        self.shard_pos, self.offset, self.byte = self.shard_pos + 1, 0, 0

    def next(self) -> tuple[dict[str, Any], Any, int]:
        cfg = self.cfg
        while True:
            plan = self.plan(self.data_epoch)
            if self.shard_pos >= len(plan):
                self._next_data_epoch(len(plan))
                self.byte = 0
                continue
            shard_id = plan[self.shard_pos]
            url = cfg.shards[shard_id]
            if self.byte < 0:  # the previous sample was the shard's last
                self._advance()
                continue
            if self._gen is None or self._key != (self.data_epoch, self.shard_pos):
                self._close()
                key = (self.data_epoch, self.shard_pos)
                pre = None
                if self._next_ahead is not None and self._next_ahead[0] == key and self.byte == 0:
                    pre, self._next_ahead = self._next_ahead[1], None
                self._ahead, self._gen = self._stream_from(url, self.byte, self.offset, pre)
                self._key = key
                self._prefetch(plan)
            try:
                index, start, key, members, nxt = next(self._gen)
            except StopIteration:
                self._advance()
                continue
            except ShardReadError as e:
                self.skips.add("shard_missing" if e.missing else "shard_unreadable", str(e))
                self._advance()
                continue
            except (tarfile.TarError, EOFError, OSError) as e:  # a damaged or truncated tar
                self.skips.add("tar_member", f"{url}: after sample {self.offset}: {type(e).__name__}: {e}")
                self._advance()
                continue
            self.offset, self.byte = index + 1, nxt
            if cfg.sample_mode:  # fewer shards than streams: every stream reads them all, keeps 1/n
                base = sum(cfg.shard_sizes[s] for s in plan[: self.shard_pos])
                if (base + index) % cfg.num_streams != self.sid:
                    continue
            try:
                raw = pair_from_members(url, key, members, members.__getitem__)
            except BadSample as e:
                self.skips.bad(e)
                continue
            self._returned += 1
            self.last_id = [self.data_epoch, self.shard_pos, index, start]
            return raw, _Source(url), mix_seed(cfg.seed, self.data_epoch, shard_id, index, 3)

    def refetch(self, ids: list[list[int]]) -> list[Optional[tuple]]:
        """As :meth:`SampleStream.refetch`: each shard streamed once, from the earliest byte needed."""
        cfg, found = self.cfg, {}
        groups: dict[tuple[int, int], list[list[int]]] = {}
        for sample_id in ids:
            groups.setdefault((sample_id[0], sample_id[1]), []).append(sample_id)
        for (epoch, pos), members in groups.items():
            shard_id = self.plan(epoch)[pos]
            url = cfg.shards[shard_id]
            first = min(members, key=lambda s: s[2])
            wanted = {s[2] for s in members}
            ahead, gen = self._stream_from(url, first[3], first[2])
            try:
                for index, _, key, parts, _ in gen:
                    if index in wanted:
                        raw = pair_from_members(url, key, parts, parts.__getitem__)
                        found[(epoch, pos, index)] = (raw, mix_seed(cfg.seed, epoch, shard_id, index, 3))
                        wanted.discard(index)
                    if not wanted:
                        break
            except Exception as e:  # counted; the restored buffer is short of these samples
                self.skips.add("error", f"{url}: reading the shuffle buffer's samples again: {e}")
            finally:
                ahead.close()
        out = []
        for sample_id in ids:
            hit = found.get(tuple(sample_id[:3]))
            url = cfg.shards[self.plan(sample_id[0])[sample_id[1]]]
            out.append(None if hit is None else (list(sample_id), hit[0], _Source(url), hit[1]))
        return out

    def close(self) -> None:
        self._close()
        self._drop_prefetch()


class ShuffleBuffer:
    """Webdataset's sample shuffle buffer over a sample stream, one data epoch at a time (see the
    module docstring)."""

    def __init__(self, inner: SampleStream, size: int, position: Optional[dict[str, Any]] = None):
        self.inner, self.size = inner, size
        position = position or {}
        self.draws = int(position.get("draws", 0))
        held = position.get("buffer") or []
        got = [x for x in inner.refetch(held) if x is not None] if held else []
        # items: samples of the data epoch being handed out; later: read ahead from the next one
        # (one at most, kept until the epoch is drained). A position lists items then later.
        first = min((x[0][0] for x in got), default=0)
        self.items: list[tuple] = [x for x in got if x[0][0] == first]
        self.later: list[tuple] = [x for x in got if x[0][0] != first]
        # The ids again, kept in step with items: a position is then one shallow list copy (ids
        # are never changed in place), taken before every sample.
        self.ids: list[list[int]] = [x[0] for x in self.items]

    # what BatchStream reads of a stream
    @property
    def sid(self) -> int:
        return self.inner.sid

    @property
    def skips(self):
        return self.inner.skips

    @property
    def data_epoch(self) -> int:
        return self.inner.data_epoch

    @property
    def shard_pos(self) -> int:
        return self.inner.shard_pos

    @property
    def offset(self) -> int:
        return self.inner.offset

    def position(self) -> dict[str, Any]:
        buffer = self.ids + [x[0] for x in self.later] if self.later else self.ids.copy()
        return {**self.inner.position(), "buffer": buffer, "draws": self.draws}

    def _fill(self) -> None:
        """Fill up to ``size`` samples of one data epoch: a data epoch smaller than the buffer is
        held whole (and drained before the next one comes in)."""
        if not self.items and self.later:
            epoch = self.later[0][0][0]
            self.items = [x for x in self.later if x[0][0] == epoch]
            self.later = [x for x in self.later if x[0][0] != epoch]
            self.ids = [x[0] for x in self.items]
        while not self.later and len(self.items) < self.size:
            raw, reader, seed = self.inner.next()
            item = (self.inner.last_id, raw, reader, seed)
            if self.items and item[0][0] != self.items[0][0][0]:
                self.later.append(item)  # the next data epoch starts: drain this one first
            else:
                self.items.append(item)
                self.ids.append(item[0])

    def next(self) -> tuple[dict[str, Any], Any, int]:
        self._fill()
        j = mix_seed(self.inner.cfg.seed, self.sid, self.draws, 7) % len(self.items)
        self.draws += 1
        self.items[j], self.items[-1] = self.items[-1], self.items[j]
        self.ids[j], self.ids[-1] = self.ids[-1], self.ids[j]
        self.ids.pop()
        sample_id, raw, reader, seed = self.items.pop()
        self.last_id = sample_id
        return raw, reader, seed


def make_sample_stream(cfg: StreamConfig, stream_id: int, position: Optional[dict[str, Any]] = None):
    """The sample stream of ``cfg``: streamed remote tars or random-access shards, behind a
    shuffle buffer when ``cfg.shuffle_buffer`` > 0."""
    if cfg.streamed and not all(map(is_remote, cfg.shards)):
        raise ValueError("mixing local and remote tars in one --train-data is not supported")
    stream = (TarStream if cfg.streamed else SampleStream)(cfg, stream_id, position)
    if cfg.shuffle_buffer > 0:
        return ShuffleBuffer(stream, cfg.shuffle_buffer, position)
    return stream
