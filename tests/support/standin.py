"""A stand-in behind the upstream seam, and an in-process way to call an ASGI app.

``StandInUpstream`` implements the seam (``gateway/upstream/seam.py``) without a socket: every
pool it makes answers from one ``respond`` function and records what it was sent. With
``call`` (which drives an ASGI app directly and records every message it sends) the whole
pipeline runs in the test's own event loop in well under a millisecond per request, beside the
end-to-end tests that run a real gateway process against a real fake upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

import orjson

from gateway.app import Gateway
from gateway.config.loader import parse_config_text
from gateway.types import ASGIApp, Message
from gateway.upstream.egress import EgressProxy
from gateway.upstream.seam import OutboundRequest, UpstreamClient, UpstreamStreamError


@dataclass
class Scripted:
    """One upstream answer: a head, then ``chunks``; after ``cut_after`` chunks the upstream
    fails mid-body, and ``fault`` (any exception) is raised in place of the head."""

    status: int = 200
    headers: Sequence[tuple[bytes, bytes]] = ((b"content-type", b"application/json"),)
    chunks: Sequence[bytes] = (b"{}",)
    cut_after: int | None = None
    fault: BaseException | None = None
    chunk_delay: float = 0.0
    # Seconds before the head (or the fault) comes: an upstream that thinks, or hangs.
    head_delay: float = 0.0


def json_answer(document: object, status: int = 200) -> Scripted:
    body = orjson.dumps(document)
    return Scripted(
        status,
        ((b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())),
        (body,),
    )


Respond = Callable[[OutboundRequest], Scripted]


class StandInResponse:
    def __init__(self, scripted: Scripted, request: OutboundRequest | None = None) -> None:
        # The request this answers, for tests that tell answers apart by what was asked.
        self.request = request
        self.status = scripted.status
        self._scripted = scripted
        self._next = 0
        self.closed = False
        self.released = False

    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]:
        return self._scripted.headers

    async def read_chunk(self) -> bytes:
        scripted = self._scripted
        if scripted.cut_after is not None and self._next >= scripted.cut_after:
            raise UpstreamStreamError("the stand-in upstream cut the body")
        if self._next >= len(scripted.chunks):
            return b""
        if scripted.chunk_delay:
            await asyncio.sleep(scripted.chunk_delay)
        chunk = scripted.chunks[self._next]
        self._next += 1
        return chunk

    def close(self) -> None:
        self.closed = True

    def release(self) -> None:
        self.released = True


@dataclass
class StandInUpstream:
    """Every pool the gateway makes through ``factory`` answers with ``respond``."""

    respond: Respond = field(default=lambda request: Scripted())
    requests: list[OutboundRequest] = field(default_factory=list)
    responses: list[StandInResponse] = field(default_factory=list)

    def factory(
        self,
        *,
        max_connections: int,
        tls: ssl.SSLContext | None = None,
        proxy: EgressProxy | None = None,
    ) -> UpstreamClient:
        return _Pool(self)


class _Pool:
    def __init__(self, upstream: StandInUpstream) -> None:
        self._upstream = upstream

    async def send(self, request: OutboundRequest) -> StandInResponse:
        self._upstream.requests.append(request)
        scripted = self._upstream.respond(request)
        if scripted.head_delay:
            await asyncio.sleep(scripted.head_delay)
        if scripted.fault is not None:
            raise scripted.fault
        response = StandInResponse(scripted, request)
        self._upstream.responses.append(response)
        return response

    async def aclose(self) -> None:
        pass


@dataclass
class Recorded:
    """What an ASGI app sent for one request."""

    messages: list[Message]

    @property
    def status(self) -> int:
        status: int = self.messages[0]["status"]
        return status

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode("latin-1"): v.decode("latin-1") for k, v in self.messages[0]["headers"]}

    def header_list(self, name: str) -> list[str]:
        wanted = name.encode("latin-1")
        return [v.decode("latin-1") for k, v in self.messages[0]["headers"] if k == wanted]

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])

    @property
    def complete(self) -> bool:
        """Whether the response ended cleanly (its last body message says no more)."""
        last = self.messages[-1] if len(self.messages) > 1 else {}
        return last.get("type") == "http.response.body" and not last.get("more_body", False)

    def json(self) -> Any:
        return orjson.loads(self.body)


async def call(
    app: ASGIApp,
    method: str,
    path: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    client: tuple[str, int] = ("127.0.0.1", 50000),
    disconnect_after: float | None = None,
) -> Recorded:
    """Drive ``app`` with one HTTP/1.1 request as uvicorn would; record what it sends. With
    ``disconnect_after`` the client goes away that many seconds after its request."""
    raw_headers = [(b"host", b"gateway.test")]
    raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    if body:
        raw_headers.append((b"content-length", str(len(body)).encode()))
    path_part, _, query = path.partition("?")
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path_part,
        "raw_path": path_part.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": raw_headers,
        "client": client,
        "server": ("127.0.0.1", 8080),
    }
    sent: list[Message] = []
    body_sent = False
    done = asyncio.Event()

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if disconnect_after is None:
            await done.wait()
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), disconnect_after)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    try:
        await app(scope, receive, send)
    finally:
        done.set()
    return Recorded(sent)


@asynccontextmanager
async def in_process_gateway(
    config_yaml: str,
    upstream: StandInUpstream,
    env: dict[str, str] | None = None,
    access_stream: TextIO | None = None,
) -> AsyncIterator[Gateway]:
    """A started ``Gateway`` app whose upstream pools are ``upstream``'s stand-ins."""
    config = parse_config_text(config_yaml, env=env or {})
    app = Gateway(config, client_factory=upstream.factory, access_stream=access_stream)
    await app.startup()
    try:
        yield app
    finally:
        await app.shutdown()
