"""A real S3 server for the remote-data tests (moto in server mode) behind a fault-injecting proxy.

The proxy speaks just enough HTTP/1.1 for botocore: it reads each request head, forwards it to
moto on a fresh connection (``Connection: close``, so the response ends at EOF) and passes the
response back, unless a :class:`Fault` matches the request line: then it answers ``503``, answers
``403 InvalidAccessKeyId`` (bad credentials), or drops the connection after ``after`` bytes of
the response.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class Fault:
    match: str  # substring of the request line, e.g. "GET /bkt/shard-000001.tar"
    kind: str  # "503" | "drop" | "403"
    after: int = 0  # "drop": response bytes passed on before the connection is cut
    skip: int = 0  # matching requests let through before the fault applies
    times: int = 1  # how many requests it hits
    header: str = ""  # also require this substring in the request head (e.g. an access key id)


_503 = b"HTTP/1.1 503 Slow Down\r\nContent-Length: 0\r\n\r\n"
_403_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidAccessKeyId</Code>'
    b"<Message>The AWS Access Key Id you provided does not exist in our records.</Message></Error>"
)
_403 = (
    b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: "
    + str(len(_403_BODY)).encode()
    + b"\r\n\r\n"
    + _403_BODY
)


class FaultProxy:
    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.faults: list[Fault] = []
        self.requests: list[str] = []  # request line + Range header of every request seen
        self.hits: list[str] = []  # the faults applied: "kind request-line Range"
        self._lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.faults, self.requests, self.hits = [], [], []

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _fault(self, line: str, head: str, seen: str):
        with self._lock:
            for f in self.faults:
                if f.match in line and f.header in head and f.times > 0:
                    if f.skip > 0:
                        f.skip -= 1
                        continue
                    f.times -= 1
                    self.hits.append(f"{f.kind} {seen}")
                    return f
        return None

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.split(b"\r\n")
                length = 0
                for h in lines[1:]:
                    if h.lower().startswith(b"content-length:"):
                        length = int(h.split(b":", 1)[1])
                while len(buf) < length:
                    buf += conn.recv(65536)
                body, buf = buf[:length], buf[length:]
                line = lines[0].decode()
                text = head.decode(errors="replace")
                ranges = [h.decode() for h in lines[1:] if h.lower().startswith(b"range:")]
                seen = " ".join([line, *ranges])
                with self._lock:
                    self.requests.append(seen)
                fault = self._fault(line, text, seen)
                if fault is not None and fault.kind in ("503", "403"):
                    conn.sendall(_503 if fault.kind == "503" else _403)
                    continue
                kept = [h for h in lines[1:] if not h.lower().startswith(b"connection:")]
                request = b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n" + body
                with socket.create_connection(self.upstream) as up:
                    up.sendall(request)
                    chunks = []
                    while data := up.recv(65536):
                        chunks.append(data)
                response = b"".join(chunks)
                if fault is not None and fault.kind == "drop":
                    conn.sendall(response[: fault.after])
                    return
                conn.sendall(response)
        except OSError:
            return
        finally:
            conn.close()


class S3Server:
    """moto's S3 server on a free loopback port, and a :class:`FaultProxy` in front of it."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.direct = f"http://{host}:{port}"
        self.proxy = FaultProxy((host, port))

    def client(self):
        """A boto3 client straight to moto (test set-up, no faults)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.direct,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def env(self) -> dict[str, str]:
        """The standard environment pointing botocore (s3fs) at the proxy."""
        return {
            "AWS_ENDPOINT_URL": self.proxy.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_MAX_ATTEMPTS": "1",  # botocore's own retries off: lcl-fast's retries are under test
        }

    @contextlib.contextmanager
    def environment(self) -> Iterator[S3Server]:
        """:meth:`env` set in ``os.environ`` while inside, the previous values restored after; the server
        stops on the way out."""
        old = {k: os.environ.get(k) for k in self.env()}
        os.environ.update(self.env())
        try:
            yield self
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            self.stop()

    def stop(self) -> None:
        self.proxy.sock.close()
        self.server.stop()
