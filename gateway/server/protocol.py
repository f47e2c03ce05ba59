"""The HTTP/1.1 server protocol: uvicorn's httptools protocol with the caps a public server needs.

uvicorn's own protocol has no cap on the request head and no deadline for a slow client: a
64 MB header took seconds of CPU (httptools joins header fragments by copying, so the cost grows
faster than linearly), idle and half-sent connections stayed open for good, and its errors are
plain text. This subclass, chosen with ``uvicorn.run(http=GatewayProtocol)``, adds:

- **Size caps on the head** (RFC 9110 §15.5.15 and RFC 6585 §5): a request target over
  ``max_request_line_bytes`` gets 414, a header field over ``max_header_line_bytes``, more than
  ``max_header_fields`` fields, or a head over ``max_head_bytes`` get 431. Bytes are counted as
  they arrive, before httptools joins them, so the work done for one head is bounded whatever
  the client sends.
- **Deadlines:** a whole head within ``header_timeout`` (from the connection's start, or from
  the first byte of a later request on a kept-alive connection); inside a body, no silence
  longer than ``body_idle_timeout`` and no slower than ``body_min_rate`` after ``body_timeout``
  (after Apache's ``mod_reqtimeout``). Time the application spends not reading (back-pressure)
  is never held against the client.
- **A cap on open connections** per process (``max_open``): beyond it a new connection gets
  503 at once instead of waiting in a queue it cannot leave.
- **Errors in OpenAI's shape**: a malformed request (framing, chunk sizes, characters the
  target may not hold) gets a JSON 400 instead of uvicorn's plain text, and a WebSocket upgrade
  a JSON 400 (the gateway relays HTTP APIs only). Where a response has already begun there is
  no room for a status: the connection is closed.

After any refusal the connection is closed gracefully: the response is written, the write side
shut down, and what the client still sends is read and dropped for a short while, so its
kernel does not turn our close into a reset that destroys the response before it is read
(the "lingering close" of RFC 9112 §9.6). Nothing it sends is kept.
"""

from __future__ import annotations

import asyncio
import http
import logging
from typing import Any

import httptools
from uvicorn._types import ASGI3Application
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from gateway import errors
from gateway.config.model import ConnectionSettings
from gateway.server.stats import ConnectionStats

logger = logging.getLogger("gateway.server")

# How long, and how much, a refused connection is drained before it is closed for good.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024
# How often a body in progress is checked against its deadlines, at most.
BODY_CHECK_SECONDS = 1.0
# Requests a client may pipeline behind one still being answered. Each queued head holds memory
# until its turn; clients that pipeline at all send a few.
MAX_PIPELINED = 16
# Bytes of chunked framing allowed per chunk (size line and CRLFs), beyond the head's own cap.
CHUNK_FRAMING_BYTES = 32


