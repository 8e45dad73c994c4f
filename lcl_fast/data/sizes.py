"""How much data there is: per-shard sample counts, the rows per sample when packing, and why
shards give no sample at all. Used by :func:`lcl_fast.data.loader.build_train_loader`."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from . import remote
from .batches import RowMaker
from .packing import RowPacker
from .readers import shard_problem, shard_size
from .remote import is_remote
from .skips import SkipCounter
from .streaming import make_sample_stream
from .streams import StreamConfig

_EXACT_COUNT_LIMIT = 64  # more shards than this: estimate the sample count from a few of them
_PROBE_SAMPLES = 256


def _sizes_json(shards: list[str]) -> Optional[list[int]]:
    """open_clip's ``sizes.json`` beside the shards (``{basename: count}``), if it covers them all."""
    try:
        if is_remote(shards[0]):
            if shards[0].startswith("pipe:"):
                return None
            sizes = json.loads(remote.read_bytes(remote.join(remote.parent(shards[0]), "sizes.json")))
        else:
            with open(os.path.join(os.path.dirname(shards[0]), "sizes.json")) as f:
                sizes = json.load(f)
        return [int(sizes[s.rstrip("/").rsplit("/", 1)[-1]]) for s in shards]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def count_samples(
    dataset_type: str, shards: list[str], exact: bool = False, cache_dir: Optional[str] = None
) -> tuple[Optional[list[int]], int]:
    """``(per-shard sizes or None, total)``: exact for up to 64 shards (or ``exact``), else
    estimated from the first 8 shards' samples per byte. Remote shards are not read to count
    them: their sizes come from a ``sizes.json`` beside them, else ``(None, 0)``. ``cache_dir``:
    where the shard indexes live (default ``$LCL_FAST_CACHE``)."""
    if dataset_type == "webdataset" or any(map(is_remote, shards)):
        sizes = _sizes_json(shards)
        if sizes is not None:
            return sizes, sum(sizes)
    if any(map(is_remote, shards)):
        return None, 0
    if exact or len(shards) <= _EXACT_COUNT_LIMIT or dataset_type == "obelics":
        sizes = [shard_size(dataset_type, s, cache_dir) for s in shards]
        return sizes, sum(sizes)
    probe = shards[:8]
    counted = sum(shard_size(dataset_type, s, cache_dir) for s in probe)
    probe_bytes = sum(os.path.getsize(s) for s in probe if os.path.exists(s))
    all_bytes = sum(os.path.getsize(s) for s in shards if os.path.exists(s))
    return None, int(counted * all_bytes / max(1, probe_bytes))


def no_sample_reason(kind: str, shards: list[str], cache_dir: Optional[str]) -> str:
    """One line saying why counted shards give no sample: the first shard's problem."""
    problems = [p for p in (shard_problem(kind, s, cache_dir) for s in shards[:8]) if p]
    first = problems[0] if problems else f"{shards[0]}: holds no {kind} sample"
    return first if len(shards) == 1 else f"none of the {len(shards)} shards gives a sample; {first}"


def packing_ratio(cfg: StreamConfig) -> float:
    """Rows per sample when packing, measured on up to 256 samples (headers read, nothing decoded)."""
    # One stream over every shard; "dali" here only means: read image headers, decode nothing.
    probe_cfg = dataclasses.replace(
        cfg, world_size=1, rank=0, streams_per_rank=1, backend="dali", shuffle_buffer=0
    )
    stream = make_sample_stream(probe_cfg, 0)
    maker = RowMaker(probe_cfg)
    skips = SkipCounter(interval_s=float("inf"))
    packer = RowPacker(cfg.batch_size, cfg.context_length, pack=True)
    rows = samples = 0
    budget = _PROBE_SAMPLES * 4
    while samples < _PROBE_SAMPLES and budget > 0 and stream.data_epoch == 0:
        budget -= 1
        try:
            raw, reader, seed = stream.next()
        except RuntimeError:  # nothing readable at all: the loader itself will say so
            break
        try:
            row = maker(raw, reader, seed, skips)
        except Exception:  # counted by the real streams; the probe only estimates
            continue
        if row is None:
            continue
        samples += 1
        if not packer.add(row):
            rows += len(packer.take())
            packer.add(row)
    rows += len(packer.bins)
    return rows / samples if samples else 1.0
