"""An upstream that misbehaves at the byte level, for end-to-end tests of the gateway's defences.

The fake upstream (``tests/support/fakeupstream/``) answers in OpenAI's shapes; this one answers
with whatever exact bytes a test writes, from a plain threaded socket server on 127.0.0.1, so a
test can send what no well-behaved server would: a gzip bomb, an error that echoes the
credentials it received. It is synchronous (one thread per connection) because the gateway under
test is a separate process and the test drives it with blocking clients (``rawserver.RawServer``
is the asynchronous one, for a client running in the test's own event loop).

- ``HostileUpstream(respond)``: calls ``respond(request)`` for every request and writes the bytes
  it yields, one ``sendall`` each, then closes the connection.
- ``http_head(...)``, ``http_response(...)``: an HTTP/1.1 response head (or a whole response)
  with ``content-length`` and ``connection: close``.
- ``gzip_bomb(size)``: a gzip body that inflates to ``size`` zero bytes, built without ever
  holding the inflated data.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Self

_HEAD_LIMIT = 64 * 1024
_ZEROS = bytes(1 << 20)


@dataclass(frozen=True, slots=True)
class HostileRequest:
    """One request as the hostile upstream received it (header names lower-cased)."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)


Responder = Callable[[HostileRequest], Iterable[bytes]]


def http_head(status: int, headers: Sequence[tuple[str, str]], content_length: int) -> bytes:
    """A response head: status line, ``headers``, ``content-length``, ``connection: close``."""
    lines = [f"HTTP/1.1 {status} X", *(f"{name}: {value}" for name, value in headers)]
    lines += [f"content-length: {content_length}", "connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


def http_response(status: int, headers: Sequence[tuple[str, str]] = (), body: bytes = b"") -> bytes:
    """A whole response: the head of ``http_head`` and ``body``."""
    return http_head(status, headers, len(body)) + body


def gzip_bomb(size: int) -> bytes:
    """A gzip member (RFC 1952) of ``size`` zero bytes (a multiple of 1 MiB), about 1/1000 of it.

    After a full flush a deflate stream refers to nothing before it, so each MiB of zeros
    compresses to the same bytes: the body is that piece repeated, ended by an empty final block
    (RFC 1951 §3.2.3), then the CRC-32 and length of the inflated data.
    """
    if size <= 0 or size % len(_ZEROS):
        raise ValueError("the size must be a positive multiple of 1 MiB")
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    piece = compressor.compress(_ZEROS) + compressor.flush(zlib.Z_FULL_FLUSH)
    end = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush()
    crc = 0
    for _ in range(size // len(_ZEROS)):
        crc = zlib.crc32(_ZEROS, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = struct.pack("<II", crc, size & 0xFFFFFFFF)
    return header + piece * (size // len(_ZEROS)) + end + trailer


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, upstream: HostileUpstream) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = upstream


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = b""
        while b"\r\n\r\n" not in data:
            received = sock.recv(65536)
            if not received or len(data) > _HEAD_LIMIT:
                return
            data += received
        head, _, body = data.partition(b"\r\n\r\n")
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = []
        for line in lines:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
        length = int(next((v for k, v in headers if k == "content-length"), "0"))
        while len(body) < length:
            received = sock.recv(65536)
            if not received:
                return
            body += received
        request = HostileRequest(method, target, headers, body)
        self.server.upstream.record(request)
        try:
            for piece in self.server.upstream.respond(request):
                sock.sendall(piece)
        except OSError:
            pass  # the gateway hung up: what it did about it is the test's business


class HostileUpstream:
    """A raw HTTP/1.1 server on a free 127.0.0.1 port while the ``with`` block runs."""

    def __init__(self, respond: Responder) -> None:
        self.respond = respond
        self._lock = threading.Lock()
        self._requests: list[HostileRequest] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def record(self, request: HostileRequest) -> None:
        with self._lock:
            self._requests.append(request)

    @property
    def requests(self) -> list[HostileRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("HostileUpstream has not been started")
        port: int = self._server.server_address[1]
        return f"http://127.0.0.1:{port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def __enter__(self) -> Self:
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