class _Refusal(Exception):
    """Raised inside a parser callback to stop parsing and answer with ``error``."""

    def __init__(self, error: errors.GatewayError, counter: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.counter = counter


def render(error: errors.GatewayError) -> bytes:
    """``error`` as a whole HTTP/1.1 response that closes the connection."""
    body = error.body()
    phrase = http.HTTPStatus(error.status).phrase
    lines = [
        f"HTTP/1.1 {error.status} {phrase}".encode(),
        b"content-type: application/json",
        b"content-length: " + str(len(body)).encode(),
        b"connection: close",
        *(name + b": " + value for name, value in error.headers),
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class GatewayProtocol(HttpToolsProtocol):
    """One client connection. Settings and counters come from the application when it offers
    them (``Gateway.connection_settings`` and ``connection_stats``); uvicorn builds the protocol
    with its own arguments only, and this is the one object both can reach."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        settings = _from_app(self.app, "connection_settings")
        stats = _from_app(self.app, "connection_stats")
        self._settings: ConnectionSettings = settings or ConnectionSettings()
        self._stats: ConnectionStats = stats or ConnectionStats()
        self._refused = False
        # The request head being received: callbacks count what httptools hands over, and
        # data_received counts raw bytes while a head is incomplete (a field still being joined
        # never reaches a callback).
        self._awaiting_head = True
        self._head_began = False  # a message began in the chunk being parsed
        self._head_raw = 0
        self._head_parsed = 0
        self._fields = 0
        self._head_timer: asyncio.TimerHandle | None = None
        # The request body being received.
        self._in_body = False
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_deadline = 0.0  # before extensions earned by bytes received
        self._body_bytes = 0
        self._body_started = 0.0  # when the body timer was armed
        self._body_checked = 0.0  # when the deadlines were last checked
        self._body_last = 0.0  # when body bytes last arrived (or reading was last paused)
        self._chunks = 0
        self._body_fed = 0  # body bytes httptools delivered during the current feed
        self._framing = 0  # bytes inside a body that were not body: chunk lines, trailers
        self._trailer = 0  # bytes of trailer fields
        self._linger: asyncio.TimerHandle | None = None
        self._drained = 0
        self._write_timer: asyncio.TimerHandle | None = None
        # The request whose response is being produced (uvicorn's ``self.cycle`` is the newest
        # one, which may be queued behind it when the client pipelines).
        self._active: RequestResponseCycle | None = None

    # Connection life

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._stats.opened += 1
        if len(self.connections) > self._settings.max_open:
            # Refused at once, without the drain other refusals get: under a flood of
            # connections, lingering ones would hold the very descriptors the cap protects.
            self._stats.refused_over_capacity += 1
            self._refused = True
            transport.write(render(errors.too_many_connections()))
            transport.close()
            return
        self._head_timer = self.loop.call_later(self._settings.header_timeout, self._head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        for timer in (self._linger, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._linger = self._write_timer = None
        super().connection_lost(exc)
        # uvicorn tells only the newest request; the one being answered and any queued behind
        # it must see the client gone too, or a silent upstream keeps generating for nobody.
        self._disconnect_all()

    def _disconnect_all(self) -> None:
        cycles = [self._active, self.cycle, *(cycle for cycle, _ in self.pipeline)]
        for cycle in cycles:
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        self._active = cycle
        super()._start_asgi_task(cycle, app)

    # A client that stops reading: its responses fill the socket's buffer and the relay waits
    # for room forever, holding an upstream connection (and the key's concurrency slot).

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(
                self._settings.write_stall_timeout, self._write_stalled
            )

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_stalled(self) -> None:
        self._write_timer = None
        if not self.transport.is_closing():
            self._stats.timeouts += 1
            self.transport.abort()  # connection_lost follows: every request sees the client gone

    def eof_received(self) -> None:
        if self._refused:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            # Draining before the close: dropped unread, and only so much of it.
            self._drained += len(data)
            if self._drained > LINGER_BYTES:
                self.transport.close()
            return
        self._unset_keepalive_if_required()
        self._head_began = False
        self._body_fed = 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # a non-WebSocket upgrade (h2c) served as HTTP/1.1: see on_headers_complete
        except httptools.HttpParserError as exc:
            refusal = exc.__context__
            if isinstance(refusal, _Refusal):
                setattr(self._stats, refusal.counter, getattr(self._stats, refusal.counter) + 1)
                self._refuse(refusal.error)
            else:
                self._stats.malformed += 1
                self._refuse(errors.malformed_request(_reason(exc)))
            return
        if self._awaiting_head:
            if self._head_timer is None:
                # A further request on a kept-alive connection has begun: its head is timed
                # from its first byte (uvicorn's keep-alive timer stopped at that byte).
                self._head_timer = self.loop.call_later(
                    self._settings.header_timeout, self._head_timeout
                )
            # Bytes of a head still incomplete. A head that began inside this chunk shares it
            # with the message before it, so its first chunk is counted by the callbacks alone:
            # at most one read's worth of slack.
            self._head_raw = 0 if self._head_began else self._head_raw + len(data)
            if max(self._head_raw, self._head_parsed) > self._settings.max_head_bytes:
                self._stats.head_too_large += 1
                limit = self._settings.max_head_bytes
                self._refuse(errors.head_too_large(f"over {limit} bytes in all"))
                return
        elif self._in_body:
            # What this read carried besides body bytes: chunk size lines, CRLFs and trailer
            # fields, which httptools joins before any callback can judge them. Bounded like a
            # head (RFC 9112 §7.1.2: trailers are a second header section).
            self._framing += len(data) - self._body_fed
            allowed = 2 * self._settings.max_head_bytes + CHUNK_FRAMING_BYTES * self._chunks
            if self._framing > allowed:
                self._stats.head_too_large += 1
                self._refuse(errors.head_too_large("chunked framing or trailer fields"))
                return
            if self._body_timer is None:
                # Most bodies arrive with their head; only one still arriving pays for a timer.
                now = self.loop.time()
                self._body_deadline = now + self._settings.body_timeout
                self._body_started = self._body_checked = now
                self._body_timer = self.loop.call_later(self._body_check_delay(), self._body_check)
        elif (
            self.timeout_keep_alive_task is None
            and self._head_timer is None
            and not self.pipeline
            and (self.cycle is None or self.cycle.response_complete)
        ):
            # Idle between requests, and this read began none (a stray CRLF, or the end of a
            # body after an early answer): uvicorn's keep-alive timer, stopped at the first
            # byte of the read, must run again or the connection would never close.
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting_head = True
        self._head_began = True
        self._head_raw = 0
        self._head_parsed = 0
        self._fields = 0

    def on_url(self, url: bytes) -> None:
        if len(self.url) + len(url) > self._settings.max_request_line_bytes:
            limit = self._settings.max_request_line_bytes
            raise _Refusal(errors.uri_too_long(limit), "uri_too_long")
        super().on_url(url)
        self._head_parsed += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._awaiting_head:
            # A trailer field of a chunked body. It arrives after the request was routed and
            # authenticated, so it is counted and dropped, never added to the headers (which
            # would let a client add headers the rules never saw).
            self._trailer += len(name) + len(value) + 4
            if self._trailer > self._settings.max_head_bytes:
                limit = self._settings.max_head_bytes
                raise _Refusal(
                    errors.head_too_large(f"trailer over {limit} bytes"), "head_too_large"
                )
            return
        self._fields += 1
        if self._fields > self._settings.max_header_fields:
            limit = self._settings.max_header_fields
            raise _Refusal(errors.head_too_large(f"more than {limit} fields"), "head_too_large")
        size = len(name) + len(value)
        if size > self._settings.max_header_line_bytes:
            limit = self._settings.max_header_line_bytes
            raise _Refusal(errors.head_too_large(f"a field over {limit} bytes"), "head_too_large")
        self._head_parsed += size + 4  # ": " and CRLF
        if self._head_parsed > self._settings.max_head_bytes:
            limit = self._settings.max_head_bytes
            raise _Refusal(errors.head_too_large(f"over {limit} bytes in all"), "head_too_large")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        upgrade = self._get_upgrade() if self.parser.should_upgrade() else None
        if upgrade == b"websocket":
            raise _Refusal(errors.websocket_not_supported(), "malformed")
        if upgrade is not None and _has_body(self.headers):
            # httptools stops parsing at an upgrade: the body would be lost, not relayed.
            raise _Refusal(errors.malformed_request("an upgrade request with a body"), "malformed")
        self._awaiting_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()
        self._in_body = True
        self._body_bytes = 0
        self._chunks = 0
        self._framing = 0
        self._trailer = 0
        if len(self.pipeline) > MAX_PIPELINED:
            raise _Refusal(errors.malformed_request("too many pipelined requests"), "malformed")
        if upgrade is not None:
            # Another protocol (h2c) is ignored, as RFC 9110 §7.8 allows: the request is
            # served as HTTP/1.1. httptools parses nothing after an upgrade request, so the
            # connection ends with this response.
            self.cycle.keep_alive = False

    def on_chunk_header(self) -> None:
        self._chunks += 1

    def on_body(self, body: bytes) -> None:
        self._body_fed += len(body)
        self._body_bytes += len(body)
        if self._body_timer is not None:
            self._body_last = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    # Deadlines

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._refused or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head dribbling in behind a response still being sent: there is no
            # room for a status, so the connection is closed.
            self._stats.timeouts += 1
            self.transport.close()
            return
        if self.cycle is None and not (self._head_began or self._head_raw or self._head_parsed):
            # A connection that never sent a byte: nothing to answer.
            self._stats.idle_closed += 1
            self.transport.close()
            return
        self._stats.timeouts += 1
        self._refuse(errors.request_timeout("request head"))

    def _body_check_delay(self) -> float:
        return min(BODY_CHECK_SECONDS, self._settings.body_idle_timeout)

    def _body_check(self) -> None:
        self._body_timer = None
        if not self._in_body or self._refused or self.transport.is_closing():
            return
        now = self.loop.time()
        settings = self._settings
        if self.flow.read_paused:
            # The application has not read what it holds (back-pressure): not the client's
            # fault, so its clocks stand still.
            self._body_deadline += now - self._body_checked
            self._body_last = now
        self._body_checked = now
        idle = now - max(self._body_last, self._body_started)
        # Capped like mod_reqtimeout's maximum: a fast burst must not buy hours of trickle.
        earned = min(
            self._body_bytes / settings.body_min_rate,
            settings.body_max_timeout - settings.body_timeout,
        )
        if idle >= settings.body_idle_timeout or now >= self._body_deadline + earned:
            self._stats.timeouts += 1
            self._refuse(errors.request_timeout("request body"))
            return
        self._body_timer = self.loop.call_later(self._body_check_delay(), self._body_check)

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    # Refusals

    def _refuse(self, error: errors.GatewayError) -> None:
        """Answer ``error`` if no response has begun, then close after a short drain."""
        self._refused = True
        self._cancel_timers()
        # The request the refusal is about: a new head's has no cycle yet; a body's is the
        # newest cycle. A status may be written only if no earlier response is still owed
        # (HTTP/1.1 answers in order) and this request's own response has not begun.
        current = None if self._awaiting_head else self.cycle
        active = self._active
        owed = active is not None and active is not current and not active.response_complete
        no_room = bool(self.pipeline) or owed or (current is not None and current.response_started)
        self._disconnect_all()
        if self.transport.is_closing():
            return
        if no_room:
            self.transport.close()
            return
        self.transport.write(render(error))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        # Keep reading (and dropping) so the response is not lost to a reset.
        self.flow.resume_reading()
        self._linger = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def send_400_response(self, msg: str) -> None:
        # uvicorn's own plain-text 400 path, should anything still reach it.
        self._refuse(errors.malformed_request(msg))


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


def _from_app(app: object, name: str) -> Any:
    """``name`` of the application, looked for through the middleware uvicorn may wrap around
    it (each keeps the next as ``.app``)."""
    for _ in range(4):
        value = getattr(app, name, None)
        if value is not None:
            return value
        app = getattr(app, "app", None)
        if app is None:
            break
    return None


def _reason(exc: httptools.HttpParserError) -> str:
    """llhttp's reason for a parse error (fixed texts, never the client's bytes)."""
    if isinstance(exc, httptools.HttpParserInvalidURLError):
        return "the request target contains a character it may not hold"
    if isinstance(exc, httptools.HttpParserCallbackError):
        return "the request head could not be read"
    text = str(exc).strip().rstrip(".")
    return text[:1].lower() + text[1:] if text else "the request could not be parsed"
