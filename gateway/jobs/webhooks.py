"""One webhook attempt over HTTP, and when the next one is due (Standard Webhooks).

``WebhookSender.send`` makes one signed POST and says what became of it; it never raises for
anything the network or the receiver does. What counts (spec: "Delivery success and
failure"): a 2xx is success; 410 Gone stops the schedule for good; anything else, a timeout, a
refused connection and a 3xx included, is a failed attempt retried on the schedule. Redirects
are not followed: the spec advises against it, and a ``Location`` could point at an internal
address the key may not reach (SSRF).

Where the request may go is ``gateway.jobs.hosts``' rule, applied twice: to the URL before
anything is sent, and to every address the host resolves to, by a resolver that is the only
way this session looks names up, so the addresses checked are the ones connected to (no second
lookup an attacker's DNS could answer differently: DNS rebinding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import socket
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from gateway import __version__
from gateway.jobs.hosts import WebhookHosts
from gateway.jobs.signing import WebhookSecrets

__all__ = [
    "JITTER",
    "MAX_RESPONSE_BYTES",
    "USER_AGENT",
    "Attempt",
    "RefusedAddress",
    "WebhookSender",
    "next_delay",
    "parse_retry_after",
]

USER_AGENT = f"llm-gateway/{__version__} (webhooks)"
# What is read of a receiver's answer before it is dropped: enough to finish a normal answer
# cleanly, never a body a hostile receiver could make the gateway hold.
MAX_RESPONSE_BYTES = 64 * 1024
JITTER = 0.1  # up to 10% more on each delay (spec: "some level of random jitter")


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one attempt came to."""

    at: float  # Unix seconds when it started
    status: int | None  # the receiver's status; None when no answer came
    error: str | None  # why no answer came, or what was wrong with it (no URL query in it)
    retry_after: float | None  # seconds the receiver asked to wait (Retry-After), if any
    duration_ms: float
    gone: bool = False  # 410 Gone: the receiver wants no more deliveries
    refused: bool = False  # the key's webhook_hosts refuses the URL itself: no retry helps

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def final(self) -> bool:
        """The schedule stops here whether or not this attempt succeeded."""
        return self.ok or self.gone or self.refused


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from ``now`` that a ``Retry-After`` value asks for (RFC 9110 §10.2.3: a
    delay in seconds or an HTTP-date), not negative; None when absent or malformed."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT (RFC 9110 §5.6.7)
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def next_delay(
    schedule: Sequence[float], attempts: int, retry_after: float | None, jitter: float
) -> float | None:
    """Seconds from the end of attempt number ``attempts`` (1 for the first) to the next, or
    None when the schedule has run out. ``schedule[i]`` is the wait before attempt ``i + 1``;
    ``jitter`` (0 to 1, the caller's random draw) adds up to ``JITTER`` of it, so that retries
    of many deliveries failed by one outage do not all land at once. A ``Retry-After`` moves
    the attempt later, never sooner, and at most to the schedule's longest step: a receiver
    cannot park a delivery for days, nor bring a retry forward."""
    if attempts >= len(schedule):
        return None
    delay = schedule[attempts] * (1 + JITTER * min(max(jitter, 0.0), 1.0))
    if retry_after is not None and math.isfinite(retry_after):
        delay = max(delay, min(retry_after, max(schedule)))
    return delay


class RefusedAddress(OSError):
    """A host resolved to an address the key may not reach; the message says which and why."""


@dataclass(frozen=True, slots=True)
class _Guard:
    """The rule for the connection being made: whose hosts, and which URL host and port."""

    hosts: WebhookHosts
    host: str  # normalised: lower case, no trailing dot
    port: int


class _CheckingResolver(AbstractResolver):
    """Resolves with the loop's getaddrinfo, then checks every address against the rule of the
    request being sent (found in ``guard``, a context variable each ``send`` sets: the
    connector is shared, the rule is per key). Any refused address refuses the host: '*' is
    "any host whose addresses are all public", and a name that answers with one internal
    address among public ones is a rebinding attempt more often than not."""

    def __init__(self, guard: ContextVar[_Guard | None]) -> None:
        self._guard = guard

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        guard = self._guard.get()
        name = host.lower().removesuffix(".")
        if guard is None or name != guard.host:
            # Only send() connects, after setting the rule for its host; anything else
            # (a redirect would be one, and none is followed) is refused rather than trusted.
            raise RefusedAddress(f"refused: no webhook rule for host {name!r}")
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, family=family, flags=socket.AI_ADDRCONFIG
        )
        results: list[ResolveResult] = []
        for info_family, _, proto, _, sockaddr in infos:
            text = str(sockaddr[0])
            address = ipaddress.ip_address(text)
            problem = guard.hosts.check_address(guard.host, guard.port, address)
            if problem is not None:
                raise RefusedAddress(problem)
            results.append(
                ResolveResult(
                    hostname=host,
                    host=text,
                    port=int(sockaddr[1]),
                    family=info_family,
                    proto=proto,
                    # The connector hands these to getaddrinfo again: numeric, so that it
                    # parses them and never looks a name up.
                    flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                )
            )
        if not results:
            raise RefusedAddress(f"{name} has no address")
        return results

    async def close(self) -> None:
        pass


