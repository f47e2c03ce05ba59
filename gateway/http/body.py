"""The request body: read with a size cap, parsed (once, with orjson) only when a rule needs it."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

import orjson

from gateway import errors
from gateway.types import Body, RawHeaders, Receive


class ClientDisconnected(Exception):
    """The client went away before its request body was complete."""


def declared_length(headers: RawHeaders) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = -1
            if length < 0:
                raise errors.invalid_content_length()
            return length
    return None


async def read_body(receive: Receive, headers: RawHeaders, limit: int, lease: BodyLease) -> Body:
    """The whole body, refused with 413 as soon as it is known to exceed ``limit``. Its bytes
    are taken from the process's body budget through ``lease`` before they are kept.

    A declared length is taken whole when the body's first bytes arrive: not on the head alone
    (eight heads declaring 32 MiB each, sending nothing, would pin the whole budget), and not
    piece by piece (twenty large uploads would each hold a part of the budget and all wait for
    the rest, and all fail). A chunked body, whose size is unknown, is taken as it arrives."""
    length = declared_length(headers)
    if length is not None and length > limit:
        raise errors.body_too_large(limit)
    body: bytearray | None = None
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk: bytes = message.get("body", b"")
        more = message.get("more_body", False)
        if body is None:
            if length is not None:
                await lease.reserve(length)  # whole, now that the body has begun
            elif not more:
                await lease.reserve(len(chunk))
        if body is None and not more:
            if len(chunk) > limit:
                raise errors.body_too_large(limit)
            return chunk  # the common case: one message, no copy
        # Gathered in one buffer that is itself the result: joining a list of chunks at the
        # end would hold every large body twice for a moment, beyond what the budget counts.
        if body is None:
            body = bytearray()
        if len(body) + len(chunk) > limit:
            raise errors.body_too_large(limit)
        if length is None:
            await lease.reserve(len(chunk))
        body += chunk
        if not more:
            return body


def media_type(headers: RawHeaders) -> bytes:
    """The request's media type, lower-cased, without parameters; ``b""`` when none is given.

    Two ``Content-Type`` headers are refused with 400: the gateway would check the body as one
    type (or one form boundary) while the upstream might read it as the other."""
    found: bytes | None = None
    for name, value in headers:
        if name == b"content-type":
            if found is not None:
                raise errors.several_content_types()
            found = value.split(b";", 1)[0].strip().lower()
    return b"" if found is None else found


def may_be_json(media: bytes) -> bool:
    """Whether a body of this media type is read as JSON for the model rules.

    A missing or ``text/plain`` type counts: upstreams such as vLLM parse such a body as JSON
    anyway, so skipping it would let a client slip past the key's model list and the token
    reservation by leaving the header out."""
    return media in (b"", b"application/json", b"text/plain") or media.endswith(b"+json")


def parse_json(body: Body) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise errors.invalid_json() from None


class BodyBudget:
    """Request body bytes held in memory by all requests of the process at once.

    Each request body is capped (``max_body_bytes``), but many at once are not: twenty uploads
    just under 32 MiB raised the gateway's memory by 600 MB. A body takes its bytes from this
    budget before the gateway keeps them (see ``read_body``) and gives them back when the
    request ends. A body that does not fit waits,
    first come first served, up to ``wait`` seconds, then gets 503: the process never holds
    more than ``capacity`` bytes of bodies, whatever the clients send.
    """

    def __init__(self, capacity: int, wait: float) -> None:
        self.capacity = capacity
        self.available = capacity
        self._wait = wait
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def lease(self) -> BodyLease:
        return BodyLease(self)

    async def _take(self, size: int) -> None:
        if not self._waiters and size <= self.available:
            self.available -= size  # the common case: no wait, no future
            return
        if size > self.capacity:
            raise errors.body_memory_exhausted()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, waiter)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(self._wait):
                await waiter
        except BaseException as exc:
            self._abandon(entry)
            if isinstance(exc, TimeoutError):
                raise errors.body_memory_exhausted() from None
            raise

    def _abandon(self, entry: tuple[int, asyncio.Future[None]]) -> None:
        size, waiter = entry
        if waiter.done() and not waiter.cancelled():
            self._give(size)  # granted just as the wait ended: hand it on
            return
        with contextlib.suppress(ValueError):  # already dropped by _grant
            self._waiters.remove(entry)
        self._grant()  # a smaller body behind this one may fit now

    def _give(self, size: int) -> None:
        self.available += size
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.available:
            size, waiter = self._waiters.popleft()
            if waiter.done():
                continue
            self.available -= size
            waiter.set_result(None)


class BodyLease:
    """What one request holds of the budget; ``release()`` at its end returns all of it."""

    __slots__ = ("_budget", "held")

    def __init__(self, budget: BodyBudget) -> None:
        self._budget = budget
        self.held = 0

    async def reserve(self, size: int) -> None:
        if size > 0:
            await self._budget._take(size)
            self.held += size

    def release(self) -> None:
        held, self.held = self.held, 0
        if held:
            self._budget._give(held)
