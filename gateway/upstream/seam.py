"""The seam between the relay and the HTTP client that talks to upstreams.

The relay only needs: send a request and get the status and raw headers, then read raw body
chunks as they arrive, then close. Keeping it to that lets the client be chosen by measurement
(docs/design.md §5) and lets tests swap it.

Exceptions, as a tree (after httpx's ``_exceptions.py``)::

    UpstreamError
    ├── UpstreamConnectError    could not connect                         -> 502
    ├── UpstreamTimeout         no connection or no response head in time -> 504
    ├── UpstreamProtocolError   closed or garbled before the response head -> 502
    └── UpstreamStreamError     failed after the head: the stream is cut, never ended cleanly
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from gateway.config.model import Timeouts
from gateway.types import Body

if TYPE_CHECKING:
    from gateway.upstream.egress import EgressProxy


class UpstreamError(Exception):
    """The upstream exchange failed; the message is safe for logs (no URL, no key)."""


class UpstreamConnectError(UpstreamError):
    pass


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamProtocolError(UpstreamError):
    pass


class UpstreamStreamError(UpstreamError):
    pass


@dataclass(frozen=True, slots=True)
class OutboundRequest:
    method: str
    url: str  # already percent-encoded; sent as is
    headers: Sequence[tuple[str, str]]
    body: Body
    timeouts: Timeouts


class UpstreamResponse(Protocol):
    status: int

    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]:
        """Response headers as received, names in any case."""
        ...

    async def read_chunk(self) -> bytes:
        """The next raw (undecoded) body chunk as soon as it arrives; ``b""`` at the end.

        Raises :class:`UpstreamStreamError` when the upstream fails mid-body."""
        ...

    def close(self) -> None:
        """Abort the exchange and drop the connection (cancels the upstream's work)."""
        ...

    def release(self) -> None:
        """The body was read to the end: return the connection to the pool."""
        ...


class UpstreamClient(Protocol):
    """One connection pool for one upstream, created in the lifespan."""

    async def send(self, request: OutboundRequest) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...


class ClientFactory(Protocol):
    def __call__(
        self,
        *,
        max_connections: int,
        tls: ssl.SSLContext | None = None,
        proxy: EgressProxy | None = None,
    ) -> UpstreamClient:
        """A pool of ``max_connections`` for one target. ``tls``: the upstream's context for
        https (``gateway/upstream/tls.py``; None keeps the client's default one). ``proxy``: the
        egress proxy its connections go through (``gateway/upstream/egress.py``; None: direct)."""
        ...
