"""The hot path's upstream client: HTTP/1.1 on an asyncio protocol, parsed by httptools.

Chosen by measurement (docs/design.md §5, the README's design notes): the relay needs only
"send this request, give me the status, the raw headers and each body chunk as it arrives",
and a general client pays for much more on every request (aiohttp: ~61 µs of CPU per request
here, ~77 with a read timeout; httpx's own pool far more, encode/httpx#3215). This one writes
the request in one call, lets httptools (the parser uvicorn itself uses) split the response,
and hands the body on chunk by chunk, undecoded: chunked framing is removed,
``Content-Encoding`` is not.

Connections are pooled per (scheme, host, port) and kept alive when the upstream allows it and
the body was read to its end. An idempotent request (or one with an ``Idempotency-Key``) that
fails on a reused connection before any byte of the response came back is sent once more on a
new connection: the upstream closed the idle connection as we wrote (the race every keep-alive
client has; RFC 9112 §9.3.1). Other requests get a 502, which the openai SDK retries itself.

An upstream's own TLS context (its CAs, a client certificate) replaces the default one, built
once per client. Through an egress proxy, an https target gets a CONNECT tunnel and TLS inside
it (``tunnel.py``); an http target gets its requests in absolute-form on connections to the
proxy. Either way the pool is keyed by the target, as without a proxy; the direct path pays one
attribute test per request and per connect for it.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Sequence
from typing import Final, cast

import httptools

from gateway.upstream.egress import EgressProxy
from gateway.upstream.seam import (
    OutboundRequest,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamResponse,
    UpstreamStreamError,
    UpstreamTimeout,
)
from gateway.upstream.transports.tunnel import connect_through, proxy_refused, to_proxy

# Stop reading from the upstream while this much body waits for a slow client (back-pressure);
# resume once the relay has taken it.
_HIGH_WATER: Final = 256 * 1024

_Key = tuple[str, str, int]


class _RetryError(UpstreamProtocolError):
    """A reused connection died before the response began: send again on a new one."""


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout("timeout"))


class _Connection(asyncio.Protocol):
    """One upstream connection and the state of the exchange on it."""

    def __init__(self, client: Http1Client, key: _Key) -> None:
        self.client = client
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.alive = False
        self.reused = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.head_done = False
        self.complete = False
        self.received = False
        self.informational = False
        self.keep_alive = False
        self.overrun = False
        self.head_only = False
        self.error: UpstreamError | None = None
        self.waiter: asyncio.Future[None] | None = None

    def begin(self, head_only: bool) -> None:
        self._reset()
        self.head_only = head_only

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.alive = True

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("upgrade"))
        except httptools.HttpParserError:
            self._fail(UpstreamProtocolError("invalid HTTP response"))

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost decides what the EOF meant

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        self.client._forget(self)
        if self.complete or self.error is not None:
            return
        if self.head_done and self._delimited_by_close() and exc is None:
            self.complete = True  # RFC 9112 §6.3: the body ended with the connection
            self._wake()
        elif not self.received and self.reused:
            self._fail(_RetryError())
        else:
            self._fail(UpstreamProtocolError("connection closed"))

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            # Bytes after the end of the response (RFC 9112 §9.3: no pipelining here): never
            # part of this body, and the connection's framing cannot be trusted any more.
            self.overrun = True
            self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.overrun:
            return
        # After the head, fields are trailers: never merged into the headers (RFC 9110 §6.5.1).
        if not self.head_done:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.overrun:
            return
        status = self.parser.get_status_code()
        if status == 101:
            # The gateway never asks to switch protocols; an upstream that does is broken.
            self._fail(UpstreamProtocolError("unexpected 101 Switching Protocols"))
            return
        if 100 <= status < 200:
            # An interim response (RFC 9110 §15.2): the real one follows on this message stream.
            self.informational = True
            self.headers = []
            return
        self.status = status
        self.head_done = True
        if self.head_only:
            self.complete = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.overrun:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.overrun:
            return
        if self.informational:
            self.informational = False
            return
        # Read it now: httptools resets the flag once the message is over.
        self.keep_alive = self.parser.should_keep_alive()
        self.complete = True
        self._wake()

    # The exchange

    def _delimited_by_close(self) -> bool:
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length" or (
                lowered == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                return False
        return True

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self._wake()
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, seconds: float) -> None:
        """Until the parser makes progress, the connection fails, or ``seconds`` pass.

        One timer handle per wait, not ``asyncio.timeout()``: this runs for every chunk of
        every stream, and a bare ``call_later`` is the cheapest timer asyncio has."""
        loop = asyncio.get_running_loop()
        waiter = self.waiter = loop.create_future()
        timer = loop.call_later(seconds, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None

    def take(self) -> bytes | None:
        """Everything that has arrived since the last take as one chunk, ``b""`` at the end,
        or None if nothing is there yet.

        httptools reports a chunked body one HTTP chunk at a time; what one read of the socket
        brought is handed on together, as one network chunk (docs/design.md §3), which saves
        one ASGI message per extra event when several arrive at once."""
        chunks = self.chunks
        if chunks:
            chunk = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            self.buffered = 0
            if self.paused and self.transport is not None:
                self.paused = False
                self.transport.resume_reading()
            return chunk
        if self.complete:
            return b""
        return None

    def reusable(self) -> bool:
        return (
            self.alive
            and self.complete
            and self.error is None
            and not self.head_only
            and not self.overrun
            and self.keep_alive
        )

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.alive = False


class Http1Response:
    __slots__ = ("_client", "_connection", "_headers", "_read_timeout", "_settled", "status")

    def __init__(self, client: Http1Client, connection: _Connection, read_timeout: float) -> None:
        self._client = client
        self._connection = connection
        self._read_timeout = read_timeout
        self._settled = False
        self.status = connection.status
        # Kept here: the connection's list is replaced by its next exchange after release.
        self._headers = connection.headers

    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]:
        return self._headers

    async def read_chunk(self) -> bytes:
        connection = self._connection
        while True:
            chunk = connection.take()
            if chunk is not None:
                return chunk
            if connection.error is not None:
                raise UpstreamStreamError(str(connection.error) or "failed")
            try:
                await connection.wait(self._read_timeout)
            except UpstreamTimeout:
                raise UpstreamStreamError("timeout") from None

    def close(self) -> None:
        if not self._settled:
            self._settled = True
            self._connection.abort()

    def release(self) -> None:
        if not self._settled:
            self._settled = True
            self._client._release(self._connection)


_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


def _replayable(request: OutboundRequest) -> bool:
    return request.method in _IDEMPOTENT or any(
        name.lower() == "idempotency-key" for name, _ in request.headers
    )


def _split_url(url: str) -> tuple[_Key, str, str]:
    """``(scheme, host, port)``, the Host header value and the request target."""
    scheme, _, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    target = slash + path if slash else "/"
    if "?" in authority:  # a URL without a path but with a query: http://host?x
        authority, _, query = authority.partition("?")
        target = "/?" + query
    host, port = authority, 443 if scheme == "https" else 80
    if authority.startswith("["):  # IPv6 literal
        end = authority.index("]")
        host = authority[1:end]
        if authority[end + 1 : end + 2] == ":":
            port = int(authority[end + 2 :])
    elif ":" in authority:
        host, _, port_text = authority.rpartition(":")
        port = int(port_text)
    return (scheme, host, port), authority, target


def _head(method: str, target: str, authority: str, request: OutboundRequest) -> bytes:
    lines = [f"{method} {target} HTTP/1.1\r\nhost: {authority}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in request.headers)
    if request.body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"content-length: {len(request.body)}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


class Http1Client:
    """One pool of keep-alive connections for one upstream, created in the lifespan."""

    def __init__(
        self,
        *,
        max_connections: int,
        tls: ssl.SSLContext | None = None,
        proxy: EgressProxy | None = None,
    ) -> None:
        self._limit = max_connections
        self._open = 0
        self._idle: dict[_Key, collections.deque[_Connection]] = {}
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._ssl = tls  # None: the default context, made at the first https connect
        self._proxy = proxy
        self._closed = False

    async def send(self, request: OutboundRequest) -> UpstreamResponse:
        key, authority, target = _split_url(request.url)
        forwarded = self._proxy is not None and key[0] == "http"
        if forwarded:
            request, target = to_proxy(request, authority, target, self._proxy)
        head = _head(request.method, target, authority, request)
        timeouts = request.timeouts
        # A request that died with its reused connection is sent again only when sending it
        # twice is harmless (RFC 9110 §9.2.2): the upstream may have read it before the
        # connection closed, and a second POST is a second generation (or file, or batch).
        attempts = 2 if _replayable(request) else 1
        for _ in range(attempts):
            connection = await self._acquire(key, timeouts.connect)
            connection.begin(head_only=request.method == "HEAD")
            assert connection.transport is not None
            if request.body:
                connection.transport.writelines((head, request.body))
            else:
                connection.transport.write(head)
            try:
                while not connection.head_done:
                    if connection.error is not None:
                        raise connection.error
                    await connection.wait(timeouts.read)
            except _RetryError:
                continue
            except BaseException:
                connection.abort()
                raise
            if connection.status == 407 and forwarded:
                # RFC 9110 §15.5.8: only a proxy answers 407; the request never reached the
                # upstream, as when a proxy refuses a CONNECT.
                connection.abort()
                raise proxy_refused(407)
            return Http1Response(self, connection, timeouts.read)
        raise UpstreamProtocolError("connection closed")

    def _take_idle(self, key: _Key) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()  # the most recently used: least likely to have timed out
            transport = connection.transport
            if connection.alive and transport is not None and not transport.is_closing():
                connection.reused = True
                return connection
        return None

    async def _acquire(self, key: _Key, connect_timeout: float) -> _Connection:
        connection = self._take_idle(key)
        if connection is not None:
            return connection
        loop = asyncio.get_running_loop()
        deadline = loop.time() + connect_timeout
        while self._open >= self._limit:
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            timer = loop.call_later(max(0.0, deadline - loop.time()), _expire, waiter)
            try:
                await waiter
            except UpstreamTimeout:
                raise UpstreamTimeout("no free connection") from None
            except BaseException:
                # Cancelled just as a place came free: pass the wake-up to the next waiter.
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._wake_one()
                raise
            finally:
                timer.cancel()
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            connection = self._take_idle(key)
            if connection is not None:
                return connection
        return await self._connect(key, connect_timeout)

    async def _connect(self, key: _Key, seconds: float) -> _Connection:
        scheme, host, port = key
        context = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        connection = _Connection(self, key)
        self._open += 1
        try:
            # One deadline for all of it: TCP, and with a proxy the CONNECT and TLS over it.
            async with asyncio.timeout(seconds):
                if self._proxy is None:
                    await asyncio.get_running_loop().create_connection(
                        lambda: connection, host, port, ssl=context
                    )
                else:
                    await connect_through(self._proxy, connection, host, port, context)
        except BaseException as exc:
            # Every failure (a cancelled request included) gives its place back to the pool
            # and lets a request waiting for it try.
            if connection.transport is not None:
                connection.abort()  # connection_lost frees the place
            else:
                self._open -= 1
                self._wake_one()
            if isinstance(exc, TimeoutError):
                raise UpstreamTimeout("connect timeout") from None
            if isinstance(exc, OSError | ssl.SSLError):
                through = " (through the egress proxy)" if self._proxy is not None else ""
                raise UpstreamConnectError(type(exc).__name__ + through) from None
            raise
        return connection

    def _release(self, connection: _Connection) -> None:
        if self._closed or not connection.reusable():
            connection.abort()
            return
        self._idle.setdefault(connection.key, collections.deque()).append(connection)
        self._wake_one()

    def _forget(self, connection: _Connection) -> None:
        """A connection closed: free its place in the pool."""
        self._open -= 1
        idle = self._idle.get(connection.key)
        if idle is not None and connection in idle:
            idle.remove(connection)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                connection.abort()
        self._idle.clear()
