"""The hot path's upstream client: aiohttp, with decompression off.

Chosen by measurement (docs/design.md §5): an aiohttp client writing ASGI messages measured ~7,500
non-streaming requests/s on one core against ~400 for httpx's own pool (encode/httpx#3215).
``auto_decompress=False`` keeps the body as the upstream encoded it, so the relay forwards raw
bytes with their ``Content-Encoding``.
"""

from __future__ import annotations

from collections.abc import Sequence

import aiohttp
from yarl import URL

from gateway.config.model import Timeouts
from gateway.upstream.seam import (
    OutboundRequest,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamResponse,
    UpstreamStreamError,
    UpstreamTimeout,
)

# aiohttp adds these on its own unless told not to; the relay sends the client's own values (or
# none), so what the upstream sees is what the client sent.
_SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


class AiohttpResponse:
    __slots__ = ("_response", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status

    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]:
        return self._response.raw_headers

    async def read_chunk(self) -> bytes:
        try:
            return await self._response.content.readany()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamStreamError(_describe(exc)) from None

    def close(self) -> None:
        self._response.close()

    def release(self) -> None:
        self._response.release()


def _describe(exc: BaseException) -> str:
    # Class name only: aiohttp's messages can carry the upstream URL.
    return type(exc).__name__


class AiohttpClient:
    """One ``ClientSession`` (one pool) per upstream."""

    def __init__(self, *, max_connections: int) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, ttl_dns_cache=60),
            auto_decompress=False,
            # Never share cookies between the gateway's clients.
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            timeout=aiohttp.ClientTimeout(total=None),
        )
        self._timeouts: dict[Timeouts, aiohttp.ClientTimeout] = {}

    def _timeout(self, timeouts: Timeouts) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(timeouts)
        if timeout is None:
            # sock_read bounds the silence between two reads, not the whole exchange: an LLM
            # may stream for many minutes (docs/design.md §3).
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=timeouts.connect, sock_read=timeouts.read
            )
            self._timeouts[timeouts] = timeout
        return timeout

    async def send(self, request: OutboundRequest) -> UpstreamResponse:
        try:
            response = await self._session.request(
                request.method,
                URL(request.url, encoded=True),
                headers=request.headers,
                data=request.body or None,
                allow_redirects=False,
                timeout=self._timeout(request.timeouts),
            )
        except (TimeoutError, aiohttp.ConnectionTimeoutError, aiohttp.SocketTimeoutError):
            raise UpstreamTimeout("timeout") from None
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamConnectError(_describe(exc)) from None
        except aiohttp.ClientError as exc:
            raise UpstreamProtocolError(_describe(exc)) from None
        return AiohttpResponse(response)

    async def aclose(self) -> None:
        await self._session.close()
