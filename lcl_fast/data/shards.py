"""Shard lists and per-shard index files.

``expand_shards(spec, dataset_type)`` turns ``--train-data`` into a list of shard paths, as
open_clip does: a folder (every shard file in it), a brace pattern
(``shard-{000000..000009}.tar``, expanded with ``braceexpand``) or several of those joined by
``::``. The order is kept (folders sorted), so every rank sees the same list. Remote URLs
(``s3://...``, ``pipe:COMMAND``) are expanded the same way; a remote folder is listed.

Index files (``.lclidx``, JSON) hold what must be read once per shard: the byte ranges of a
tar's members, the number of documents of a jsonl shard. They live in the cache folder
(``<--cache-dir>/index``, else ``$LCL_FAST_CACHE/index``, default ``~/.cache/lcl_fast/index``),
never beside the shards, keyed by the shard's path, size and mtime (a changed shard gets a new
index), and are written atomically (ranks may build the same index at once).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import braceexpand

from .remote import is_remote

INDEX_SUFFIX = ".lclidx"
_EXTENSIONS = {
    "webdataset": (".tar",),
    "mmc4": (".jsonl.zip", ".jsonl"),
    "obelics": (".parquet",),
}


def cache_root() -> Path:
    """``$LCL_FAST_CACHE``, else ``~/.cache/lcl_fast``."""
    env = os.environ.get("LCL_FAST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lcl_fast"


def _folder_shards(folder: Path, dataset_type: str) -> list[str]:
    if dataset_type == "mmc4" and (folder / "data").is_dir():
        folder = folder / "data"  # the MMC4 layout: <root>/data/docs_shard_{i}_v2.jsonl.zip
    exts = _EXTENSIONS[dataset_type]
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and p.name.endswith(exts))


def expand_shards(spec: str, dataset_type: str) -> list[str]:
    """Shard paths of ``spec`` (folder, brace pattern, or ``::``-joined list of either)."""
    if dataset_type not in _EXTENSIONS:
        raise ValueError(f"dataset_type must be one of {sorted(_EXTENSIONS)}, got {dataset_type!r}")
    if not spec:
        raise ValueError(f"no shards given for dataset_type {dataset_type!r} (train_data is empty)")
    shards: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if not is_remote(part):
            part = os.path.expanduser(part)
        if not part:
            continue
        if is_remote(part):
            shards.extend(_remote_part(part, dataset_type))
        elif os.path.isdir(part):
            found = _folder_shards(Path(part), dataset_type)
            if not found:
                raise ValueError(
                    f"folder {part} holds no {dataset_type} shards "
                    f"(files ending in {_EXTENSIONS[dataset_type]})"
                )
            shards.extend(found)
        else:
            shards.extend(braceexpand.braceexpand(part))
    if not shards:
        raise ValueError(f"train_data {spec!r} names no shards")
    return shards


def _remote_part(part: str, dataset_type: str) -> list[str]:
    """A remote pattern, pipe or shard URL as is; a remote folder listed (``<root>/data`` for MMC4)."""
    exts = _EXTENSIONS[dataset_type]
    if part.startswith("pipe:") or "{" in part or part.endswith(exts):
        return list(braceexpand.braceexpand(part))
    from . import remote

    for folder in ([remote.join(part, "data")] if dataset_type == "mmc4" else []) + [part]:
        found = remote.list_folder(folder, exts)
        if found:
            return found
    raise ValueError(f"{part} is no {dataset_type} shard (files end in {exts}) nor a folder holding some")


def index_folder(cache_dir: Optional[str] = None) -> Path:
    """Where shard indexes live: ``<cache_dir>/index`` (``--cache-dir``), else ``$LCL_FAST_CACHE/index``."""
    return (Path(cache_dir) if cache_dir else cache_root()) / "index"


def index_path(shard: str, stamp: dict[str, Any], cache_dir: Optional[str] = None) -> Path:
    """The index file of ``shard`` as it is now: keyed by its absolute path, size and mtime (a
    changed shard gets a new file), named after the shard for whoever looks in the folder."""
    key = json.dumps([os.path.abspath(shard), stamp["kind"], stamp["size"], stamp["mtime_ns"]])
    digest = hashlib.sha1(key.encode()).hexdigest()[:24]
    return index_folder(cache_dir) / f"{os.path.basename(shard)[:80]}.{digest}{INDEX_SUFFIX}"


def _write_atomic(path: Path, payload: dict) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=INDEX_SUFFIX)
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, separators=(",", ":"))
        os.replace(tmp, path)
        return True
    except OSError:
        return False


def load_index(
    shard: str, kind: str, build: Callable[[str], dict[str, Any]], cache_dir: Optional[str] = None
) -> dict[str, Any]:
    """The index of ``shard`` from the cache folder (``build(shard)`` when it holds no valid one;
    then saved there, if the folder can be written). Nothing is written beside the shard.

    Raises ``OSError`` when the shard itself cannot be read.
    """
    st = os.stat(shard)
    stamp = {"kind": kind, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    path = index_path(shard, stamp, cache_dir)
    try:
        with open(path) as f:
            index = json.load(f)
        if isinstance(index, dict) and all(index.get(k) == v for k, v in stamp.items()):
            return index
    except (OSError, ValueError):
        pass
    index = {**build(shard), **stamp}
    _write_atomic(path, index)
    return index
