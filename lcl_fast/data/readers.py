"""Shard readers: webdataset tars, MMC4 jsonl, OBELICS-style parquet.

Every reader gives random access to the samples of one shard (``len``, ``read(i)``) and lists
its ``blocks`` (contiguous ranges worth reading together: the whole shard, or a parquet row
group), so the loader can shuffle inside a shard and resume at any sample. A sample that cannot
be used raises :class:`~lcl_fast.data.skips.BadSample`; a shard that cannot be opened raises it
from the constructor with kind ``shard_unreadable``.

- **webdataset** (``.tar``): members ``{key}.{ext}`` grouped as webdataset does (key = path up to
  the first dot of the file name, consecutive members). Image: the first of ``jpg``, ``jpeg``,
  ``png``, ``webp``; caption: ``txt``, else the ``caption`` (or ``text``) field of ``json``. The
  member byte ranges come from an index file (built on first use by reading the tar headers;
  truncated members and unreadable headers are recorded, the rest of the shard stays usable).
- **mmc4** (``docs_shard_{i}_v2.jsonl.zip`` or ``.jsonl``): one document per line with
  ``text_list`` and ``image_info``; a shard is read whole into memory (a few MB), one at a
  time. Images are files under ``image_root`` (default: ``<root>/images`` for shards in
  ``<root>/data``, else an ``images`` folder beside the shard).
- **obelics** (``.parquet``, needs ``pyarrow``): columns ``texts`` and ``images``, lists of the
  same length where each position holds a text or an image; an image is bytes, a path (relative
  to the parquet's folder) or a ``{"bytes", "path"}`` struct. URLs are not fetched.
"""

from __future__ import annotations

import bisect
import io
import json
import os
import re
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable

from . import remote
from .remote import is_remote
from .shards import load_index
from .skips import BadSample

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# What a damaged or unreadable zip / jsonl shard raises (RuntimeError: encrypted member).
_ZIP_ERRORS = (OSError, EOFError, RuntimeError, ValueError, zipfile.BadZipFile, zlib.error)
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext
_TAR_INDEX_VERSION = 1


# ----------------------------------------------------------------------------- webdataset


