"""Connections through an http egress proxy, for the upstream transports.

An http target's requests go to the proxy in absolute-form (RFC 9112 §3.2.2), with the proxy's
credentials: ``to_proxy``. An https target gets a CONNECT tunnel, then TLS end to end:
``connect_through``. RFC 9110 §9.3.6: the client asks the proxy ``CONNECT host:port`` (the
authority-form of RFC 9112 §3.2.3); any 2xx answer means every byte after that answer's head
comes from the target, so the client starts TLS over the same connection, naming the target
(SNI and the certificate check), never the proxy. The proxy sees only the target's name and
port; the request, its API key and the answer stay inside TLS. Anything but a 2xx is the proxy
refusing: ``proxy_refused`` makes the ``UpstreamConnectError`` (both transports use it), which
names the status (407: the proxy wants, or did not accept, the ``Proxy-Authorization``
credentials, RFC 9110 §11.7.2) and never the credentials.

The caller bounds the whole of it (TCP to the proxy, CONNECT, TLS) with its connect timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http
import ssl
from typing import Final, cast

from gateway.upstream.egress import EgressProxy
from gateway.upstream.seam import OutboundRequest, UpstreamConnectError

__all__ = ["connect_request", "connect_through", "open_tls_tunnel", "proxy_refused", "to_proxy"]

# The most the proxy's answer head to CONNECT may take. A real one is a status line and a few
# fields; more means something that is not a proxy is listening.
_HEAD_LIMIT: Final = 16 * 1024


def proxy_refused(status: int) -> UpstreamConnectError:
    """The error for a proxy that answered ``status`` instead of tunnelling or forwarding."""
    try:
        phrase = " " + http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    why = " (its credentials are missing or wrong)" if status == 407 else ""
    return UpstreamConnectError(f"the egress proxy refused: {status}{phrase}{why}")


def connect_request(host: str, port: int, authorization: str | None) -> bytes:
    """``CONNECT host:port HTTP/1.1``, with ``Host`` (RFC 9112 §3.2: every HTTP/1.1 request
    has one; for CONNECT it is the same authority) and ``Proxy-Authorization`` when given."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    head = f"CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\n"
    if authorization is not None:
        head += f"proxy-authorization: {authorization}\r\n"
    return (head + "\r\n").encode("latin-1")


class _ProxyAnswer(asyncio.Protocol):
    """Reads the proxy's answer head to CONNECT, then stops reading: what follows is TLS.

    The answer is the head, and whether more bytes came right after it."""

    def __init__(self, answered: asyncio.Future[tuple[bytes, bool]]) -> None:
        self._answered = answered
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._answered.done():
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end > _HEAD_LIMIT or (end < 0 and len(self._buffer) > _HEAD_LIMIT):
            self._answered.set_exception(
                UpstreamConnectError("the egress proxy's answer to CONNECT is too long")
            )
        elif end >= 0:
            assert self._transport is not None
            self._transport.pause_reading()  # start_tls takes the connection from here
            self._answered.set_result((self._buffer[:end], end + 4 < len(self._buffer)))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._answered.done():
            self._answered.set_exception(
                UpstreamConnectError("the egress proxy closed the connection on CONNECT")
            )


class _Handshake(asyncio.Protocol):
    """Stands in for the connection's protocol while TLS starts, so that a tunnel which dies in
    the handshake never reaches the pool's accounting; the caller swaps its own in after."""

    broken = False

    def data_received(self, data: bytes) -> None:
        self.broken = True  # an HTTP server does not speak first

    def eof_received(self) -> bool:
        self.broken = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.broken = True


def _status(head: bytes) -> int | None:
    """The status code of ``head``'s status line (RFC 9112 §4), None when it is not HTTP/1.x."""
    line = head.partition(b"\r\n")[0]
    version, _, rest = line.partition(b" ")
    code = rest[:3]
    if not version.startswith(b"HTTP/1.") or not code.isdigit() or rest[3:4] not in (b"", b" "):
        return None
    return int(code)


async def open_tls_tunnel(
    proxy: EgressProxy, host: str, port: int, context: ssl.SSLContext
) -> asyncio.Transport:
    """A TLS transport to ``host:port`` through ``proxy``, its handshake done. Its protocol is
    a stand-in: the caller sets its own (``set_protocol``) and calls its ``connection_made``.
    On any failure nothing stays open; OSError and ``ssl.SSLError`` come out as they are."""
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[tuple[bytes, bool]] = loop.create_future()
    raw, _ = await loop.create_connection(lambda: _ProxyAnswer(answered), proxy.host, proxy.port)
    try:
        raw.write(connect_request(host, port, proxy.authorization))
        head, more = await answered
        status = _status(head)
        if status is None:
            raise UpstreamConnectError("the egress proxy's answer to CONNECT is not HTTP/1.x")
        if not 200 <= status < 300:
            raise proxy_refused(status)  # its body, if any, is of no use to the gateway
        if more:
            # The target cannot speak before our TLS ClientHello: the proxy sent a body or junk
            # after its 2xx, and what follows cannot be trusted to be the target's.
            raise UpstreamConnectError("the egress proxy sent bytes after its CONNECT answer")
    except BaseException:
        raw.abort()
        raise
    standin = _Handshake()
    # start_tls closes the connection itself when the handshake fails or is cancelled.
    transport = await loop.start_tls(raw, standin, context, server_hostname=host)
    if transport is None or standin.broken or transport.is_closing():
        (transport or raw).abort()
        raise UpstreamConnectError("the tunnel closed during the TLS handshake")
    return transport


async def connect_through(
    proxy: EgressProxy,
    protocol: asyncio.Protocol,
    host: str,
    port: int,
    context: ssl.SSLContext | None,
) -> None:
    """Connect ``protocol`` to ``host:port`` through ``proxy``: to the proxy itself for an http
    target (``context`` None; see ``to_proxy``), through a TLS tunnel for an https one."""
    loop = asyncio.get_running_loop()
    if context is None:
        await loop.create_connection(lambda: protocol, proxy.host, proxy.port)
        return
    transport = await open_tls_tunnel(proxy, host, port, context)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)


def to_proxy(
    request: OutboundRequest, authority: str, target: str, proxy: EgressProxy | None
) -> tuple[OutboundRequest, str]:
    """An http target's request and its request target as the proxy takes them: the
    absolute-form (RFC 9112 §3.2.2: ``Host`` is still sent) and the proxy's credentials
    (RFC 9110 §11.7.2), which the proxy consumes: the upstream never sees them."""
    assert proxy is not None
    if proxy.authorization is not None:
        headers = (*request.headers, ("proxy-authorization", proxy.authorization))
        request = dataclasses.replace(request, headers=headers)
    return request, f"http://{authority}{target}"
