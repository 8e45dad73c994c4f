"""Remote shards: fsspec URLs (``s3://``, ``gs://``, ``https://``, ...) and ``pipe:COMMAND``.

All network I/O of lcl-fast goes through this module:

- :func:`is_remote` tells a URL or pipe from a local path;
- :class:`ResilientFile` is a read-only file over a URL that survives a failed read (connection
  reset, timeout, HTTP 5xx): it reopens the object and continues at the byte where it stopped (a
  range request; for a pipe, the command is re-run and the bytes already read are discarded),
  with exponential backoff, and gives up after ``RETRIES`` failures in a row with
  :class:`ShardReadError`;
- :class:`ReadAhead` reads a shard front to back in a background thread into a bounded queue
  (``QUEUE_CHUNKS x CHUNK_BYTES``), so the network works while samples are decoded and the next
  shard is fetched while the current one is consumed;
- :func:`read_bytes` fetches one small object whole (an MMC4 jsonl shard, an image);
- :func:`check_access` is called before training: bad credentials or an unreachable endpoint
  stop the run with a message naming the URL;
- :func:`cached_copy` downloads a shard whole into ``--cache-dir`` (once), when asked.

Credentials and endpoints come from each filesystem's own environment (for S3:
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``,
read by botocore); the filesystem packages come with the extras ``lcl-fast[s3]``, ``[gcs]``,
``[http]``.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import subprocess
import threading
import time
from typing import Any, Callable, Optional

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
RETRIES = 5  # failed reads in a row before a shard is given up (counted as shard_unreadable)
BACKOFF_S = 0.5  # first wait; doubles per failure
CHUNK_BYTES = 1 << 20  # read-ahead granularity
QUEUE_CHUNKS = 8  # read-ahead depth per shard: bounded memory whatever the shard size
BLOCK_BYTES = 8 << 20  # fsspec range-request size
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}


class ShardReadError(OSError):
    """A remote object that could not be read (after retries), or does not exist (``missing``)."""

    def __init__(self, url: str, detail: str, missing: bool = False):
        super().__init__(f"{url}: {detail}")
        self.url, self.detail, self.missing = url, detail, missing


def is_remote(path: str) -> bool:
    """True for ``pipe:...`` and ``scheme://...`` (other than ``file://``)."""
    return path.startswith("pipe:") or (bool(_URL.match(path)) and not path.startswith("file://"))


def join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name.lstrip("/")


def parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0]


_FS: dict[Any, Any] = {}


def filesystem(url: str):
    """The fsspec filesystem of ``url`` (one per protocol, environment and process)."""
    try:
        import fsspec
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {url} needs fsspec: pip install 'lcl-fast[s3]' (or [gcs], [http])") from e
    protocol = url.split("://", 1)[0].lower()
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_", "GCS"))))
    key = (protocol, env, os.getpid())  # a forked worker builds its own (event loops do not fork)
    if key not in _FS:
        try:
            # skip_instance_cache: a changed environment (endpoint, keys) must give a new client
            _FS[key] = fsspec.filesystem(protocol, skip_instance_cache=True)
        except (ImportError, ValueError) as e:
            extra = _EXTRAS.get(protocol, protocol)
            raise ImportError(f"reading {url} needs the filesystem for {protocol}://: "
                              f"pip install 'lcl-fast[{extra}]' ({e})") from e
    return _FS[key]


def _missing(e: BaseException) -> bool:
    return isinstance(e, FileNotFoundError)


def _fatal(e: BaseException) -> bool:
    """Errors no retry can fix: a missing object, refused credentials, a bad argument."""
    return isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, ValueError, ImportError))


class _Pipe:
    """The stdout of ``pipe:COMMAND`` as a file (open_clip's convention), started at ``offset``."""

    def __init__(self, url: str, offset: int):
        self.url = url
        self.proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        left = offset
        while left > 0:  # a pipe cannot seek: read and drop what was already consumed
            got = self.proc.stdout.read(min(left, CHUNK_BYTES))
            if not got:
                self._check()
                raise OSError(f"{url}: ended after {offset - left} of {offset} bytes on a re-run")
            left -= len(got)

    def _check(self) -> None:
        rc = self.proc.wait()
        if rc != 0:
            err = self.proc.stderr.read().decode(errors="replace").strip()[-300:]
            raise OSError(f"{self.url}: command exited with status {rc}: {err}")

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n) if n >= 0 else self.proc.stdout.read()
        if not data or (n > 0 and len(data) < n and self.proc.poll() not in (None, 0)):
            self._check()  # an empty read is the end only if the command succeeded
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()


def _open_at(url: str, offset: int):
    if url.startswith("pipe:"):
        return _Pipe(url, offset)
    f = filesystem(url).open(url, "rb", block_size=BLOCK_BYTES)
    if offset:
        f.seek(offset)
    return f