def _refusal(exc: BaseException) -> RefusedAddress | None:
    seen: BaseException | None = exc
    for _ in range(8):  # the chain aiohttp builds is short; a cycle must not loop forever
        if seen is None:
            return None
        if isinstance(seen, RefusedAddress):
            return seen
        seen = getattr(seen, "os_error", None) or seen.__cause__ or seen.__context__
    return None


def _without_query(text: str, url: URL) -> str:
    """``text`` with the URL's query and fragment cut out: they may carry a token. (The
    messages here are the gateway's own and name no URL; this guards one from a library.)"""
    text = text.replace(str(url), str(url.with_query(None).with_fragment(None)))
    for mark, part in (
        ("?", url.raw_query_string),
        ("?", url.query_string),
        ("#", url.raw_fragment),
        ("#", url.fragment),
    ):
        if part:
            text = text.replace(mark + part, mark + "…")
    return text


class WebhookSender:
    """Sends webhook attempts over one aiohttp session (made in ``start`` or by the first
    ``send``, closed by ``aclose``)."""

    def __init__(
        self,
        secrets: WebhookSecrets,
        timeout: float,
        *,
        clock: Callable[[], float] = time.time,
        user_agent: str = USER_AGENT,
    ) -> None:
        self._secrets = secrets
        self._timeout = timeout  # seconds for one attempt, connecting and answering
        self._clock = clock
        self._user_agent = user_agent
        self._guard: ContextVar[_Guard | None] = ContextVar("webhook_guard", default=None)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                resolver=_CheckingResolver(self._guard),
                # No DNS cache: a cached answer was checked under another key's rule.
                use_dns_cache=False,
                # No kept-alive connections: the pool is keyed by host and port, not by the
                # key's rule, so a connection one key was allowed to open could carry another
                # key's delivery to an address that key may not reach.
                force_close=True,
                limit=0,  # the delivery loop bounds concurrency
            )
            # trust_env False (the default, named for the reader): an HTTP(S)_PROXY would look
            # the host up itself, past the resolver's check.
            self._session = aiohttp.ClientSession(
                connector=connector, trust_env=False, auto_decompress=False
            )

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def send(self, url: str, hosts: WebhookHosts, msg_id: str, body: bytes) -> Attempt:
        """One signed POST of ``body`` to ``url``; ``msg_id`` is the ``webhook-id``, the same
        for every attempt of one message (the receiver's idempotency key)."""
        at = self._clock()
        started = time.monotonic()

        def attempt(
            status: int | None,
            error: str | None,
            retry_after: float | None = None,
            *,
            gone: bool = False,
            refused: bool = False,
        ) -> Attempt:
            duration = (time.monotonic() - started) * 1000
            return Attempt(at, status, error, retry_after, duration, gone, refused)

        problem = hosts.check_url(url)
        if problem is not None:
            return attempt(None, problem, refused=True)
        parsed = URL(url)  # the same parse check_url made: the host checked is the one called
        host = (parsed.raw_host or "").lower().removesuffix(".")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        timestamp = int(at)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": self._user_agent,
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": self._secrets.sign(msg_id, timestamp, body),
        }
        await self.start()
        session = self._session
        assert session is not None
        timeout = self._timeout
        token = self._guard.set(_Guard(hosts, host, port))
        try:
            async with session.post(
                parsed,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                status = response.status
                retry_after = parse_retry_after(response.headers.get("Retry-After"), self._clock())
                await _drain(response)
        except TimeoutError:
            return attempt(None, f"no answer within {timeout:g} s")
        except aiohttp.ClientError as exc:
            refusal = _refusal(exc)
            if refusal is not None:
                return attempt(None, str(refusal))
            return attempt(None, _without_query(_describe(exc), parsed))
        except OSError as exc:
            refusal = _refusal(exc)
            text = str(refusal) if refusal is not None else f"connection failed: {exc}"
            return attempt(None, _without_query(text, parsed))
        finally:
            self._guard.reset(token)
        error = None
        if 300 <= status < 400:
            error = "redirects are not followed; give the webhook's final URL"
        return attempt(status, error, retry_after=retry_after, gone=status == 410)


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read and drop at most ``MAX_RESPONSE_BYTES`` of the answer. The status is what counts;
    a receiver that stalls or breaks off while sending its body has answered all the same."""
    remaining = MAX_RESPONSE_BYTES
    try:
        while remaining > 0:
            chunk = await response.content.read(remaining)
            if not chunk:
                return
            remaining -= len(chunk)
    except (aiohttp.ClientError, OSError, TimeoutError):
        return


def _describe(exc: aiohttp.ClientError) -> str:
    """A one-line reason for a failed connection or exchange (never a traceback)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate not accepted: {exc.certificate_error}"
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS handshake failed: {exc.os_error}"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve the host: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the receiver closed the connection without answering"
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return f"malformed answer: {type(exc).__name__}"
    return f"{type(exc).__name__}: {exc}"
