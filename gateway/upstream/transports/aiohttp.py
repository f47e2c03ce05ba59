"""The hot path's upstream client: aiohttp, with decompression off.

Chosen by measurement (docs/design.md §5): an aiohttp client writing ASGI messages measured ~7,500
non-streaming requests/s on one core against ~400 for httpx's own pool (encode/httpx#3215).
``auto_decompress=False`` keeps the body as the upstream encoded it, so the relay forwards raw
bytes with their ``Content-Encoding``.

An upstream's own TLS context goes to the connector (``ssl=``). An egress proxy goes with each
request (``proxy=``): aiohttp tunnels an https target through CONNECT (RFC 9110 §9.3.6) with
``proxy_headers``, and sends an http target's requests to the proxy in absolute-form (RFC 9112
§3.2.2) without them: such a request gets its ``Proxy-Authorization`` here.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence

import aiohttp
from aiohttp import hdrs
from aiohttp.streams import EMPTY_PAYLOAD
from yarl import URL

from gateway.config.model import Timeouts
from gateway.upstream.egress import EgressProxy
from gateway.upstream.seam import (
    OutboundRequest,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamResponse,
    UpstreamStreamError,
    UpstreamTimeout,
)
from gateway.upstream.transports.tunnel import proxy_refused

# aiohttp adds these on its own unless told not to; the relay sends the client's own values (or
# none), so what the upstream sees is what the client sent.
_SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


class _Request(aiohttp.ClientRequest):
    # aiohttp announces an empty body (Content-Length: 0) for every method outside this set
    # (aio-libs/aiohttp#11035), DELETE included. RFC 9110 §8.6: a request without content whose
    # method does not anticipate any SHOULD NOT carry one. With DELETE here, only POST, PUT and
    # PATCH (the methods the config allows that carry content) announce an empty body, as the
    # http1 transport does; a DELETE with a body still gets its length.
    GET_METHODS = aiohttp.ClientRequest.GET_METHODS | {hdrs.METH_DELETE}


class AiohttpResponse:
    __slots__ = ("_client", "_response", "_settled", "status")

    def __init__(self, client: AiohttpClient, response: aiohttp.ClientResponse) -> None:
        self._client = client
        self._response = response
        self._settled = False
        self.status = response.status

    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]:
        return self._response.raw_headers

    async def read_chunk(self) -> bytes:
        try:
            return await self._response.content.readany()
        except Exception as exc:
            # Every failure is the seam's: aiohttp raises ClientError and TimeoutError, but also
            # RuntimeError('Connection closed.') from a stream whose connection was closed
            # under it, and the relay only knows UpstreamStreamError.
            raise UpstreamStreamError(_describe(exc)) from None

    def close(self) -> None:
        self._response.close()
        self._settle()

    def release(self) -> None:
        self._response.release()
        self._settle()

    def _settle(self) -> None:
        if not self._settled:
            self._settled = True
            self._client._settled()


class _UntilCloseResponse(AiohttpResponse):
    """A body with neither Content-Length nor chunking, which ends with the connection
    (RFC 9112 §6.3): complete if the upstream closed cleanly, cut if the connection failed.

    aiohttp's ``ResponseHandler.connection_lost`` feeds its parser an EOF either way, so such a
    body always reads as complete; but first it settles the protocol's ``closed`` future, with
    the error the transport reported (a ``ConnectionResetError`` for a RST) or with None for a
    clean close. The end of the body is checked against that future: only here, so a body with
    a length or chunking pays nothing per chunk."""

    __slots__ = ("_closed",)

    def __init__(
        self,
        client: AiohttpClient,
        response: aiohttp.ClientResponse,
        closed: asyncio.Future[None],
    ) -> None:
        super().__init__(client, response)
        self._closed = closed
        # The future is created for this check; its error is read here too, so that a reset
        # nobody reads to the end of is not logged as "Future exception was never retrieved".
        closed.add_done_callback(_observe)

    async def read_chunk(self) -> bytes:
        chunk = await super().read_chunk()
        if not chunk:
            closed = self._closed
            if closed.done() and not closed.cancelled() and (error := closed.exception()):
                raise UpstreamStreamError(_describe(error.__cause__ or error))
        return chunk


def _observe(closed: asyncio.Future[None]) -> None:
    if not closed.cancelled():
        closed.exception()


def _until_close(response: aiohttp.ClientResponse) -> asyncio.Future[None] | None:
    """The ``closed`` future of the response's connection if its body ends with the
    connection and the connection is still open, else None."""
    connection = response.connection
    if connection is None:
        # The body is over already: it came with its head. (Or the connection was lost before
        # the head was handed back, and aiohttp released it: how it ended is unknown then.
        # Not seen in tests, as the task reading the head resumes before the next read of
        # the socket.)
        return None
    # Cheapest first for a stream (chunked); RFC 9112 §6.3 for the order of the rules.
    headers = response.headers
    coding = headers.get(hdrs.TRANSFER_ENCODING)
    if coding is None:
        if hdrs.CONTENT_LENGTH in headers:
            return None
    elif "chunked" in coding.lower():
        return None
    if response.content is EMPTY_PAYLOAD:
        return None  # no body at all: HEAD, 204, 304
    protocol = connection.protocol
    return None if protocol is None else protocol.closed


def _describe(exc: BaseException) -> str:
    # Class name only: aiohttp's messages can carry the upstream URL.
    return type(exc).__name__


class AiohttpClient:
    """One ``ClientSession`` (one pool) per upstream."""

    def __init__(
        self,
        *,
        max_connections: int,
        tls: ssl.SSLContext | None = None,
        proxy: EgressProxy | None = None,
    ) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=max_connections, ttl_dns_cache=60, ssl=True if tls is None else tls
            ),
            auto_decompress=False,
            # Never share cookies between the gateway's clients.
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            timeout=aiohttp.ClientTimeout(total=None),
            request_class=_Request,
        )
        self._timeouts: dict[Timeouts, aiohttp.ClientTimeout] = {}
        # Exchanges sent and not yet released or closed: aclose() leaves them running.
        self._in_flight = 0
        self._closed = False
        self._closing: asyncio.Task[None] | None = None
        self._proxy: URL | None = None
        self._proxy_authorization: str | None = None
        self._proxy_headers: dict[str, str] | None = None
        if proxy is not None:
            self._proxy = URL.build(scheme="http", host=proxy.host, port=proxy.port)
            if proxy.authorization is not None:
                self._proxy_authorization = proxy.authorization
                self._proxy_headers = {"Proxy-Authorization": proxy.authorization}

    def _timeout(self, timeouts: Timeouts) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(timeouts)
        if timeout is None:
            # connect bounds the wait for a free connection of the pool plus the connect;
            # sock_connect alone would leave that wait unbounded. sock_read bounds the silence
            # between two reads, not the whole exchange: an LLM may stream for many minutes
            # (docs/design.md §3).
            timeout = aiohttp.ClientTimeout(
                total=None,
                connect=timeouts.connect,
                sock_connect=timeouts.connect,
                sock_read=timeouts.read,
            )
            self._timeouts[timeouts] = timeout
        return timeout

    async def send(self, request: OutboundRequest) -> UpstreamResponse:
        headers = request.headers
        forwarded = self._proxy is not None and request.url.startswith("http:")
        if forwarded and self._proxy_authorization is not None:
            headers = (*headers, ("Proxy-Authorization", self._proxy_authorization))
        try:
            response = await self._session.request(
                request.method,
                URL(request.url, encoded=True),
                headers=headers,
                data=request.body or None,
                allow_redirects=False,
                timeout=self._timeout(request.timeouts),
                proxy=self._proxy,
                proxy_headers=self._proxy_headers,
            )
        except (TimeoutError, aiohttp.ConnectionTimeoutError, aiohttp.SocketTimeoutError):
            raise UpstreamTimeout("timeout") from None
        except aiohttp.ClientHttpProxyError as exc:
            raise proxy_refused(exc.status) from None
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamConnectError(_describe(exc)) from None
        except aiohttp.ClientError as exc:
            raise UpstreamProtocolError(_describe(exc)) from None
        if response.status == 101:
            # aiohttp hands a 101 back as a response (it is how its websockets begin); the
            # gateway never asks to switch protocols, so an upstream that does is broken, and
            # what follows on the connection is not HTTP.
            response.close()
            raise UpstreamProtocolError("unexpected 101 Switching Protocols")
        if response.status == 407 and forwarded:
            # RFC 9110 §15.5.8: only a proxy answers 407; the request never reached the upstream.
            response.close()
            raise proxy_refused(407)
        self._in_flight += 1
        closed = _until_close(response)
        if closed is not None:
            return _UntilCloseResponse(self, response, closed)
        return AiohttpResponse(self, response)

    def _settled(self) -> None:
        self._in_flight -= 1
        if self._closed and not self._in_flight and self._closing is None:
            # The last exchange aclose() let run is over: close the pool now.
            self._closing = asyncio.get_running_loop().create_task(self._session.close())

    async def aclose(self) -> None:
        """Close the pool, once the exchanges in progress are over.

        A reload retires the pool of an upstream it no longer uses while streams on it may
        still run, as the http1 transport allows: closing the session at once would cut them
        (their next read raising RuntimeError('Connection closed.')). So with exchanges in
        progress this returns at once and the last one to be released or closed closes the
        session, its idle connections with it."""
        self._closed = True
        if self._closing is not None:
            await self._closing
        elif not self._in_flight:
            await self._session.close()