class ResilientFile:
    """Read-only, seekable file over ``url`` that retries failed reads where they stopped."""

    def __init__(self, url: str, offset: int = 0, retries: Optional[int] = None):
        self.url, self.pos = url, offset
        self.retries = RETRIES if retries is None else retries
        self._f = None
        self._attempt(lambda: None)  # open now: a missing object fails here, not mid-read

    def _attempt(self, op: Callable[[], Any]) -> Any:
        failures = 0
        while True:
            try:
                if self._f is None:
                    self._f = _open_at(self.url, self.pos)
                return op()
            except Exception as e:  # network stacks raise many types; which ones are fatal is known
                self._drop()
                if _fatal(e):
                    raise ShardReadError(self.url, f"{type(e).__name__}: {e}", missing=_missing(e)) from e
                failures += 1
                if failures > self.retries:
                    raise ShardReadError(
                        self.url, f"{failures} failed attempts at byte {self.pos}, last: {type(e).__name__}: {e}"
                    ) from e
                time.sleep(BACKOFF_S * 2 ** (failures - 1))

    def _drop(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except Exception:  # a broken connection may fail to close too
                pass
            self._f = None

    def read(self, n: int = -1) -> bytes:
        data = self._attempt(lambda: self._f.read(n))
        self.pos += len(data)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return not self.url.startswith("pipe:")

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 1:
            offset += self.pos
        elif whence == 2:
            offset += self.size()
        if offset != self.pos:
            if self.url.startswith("pipe:"):
                raise OSError(f"{self.url}: a pipe cannot seek")
            self.pos = offset
            if self._f is not None:
                self._attempt(lambda: self._f.seek(offset))
        return self.pos

    def size(self) -> int:
        return int(self._attempt(lambda: self._f.size))

    def close(self) -> None:
        self._drop()

    @property
    def closed(self) -> bool:
        return self._f is None

    def __enter__(self) -> ResilientFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ReadAhead:
    """``url`` from byte ``offset`` to its end, read by a background thread into a bounded queue.

    A file-like object (``read``) for ``tarfile`` stream mode. Errors of the reader thread
    (:class:`ShardReadError` after retries) are raised by ``read``.
    """

    def __init__(self, url: str, offset: int = 0):
        self.url = url
        self._q: queue.Queue = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._stop = threading.Event()
        self._buf, self._pos = b"", 0
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(offset,), daemon=True, name="lcl-readahead")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, offset: int) -> None:
        try:
            with ResilientFile(self.url, offset) as f:
                while not self._stop.is_set():
                    data = f.read(CHUNK_BYTES)
                    if not self._put(data) or not data:
                        return
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)

    def read(self, n: int = -1) -> bytes:
        # Slices of the current chunk: tarfile reads small pieces (headers, members), and
        # re-slicing one growing buffer would copy the whole chunk each time.
        parts, want = [], n
        while want != 0:
            if self._pos >= len(self._buf):
                if self._done:
                    break
                item = self._q.get()
                if isinstance(item, BaseException):
                    self._done = True
                    raise item
                if not item:
                    self._done = True
                    break
                self._buf, self._pos = item, 0
            left = len(self._buf) - self._pos
            take = left if want < 0 else min(want, left)
            parts.append(self._buf[self._pos : self._pos + take])
            self._pos += take
            if want > 0:
                want -= take
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        self._stop.set()
        deadline = time.monotonic() + 2.0  # a read stuck in the network ends on its own (daemon)
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:  # unblock a producer waiting on a full queue
                self._q.get_nowait()
            except queue.Empty:
                self._thread.join(0.05)
        self._buf = b""


def read_bytes(url: str) -> bytes:
    """The whole object at ``url`` (retried; :class:`ShardReadError` on failure); taken from
    :func:`prefetch_whole`'s store when it fetched it already."""
    with _LOCK:
        data = _FETCHED.pop(url, None)
    if data is not None:
        return data
    with ResilientFile(url) as f:
        return f.read()


_LOCK = threading.Lock()
_FETCHED: dict[str, bytes] = {}  # whole shards fetched ahead, each taken once by read_bytes
_POOLS: dict[tuple[str, int], Any] = {}


def pool(name: str, threads: int):
    """A thread pool of this process (made again after a fork: threads do not survive one)."""
    from concurrent.futures import ThreadPoolExecutor

    key = (name, os.getpid())
    with _LOCK:
        if key not in _POOLS:
            _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix=f"lcl-{name}")
        return _POOLS[key]


def prefetch_whole(url: str, cache_dir: Optional[str]) -> None:
    """Fetch a shard that is read whole (into ``cache_dir``, else into memory for one
    :func:`read_bytes`), so the next shard arrives while the current one is consumed."""
    if cache_dir:
        cached_copy(url, cache_dir)
        return
    data = read_bytes(url)
    with _LOCK:
        _FETCHED[url] = data


def check_access(url: str) -> None:
    """Stop before training when ``url`` cannot be reached: bad credentials, unknown bucket,
    unreachable endpoint. A missing object (a missing shard) is fine: it is counted later."""
    if url.startswith("pipe:"):
        return
    try:
        filesystem(url).info(url)
    except FileNotFoundError:
        pass  # the server answered (keys and endpoint work): a missing shard is counted later
    except Exception as e:
        raise RuntimeError(_access_message(url, e)) from e


def _access_message(url: str, e: BaseException) -> str:
    hint = ""
    if url.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
        hint = (f" (endpoint {endpoint}; check AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION)")
    return f"cannot read training data at {url}: {type(e).__name__}: {e}{hint}"


def cached_copy(url: str, cache_dir: str) -> str:
    """A local copy of ``url`` under ``cache_dir`` (downloaded whole, once; atomic)."""
    digest = hashlib.sha1(url.encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[-80:]
    path = os.path.join(cache_dir, digest, name)
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.part{os.getpid()}-{threading.get_ident()}"
    try:
        with ResilientFile(url) as src, open(tmp, "wb") as dst:
            while data := src.read(CHUNK_BYTES):
                dst.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def list_folder(url: str, exts: tuple[str, ...]) -> Optional[list[str]]:
    """Files of the remote folder ``url`` ending in ``exts`` (sorted), None if it is no folder."""
    if url.startswith("pipe:"):
        return None
    fs = filesystem(url)
    try:
        if not fs.isdir(url):
            return None
        names = fs.ls(url, detail=False)
    except FileNotFoundError:
        return None
    protocol = url.split("://", 1)[0]
    full = [n if _URL.match(n) else f"{protocol}://{n.lstrip('/')}" for n in names]
    return sorted(n for n in full if n.endswith(exts))
