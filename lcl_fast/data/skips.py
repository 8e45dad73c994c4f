"""Bad web data: one exception for every kind of unusable sample, and a rate-limited counter.

A corrupt image, a missing file, an unreadable tar member, a malformed jsonl line or parquet row
raises :class:`BadSample` where it is found; the loader catches it, counts it per kind and goes
on. Kinds used: ``image_decode`` (corrupt or unsupported image), ``image_missing`` (file not
found), ``image_info`` (an MMC4 image entry that is malformed or points at no sentence),
``image_url`` (a remote image in a parquet row), ``tar_member`` (truncated or unreadable member),
``incomplete_sample`` (a webdataset sample without image or caption), ``caption`` (undecodable
caption), ``jsonl_line``, ``parquet_row``, ``shard_unreadable`` (a shard that cannot be opened, or a remote
read still failing after its retries), ``shard_missing`` (a listed shard that does not exist),
``doc_no_images`` (a
document left without images, dropped as the reference does) and ``error`` (any other exception
while reading or building one sample: counted and logged, never fatal).
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("lcl_fast.data")

LOG_INTERVAL_S = 60.0


class BadSample(Exception):
    """A sample (or one of its images, or a whole shard) that cannot be used."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class SkipCounter:
    """Counts skipped items per kind; logs the first of each kind, then at most one line per kind
    every ``LOG_INTERVAL_S`` seconds (with the running count), so a bad shard cannot flood the log."""

    def __init__(self, counts: dict[str, int] | None = None, interval_s: float = LOG_INTERVAL_S):
        self.counts: dict[str, int] = dict(counts or {})
        self.interval_s = interval_s
        self._last_log: dict[str, float] = {}
        self.last = ""  # the last item skipped, "kind: detail" (not part of a position)

    def add(self, kind: str, detail: str = "") -> None:
        n = self.counts.get(kind, 0) + 1
        self.counts[kind] = n
        self.last = f"{kind}: {detail}".replace("\n", " ")
        now = time.monotonic()
        last = self._last_log.get(kind)
        if last is None or now - last >= self.interval_s:
            self._last_log[kind] = now
            log.warning("skipped bad data (%s, %d so far): %s", kind, n, detail)

    def bad(self, err: BadSample) -> None:
        self.add(err.kind, err.detail)

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


def merge_counts(*parts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in parts:
        for kind, n in part.items():
            out[kind] = out.get(kind, 0) + n
    return dict(sorted(out.items()))
