"""A small, real HTTP/1.1 forward proxy in the test's event loop, which records what it saw.

It does the two things an egress proxy does for the gateway:

- ``CONNECT host:port`` (RFC 9110 §9.3.6): it connects to the target, answers
  ``200 Connection established`` and then copies bytes both ways, unread, until either side
  closes. TLS runs end to end through it; ``tunnelled`` keeps what the client sent inside, to
  show the proxy never saw a request in the clear.
- an absolute-form request (RFC 9112 §3.2.2): it connects to the URL's authority, and forwards
  that request and the ones after it on the same connection in origin-form, without the
  ``Proxy-Authorization`` it consumed (RFC 9110 §11.7.2), copying the answers back unread.
  One client connection is one origin connection, so every request on it must go to the same
  origin (what a pooled client keyed by target does; any other is recorded as an error).

With ``credentials`` (the exact ``Proxy-Authorization`` value) it answers anything else with
``407 Proxy Authentication Required``; with ``refuse`` it answers that status to every request.
It records each CONNECT target, each ``Proxy-Authorization`` (None when absent) and each
absolute-form request line, in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Self
from urllib.parse import urlsplit

from tests.support.rawserver import RawConnection, RawServer


class ConnectProxy:
    def __init__(self, *, credentials: str | None = None, refuse: int | None = None) -> None:
        self.credentials = credentials
        self.refuse = refuse
        self.connects: list[str] = []
        self.authorizations: list[str | None] = []
        self.absolute_lines: list[str] = []
        self.tunnelled = bytearray()
        self.errors: list[str] = []
        self._server = RawServer(self._serve)

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_with(self, userinfo: str) -> str:
        return f"http://{userinfo}@127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        """Client connections the proxy accepted."""
        return len(self._server.connections)

    async def __aenter__(self) -> Self:
        await self._server.__aenter__()
        return self

    async def __aexit__(self, exc_type: object, *rest: object) -> None:
        await self._server.__aexit__(exc_type, *rest)
        if self.errors and exc_type is None:
            raise AssertionError(self.errors[0])

    # One client connection

    async def _serve(self, client: RawConnection) -> None:
        request = await client.read_request()
        if request is None or not self._admitted(client, request):
            return
        method, target, _ = _request_line(request).split(" ")
        if method == "CONNECT":
            await self._tunnel(client, target)
        else:
            await self._forward(client, request)

    def _admitted(self, client: RawConnection, request: bytes) -> bool:
        authorization = _field(request, b"proxy-authorization")
        self.authorizations.append(authorization)
        if self.refuse is not None:
            client.write(_answer(self.refuse))
            return False
        if self.credentials is not None and authorization != self.credentials:
            client.write(_answer(407, b'proxy-authenticate: Basic realm="test proxy"\r\n'))
            return False
        return True

    async def _tunnel(self, client: RawConnection, authority: str) -> None:
        self.connects.append(authority)
        host, _, port = authority.rpartition(":")
        try:
            reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        except OSError:
            client.write(_answer(502))
            return
        client.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await _splice(client.reader, writer, client.writer, reader, self.tunnelled)

    async def _forward(self, client: RawConnection, request: bytes) -> None:
        line = _request_line(request)
        self.absolute_lines.append(line)
        origin = urlsplit(line.split(" ")[1]).netloc
        host, _, port = origin.rpartition(":")
        try:
            reader, writer = await asyncio.open_connection(host.strip("[]"), int(port or 80))
        except OSError:
            client.write(_answer(502))
            return
        answers = asyncio.ensure_future(_copy(reader, client.writer))
        try:
            while True:
                writer.write(_origin_form(request))
                request_or_none = await client.read_request()
                if request_or_none is None:
                    return
                request = request_or_none
                if not self._admitted(client, request):
                    return
                line = _request_line(request)
                self.absolute_lines.append(line)
                if urlsplit(line.split(" ")[1]).netloc != origin:
                    self.errors.append(f"a second origin on one proxy connection: {line}")
                    return
        finally:
            answers.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await answers
            writer.close()


def _request_line(request: bytes) -> str:
    return request.partition(b"\r\n")[0].decode("latin-1")


def _field(request: bytes, name: bytes) -> str | None:
    head = request.partition(b"\r\n\r\n")[0]
    for line in head.split(b"\r\n")[1:]:
        field, _, value = line.partition(b":")
        if field.strip().lower() == name:
            return value.strip().decode("latin-1")
    return None


def _origin_form(request: bytes) -> bytes:
    """The absolute-form ``request`` as an origin takes it: the path and query only, and
    without the proxy's own credentials."""
    head, _, body = request.partition(b"\r\n\r\n")
    request_line, *fields = head.split(b"\r\n")
    method, target, version = request_line.split(b" ")
    parts = urlsplit(target.decode("latin-1"))
    path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    kept = [f for f in fields if f.partition(b":")[0].strip().lower() != b"proxy-authorization"]
    line = b" ".join((method, path.encode("latin-1"), version))
    return b"\r\n".join((line, *kept)) + b"\r\n\r\n" + body


def _answer(status: int, fields: bytes = b"") -> bytes:
    return (
        f"HTTP/1.1 {status} Refused by the test proxy\r\n".encode()
        + fields
        + b"content-length: 0\r\nconnection: close\r\n\r\n"
    )


async def _copy(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: bytearray | None = None
) -> None:
    """Bytes from ``reader`` to ``writer`` as they arrive, until EOF or an error."""
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            if seen is not None:
                seen += data
            writer.write(data)
            await writer.drain()


async def _splice(
    client_reader: asyncio.StreamReader,
    origin_writer: asyncio.StreamWriter,
    client_writer: asyncio.StreamWriter,
    origin_reader: asyncio.StreamReader,
    seen: bytearray,
) -> None:
    """Both directions of a tunnel until either side closes; then both are closed."""
    up = asyncio.ensure_future(_copy(client_reader, origin_writer, seen))
    down = asyncio.ensure_future(_copy(origin_reader, client_writer))
    try:
        await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (up, down):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        origin_writer.close()