def _build_tar_index(path: str) -> dict[str, Any]:
    """Members of each sample as ``[key, {ext: [offset, size]}]``; size -1 marks a truncated member."""
    file_size = os.path.getsize(path)
    samples: list[list[Any]] = []
    current: dict[str, list[int]] | None = None
    key = None
    gaps = 0
    expected = 0
    members = 0
    try:
        # ignore_zeros: skip unreadable header blocks and resynchronise on the next valid header.
        with tarfile.open(path, mode="r:", ignore_zeros=True) as tf:
            for member in tf:
                members += 1
                if member.offset != expected:
                    gaps += 1
                expected = member.offset_data + ((member.size + 511) // 512) * 512
                if not member.isfile():
                    continue
                m = _KEY_EXT.match(member.name)
                if m is None:
                    continue
                prefix, ext = m.group(1), m.group(2).lower()
                if current is None or prefix != key or ext in current:
                    current, key = {}, prefix
                    samples.append([prefix, current])
                truncated = member.offset_data + member.size > file_size
                current[ext] = [member.offset_data, -1 if truncated else member.size]
    except (tarfile.TarError, EOFError):
        gaps += 1  # the end of the archive is unreadable; what was read stays usable
    return {"version": _TAR_INDEX_VERSION, "samples": samples, "bad_headers": gaps, "members": members}


def pair_from_members(path: str, key: str, members: Any, get: Callable[[str], bytes]) -> dict[str, Any]:
    """``{"key", "caption", "image"}`` of a webdataset sample whose members' extensions are
    ``members`` (a container of str); ``get(ext)`` returns a member's bytes."""
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    caption_ext = "txt" if "txt" in members else ("json" if "json" in members else None)
    if image_ext is None or caption_ext is None:
        raise BadSample("incomplete_sample", f"{path}: {key} has members {sorted(members)}")
    raw = get(caption_ext)
    try:
        if caption_ext == "txt":
            caption = raw.decode("utf-8")
        else:
            meta = json.loads(raw)
            caption = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
            if not isinstance(caption, str):
                raise ValueError("no string 'caption' or 'text' field")
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BadSample("caption", f"{path}: {key}.{caption_ext}: {e}") from e
    return {"key": key, "caption": caption, "image": get(image_ext)}


class TarShard:
    """Random access to the samples of one webdataset tar shard."""

    def __init__(self, path: str, cache_dir: str | None = None):
        self.path = path
        try:
            index = load_index(path, "tar", _build_tar_index, cache_dir)
        except OSError as e:
            raise BadSample("shard_unreadable", f"{path}: {e}") from e
        self._samples = index["samples"]
        self.bad_headers = int(index.get("bad_headers", 0))
        if not self._samples and index.get("members") == 0:  # not one valid header: no tar at all
            size = index["size"]
            what = "the file is empty" if size == 0 else f"no valid tar header in its {size} bytes"
            raise BadSample("shard_unreadable", f"{path}: cannot be read as a tar: {what} (damaged, or not a tar)")
        self.blocks = [(0, len(self._samples))]
        self._file = None

    def __len__(self) -> int:
        return len(self._samples)

    def _member(self, ext: str, entry: list[int], key: str) -> bytes:
        offset, size = entry
        if size < 0:
            raise BadSample("tar_member", f"{self.path}: {key}.{ext} is truncated")
        if self._file is None:
            self._file = open(self.path, "rb")
        self._file.seek(offset)
        data = self._file.read(size)
        if len(data) != size:
            raise BadSample("tar_member", f"{self.path}: {key}.{ext} is truncated")
        return data

    def read(self, i: int) -> dict[str, Any]:
        """``{"key", "caption": str, "image": bytes}`` of sample ``i``."""
        key, members = self._samples[i]
        return pair_from_members(self.path, key, members, lambda ext: self._member(ext, members[ext], key))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# ----------------------------------------------------------------------------- mmc4


def default_image_root(shard: str) -> Path | str:
    if is_remote(shard):
        folder = remote.parent(shard)
        return remote.join(remote.parent(folder) if folder.endswith("/data") else folder, "images")
    parent = Path(shard).resolve().parent
    return (parent.parent if parent.name == "data" else parent) / "images"


def _unreadable(path: str, e: BaseException) -> BadSample:
    missing = isinstance(e, FileNotFoundError) or getattr(e, "missing", False)
    return BadSample("shard_missing" if missing else "shard_unreadable", f"{path}: {e}")


def _read_jsonl_lines(path: str) -> list[bytes]:
    source: Any = io.BytesIO(remote.read_bytes(path)) if is_remote(path) else path
    if path.endswith(".zip"):
        with zipfile.ZipFile(source) as zf:
            names = [n for n in zf.namelist() if n.endswith(".jsonl")]
            if not names:
                raise BadSample("shard_unreadable", f"{path}: no .jsonl member")
            inner = os.path.basename(path)[: -len(".zip")]
            data = zf.read(inner if inner in names else names[0])
    else:
        data = source.getvalue() if isinstance(source, io.BytesIO) else Path(path).read_bytes()
    return [line for line in data.split(b"\n") if line.strip()]


def _open_jsonl(path: str) -> list[bytes]:
    try:
        return _read_jsonl_lines(path)
    except _ZIP_ERRORS as e:
        raise _unreadable(path, e) from e


def _is_safe_relative(name: str) -> bool:
    return bool(name) and not os.path.isabs(name) and ".." not in Path(name).parts


def _read_image_file(path: Path | str) -> bytes:
    if isinstance(path, str) and is_remote(path):
        try:
            return remote.read_bytes(path)
        except OSError as e:
            raise BadSample("image_missing", str(e)) from e
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise BadSample("image_missing", f"{path}: {e.strerror or e}") from e


class Mmc4Shard:
    """The documents of one MMC4 jsonl shard (read whole) and access to their image files."""

    def __init__(self, path: str, image_root: str | os.PathLike | None = None, source: str | None = None):
        self.path = path
        if image_root is None:
            image_root = default_image_root(source or path)
        self.image_root = image_root if is_remote(str(image_root)) else Path(image_root)
        self._fetched: dict[str, Any] = {}
        self._lines = _open_jsonl(path)
        self.blocks = [(0, len(self._lines))]

    def __len__(self) -> int:
        return len(self._lines)

    def read(self, i: int) -> dict[str, Any]:
        """``{"key", "text_list": list[str], "image_info": list}`` of document ``i``."""
        try:
            doc = json.loads(self._lines[i])
        except ValueError as e:
            raise BadSample("jsonl_line", f"{self.path}: line {i}: {e}") from e
        texts = doc.get("text_list") if isinstance(doc, dict) else None
        infos = doc.get("image_info") if isinstance(doc, dict) else None
        if (
            not isinstance(texts, list)
            or not all(isinstance(t, str) for t in texts)
            or not isinstance(infos, list)
        ):
            raise BadSample(
                "jsonl_line", f"{self.path}: line {i}: no list of strings 'text_list' / list 'image_info'"
            )
        return {"key": f"{i}", "text_list": texts, "image_info": infos}

    def fetch_images(self, names: list[Any]) -> None:
        """Remote images: fetch ``names`` concurrently now; ``read_image`` then takes them."""
        if not isinstance(self.image_root, str) or len(names) < 2:
            return
        todo = [n for n in names if isinstance(n, str) and _is_safe_relative(n)]

        def get(name: str) -> Any:
            try:
                return _read_image_file(remote.join(self.image_root, name))
            except BadSample as e:
                return e

        self._fetched = dict(zip(todo, remote.pool("images", 8).map(get, todo)))

    def read_image(self, name: Any) -> bytes:
        got = self._fetched.pop(name, None) if isinstance(name, str) else None
        if isinstance(got, BadSample):
            raise got
        if got is not None:
            return got
        if not isinstance(name, str) or not _is_safe_relative(name):
            raise BadSample("image_info", f"{self.path}: image name {name!r} is not a relative path")
        if isinstance(self.image_root, str):
            return _read_image_file(remote.join(self.image_root, name))
        return _read_image_file(self.image_root / name)

    def close(self) -> None:
        self._lines = []


def count_jsonl(path: str, cache_dir: str | None = None) -> int:
    index = load_index(path, "jsonl", lambda p: {"num_samples": len(_read_jsonl_lines(p))}, cache_dir)
    return int(index["num_samples"])


# ----------------------------------------------------------------------------- obelics


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading parquet shards needs pyarrow: pip install pyarrow") from e
    return pq


class ParquetShard:
    """Rows of one OBELICS-style parquet shard, read a row group at a time."""

    def __init__(self, path: str):
        pq = _pyarrow_parquet()
        self.path = path
        try:
            self._source = remote.ResilientFile(path) if is_remote(path) else None
            self._file = pq.ParquetFile(self._source or path, memory_map=self._source is None)
        except Exception as e:  # pyarrow raises its own error types (ArrowInvalid, OSError)
            raise _unreadable(path, e) from e
        names = set(self._file.schema_arrow.names)
        if not {"texts", "images"} <= names:
            raise BadSample(
                "shard_unreadable", f"{path}: needs columns 'texts' and 'images', has {sorted(names)}"
            )
        md = self._file.metadata
        counts = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
        self._starts = [sum(counts[:g]) for g in range(len(counts))]
        self.blocks = list(zip(self._starts, counts))
        self._len = sum(counts)
        self._group: int | None = None
        self._rows: dict[str, list] = {}

    def __len__(self) -> int:
        return self._len

    def read(self, i: int) -> dict[str, Any]:
        """``{"key", "texts": list[str | None], "images": list}`` of row ``i``."""
        g = bisect.bisect_right(self._starts, i) - 1
        if g != self._group:
            try:
                table = self._file.read_row_group(g, columns=["texts", "images"])
            except Exception as e:  # a damaged row group: every row in it is unusable
                raise BadSample("parquet_row", f"{self.path}: row group {g}: {e}") from e
            self._rows = {name: table.column(name).to_pylist() for name in ("texts", "images")}
            self._group = g
        j = i - self._starts[g]
        texts, images = self._rows["texts"][j], self._rows["images"][j]
        if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
            raise BadSample(
                "parquet_row", f"{self.path}: row {i}: 'texts' and 'images' must be lists of one length"
            )
        for t in texts:
            if t is not None and not isinstance(t, str):
                raise BadSample("parquet_row", f"{self.path}: row {i}: a text is a {type(t).__name__}")
        return {"key": f"{i}", "texts": texts, "images": images}

    def read_image(self, ref: Any) -> bytes:
        if isinstance(ref, dict):
            ref = ref.get("bytes") or ref.get("path")
        if isinstance(ref, (bytes, bytearray)):
            return bytes(ref)
        if isinstance(ref, str):
            if re.match(r"^[a-z][a-z0-9+.-]*://", ref):
                raise BadSample("image_url", f"{self.path}: remote image {ref[:80]!r} (fetch images first)")
            if is_remote(self.path) and not os.path.isabs(ref):
                return _read_image_file(remote.join(remote.parent(self.path), ref))
            path = Path(ref) if os.path.isabs(ref) else Path(self.path).parent / ref
            return _read_image_file(path)
        raise BadSample("parquet_row", f"{self.path}: image entry of type {type(ref).__name__}")

    def close(self) -> None:
        self._rows = {}
        self._group = None
        if self._source is not None:
            self._source.close()  # reopened (at the byte asked) if the shard is read again


def count_parquet(path: str) -> int:
    return int(_pyarrow_parquet().ParquetFile(path).metadata.num_rows)


# ----------------------------------------------------------------------------- dispatch


def open_shard(
    dataset_type: str,
    path: str,
    image_root: str | os.PathLike | None = None,
    cache_dir: str | None = None,
):
    """A reader for one shard of ``dataset_type`` ("webdataset" | "mmc4" | "obelics"); a remote
    shard is first copied whole into ``cache_dir`` when given (then read like a local one).
    Index files go to the cache folder (``cache_dir`` or ``$LCL_FAST_CACHE``; see :mod:`.shards`)."""
    source = path
    if cache_dir and is_remote(path):
        try:
            path = remote.cached_copy(path, cache_dir)
        except OSError as e:
            raise _unreadable(source, e) from e
    if dataset_type == "webdataset":
        return TarShard(path, cache_dir)
    if dataset_type == "mmc4":
        return Mmc4Shard(path, image_root, source=source)
    if dataset_type == "obelics":
        return ParquetShard(path)
    raise ValueError(f"dataset_type must be 'webdataset', 'mmc4' or 'obelics', got {dataset_type!r}")


def _count(dataset_type: str, path: str, cache_dir: str | None = None) -> int:
    if dataset_type == "webdataset":
        return len(TarShard(path, cache_dir))
    if dataset_type == "mmc4":
        return count_jsonl(path, cache_dir)
    return count_parquet(path)


def shard_size(dataset_type: str, path: str, cache_dir: str | None = None) -> int:
    """Number of samples in a shard (from its index file in the cache folder, built when
    missing); 0 if unreadable."""
    try:
        return _count(dataset_type, path, cache_dir)
    except (BadSample, *_ZIP_ERRORS):
        return 0
    except Exception as e:  # pyarrow's errors
        if type(e).__module__.startswith("pyarrow"):
            return 0
        raise


def shard_problem(dataset_type: str, path: str, cache_dir: str | None = None) -> str | None:
    """Why a shard gives no sample, in one line naming it (None when it has samples)."""
    try:
        if _count(dataset_type, path, cache_dir):
            return None
        return f"{path}: holds no {dataset_type} sample"
    except BadSample as e:
        return e.detail
    except FileNotFoundError:
        return f"{path}: no such file"
    except Exception as e:  # zip, json, pyarrow errors: the shard cannot be read
        return f"{path}: cannot be read as a {dataset_type} shard: {type(e).__name__}: {e}"
