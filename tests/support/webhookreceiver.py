"""A real webhook receiver on 127.0.0.1, in the test's event loop.

It answers each request with the next ``Reply`` of its script (status, headers, a delay before
answering), then with ``default``; it records every request, and checks each signature the way
a client of the gateway would, with the reference ``standardwebhooks`` library (not the
gateway's own code, which a test would otherwise check against itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from aiohttp import web
from standardwebhooks import Webhook, WebhookVerificationError


@dataclass(frozen=True, slots=True)
class Reply:
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Received:
    at: float  # time.monotonic() when the request arrived
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    verified_with: tuple[str, ...]  # the receiver's secrets under which the library verified it
    complaint: str | None  # the library's error when none did


class WebhookReceiver:
    def __init__(
        self,
        secrets: Sequence[str] = (),
        replies: Iterable[Reply] = (),
        default: Reply | None = None,
    ) -> None:
        self.secrets = tuple(secrets)
        self._script = list(replies)
        self._default = default or Reply()
        self.received: list[Received] = []
        self._arrived = asyncio.Condition()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._socket: socket.socket | None = None
        self.port = 0

    def script(self, *replies: Reply) -> None:
        """Answer the next requests with ``replies``, in order."""
        self._script.extend(replies)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=0.5
        )
        await self._runner.setup()
        sock = self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))  # the kernel picks a free port; no race with another test
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def aclose(self) -> None:
        self._closing.set()  # cuts short any delayed answer
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._socket is not None:
            self._socket.close()  # the site closes its server, not the socket it was given
            self._socket = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        """The first ``count`` requests, waiting up to ``timeout`` seconds for them."""
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(self.received) >= count)
        return self.received[:count]

    def _verify(self, body: bytes, headers: dict[str, str]) -> tuple[tuple[str, ...], str | None]:
        verified = []
        complaint = None
        for secret in self.secrets:
            try:
                Webhook(secret).verify(body, headers, json_parse=False)
            except WebhookVerificationError as exc:
                complaint = str(exc)
            else:
                verified.append(secret)
        return tuple(verified), (None if verified else complaint)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        body = await request.read()
        headers = {name.lower(): value for name, value in request.headers.items()}
        verified, complaint = self._verify(body, headers)
        async with self._arrived:
            self.received.append(
                Received(
                    arrived, request.method, request.path_qs, headers, body, verified, complaint
                )
            )
            self._arrived.notify_all()
        reply = self._script.pop(0) if self._script else self._default
        if reply.delay:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), reply.delay)
        return web.Response(status=reply.status, headers=dict(reply.headers), body=reply.body)
