"""The deterministic OpenAI-compatible ASGI app: routing, misbehaviour, disconnects."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import gzip
import itertools
import logging
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from tests.support.fakeupstream.bodies import (
    MODELS,
    OPENAI_HEADERS,
    BadRequest,
    _chat_body,
    _chat_events,
    _completion_body,
    _completion_events,
    _message_body,
    _message_events,
    _response_body,
    _response_events,
    _stream,
    chat_inputs,
    completion_inputs,
    embeddings_body,
    error_body,
    file_object_body,
    message_inputs,
    model_body,
    models_body,
    pad_body,
    response_inputs,
    status_error_body,
    transcription_body,
)
from tests.support.fakeupstream.controls import NO_CONTROLS, Controls, parse_controls
from tests.support.fakeupstream.record import RecordedRequest, RequestLog

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
RawHeaders = list[tuple[bytes, bytes]]

_JSON = b"application/json"
_SSE = b"text/event-stream; charset=utf-8"
_CACHE_LIMIT = 512  # entries per cache of rendered bodies
_CACHEABLE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    body: bytes = b""
    events: tuple[bytes, ...] | None = None  # a stream, sent one event per body message
    headers: tuple[tuple[bytes, bytes], ...] = ()


def _bad_request(exc: BadRequest) -> _Reply:
    return _Reply(400, error_body(exc.message, param=exc.param))


def _not_found(method: str, path: str) -> _Reply:
    return _Reply(404, error_body(f"Invalid URL ({method} {path})"))


_INVALID_JSON: Final = _Reply(
    400,
    error_body(
        "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
        "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
        "sent was not valid JSON.)"
    ),
)


_SHUTTING_DOWN: Final = _Reply(
    503,
    error_body("The fake upstream is shutting down.", "server_error"),
    headers=((b"connection", b"close"),),
)


class _Stopped(Exception):
    """A wait ended because the client disconnected or the server is closing."""


class AbortConnection(Exception):
    """Raised inside the app after the response started: uvicorn then drops the connection.

    uvicorn logs every exception escaping an app with its traceback; ``quiet_deliberate_aborts``
    filters exactly these records out, so a failure test does not print a traceback storm.
    """


class _QuietAborts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], AbortConnection))


def quiet_deliberate_aborts() -> None:
    """Drop uvicorn's error records for ``AbortConnection`` (idempotent; others still log)."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietAborts) for f in logger.filters):
        logger.addFilter(_QuietAborts())


@dataclass(slots=True)
class _Exchange:
    """One request's state while the app answers it."""

    request_id: bytes
    record: RecordedRequest | None
    stop: asyncio.Event | None = None  # set on client disconnect or server close
    started: bool = False
    finished: bool = False
    disconnected: bool = False


class FakeUpstreamApp:
    """The deterministic OpenAI-compatible ASGI app.

    State lives on the instance: the request log, the ``x-request-id`` counter, caches of
    rendered bodies and the events that release waiting requests when the server closes.
    """

    def __init__(self, *, record: bool = True, models: Sequence[str] = MODELS) -> None:
        self.log = RequestLog()
        self.record = record
        self.models = tuple(models)
        self._sequence = itertools.count(1)
        self._bodies: dict[tuple[Any, ...], bytes] = {}
        self._streams: dict[tuple[Any, ...], tuple[bytes, ...]] = {}
        self._gzipped: dict[bytes, bytes] = {}
        self._waiting: set[asyncio.Event] = set()
        self._closing = False
        self._script_lock = threading.Lock()
        self._scripts: collections.deque[Controls] = collections.deque()
        self._standing: Controls | None = None
        self._models_body = models_body(self.models)
        self._post: dict[str, Callable[[dict[str, Any], Controls], _Reply]] = {
            "/v1/chat/completions": self._chat,
            "/v1/completions": self._completions,
            "/v1/embeddings": self._embeddings,
            "/v1/responses": self._responses,
            "/v1/messages": self._messages,
        }

    # Behaviour set by the test rather than by the request's headers

    def script(self, *plan: Controls) -> None:
        """The next ``len(plan)`` requests behave as ``plan`` says, in order (after any plan
        still queued), whatever their ``x-fake-*`` headers: the way to make one server of
        several fail when a gateway sends them all the same request. Thread-safe."""
        with self._script_lock:
            self._scripts.extend(plan)

    def behave(self, controls: Controls | None) -> None:
        """Every request once the script is used up behaves as ``controls`` (None: as its
        headers say, the default). Thread-safe."""
        with self._script_lock:
            self._standing = controls

    def unscript(self) -> None:
        """Forget the queued script and the standing behaviour."""
        with self._script_lock:
            self._scripts.clear()
            self._standing = None

    def _scripted(self) -> Controls | None:
        with self._script_lock:
            if self._scripts:
                return self._scripts.popleft()
            return self._standing

    def close(self) -> None:
        """Release every waiting request, now and from now on; call on the server's loop."""
        self._closing = True
        for stop in self._waiting:
            stop.set()

    def reopen(self) -> None:
        """Let requests wait again (before the app is served anew after ``close()``)."""
        self._closing = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off and websockets are not served
        received_at = time.monotonic()
        body, gone = await _read_body(receive)
        request_id = b"req_fake_%d" % next(self._sequence)
        record = None
        if self.record:
            raw_path = scope.get("raw_path")
            record = RecordedRequest(
                request_id=request_id.decode(),
                method=scope["method"],
                path=raw_path.decode("latin-1") if raw_path else scope["path"],
                query_string=scope["query_string"].decode("latin-1"),
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
                body=body,
                received_at=received_at,
            )
            self.log.append(record)
        exchange = _Exchange(request_id, record)
        if gone:
            if record is not None:
                self.log.mark_disconnected(record)
            return
        scripted = self._scripted() if self._scripts or self._standing is not None else None
        try:
            controls = parse_controls(scope["headers"]) if scripted is None else scripted
        except BadRequest as exc:
            controls, reply = NO_CONTROLS, _bad_request(exc)
        else:
            reply = self._route(scope, body, controls)
        await self._respond(reply, controls, exchange, receive, send)

    # Routing and endpoints

    def _route(self, scope: Scope, body: bytes, controls: Controls) -> _Reply:
        if controls.status is not None:
            status = controls.status
            after = controls.retry_after
            if after is None and status == 429:
                after = 0
            extra = ((b"retry-after", b"%d" % after),) if after is not None else ()
            return _Reply(status, status_error_body(status, controls.error_code), headers=extra)
        method, path = scope["method"], scope["path"]
        if (endpoint := self._post.get(path)) is not None:
            if method != "POST":
                return _not_found(method, path)
            try:
                request = orjson.loads(body)
            except orjson.JSONDecodeError:
                return _INVALID_JSON
            if not isinstance(request, dict):
                return _INVALID_JSON
            try:
                reply = endpoint(request, controls)
            except BadRequest as exc:
                return _bad_request(exc)
        elif path == "/v1/echo" or path.startswith("/v1/echo/"):
            reply = _Reply(200, self._echo(scope, body))
        elif path == "/v1/audio/transcriptions" and method == "POST":
            reply = _Reply(200, transcription_body())
        elif path == "/v1/files" and method == "POST":
            reply = _Reply(200, file_object_body(len(body)))
        elif path == "/v1/models" and method == "GET":
            reply = _Reply(200, self._models_body)
        elif path.startswith("/v1/models/") and method == "GET":
            model = path.removeprefix("/v1/models/")
            if model not in self.models:
                message = f"The model '{model}' does not exist"
                return _Reply(404, error_body(message, param="model", code="model_not_found"))
            reply = _Reply(200, model_body(model))
        else:
            return _not_found(method, path)
        if controls.min_bytes and reply.events is None:
            reply = dataclasses.replace(reply, body=pad_body(reply.body, controls.min_bytes))
        return reply

    def _cached_body(self, kind: str, render: Callable[..., bytes], *args: Any) -> bytes:
        key = (kind, *args)
        body = self._bodies.get(key)
        if body is None:
            if len(self._bodies) >= _CACHE_LIMIT:
                self._bodies.clear()
            body = self._bodies[key] = render(*args)
        return body

    def _cached_events(
        self, kind: str, render: Callable[..., tuple[bytes, ...]], *args: Any
    ) -> tuple[bytes, ...]:
        key = (kind, *args)
        events = self._streams.get(key)
        if events is None:
            if len(self._streams) >= _CACHE_LIMIT:
                self._streams.clear()
            events = self._streams[key] = render(*args)
        return events

    def _chat(self, request: dict[str, Any], controls: Controls) -> _Reply:
        model, prompt = chat_inputs(request)
        n = controls.chunks
        stream, usage = _stream(request)
        cached = controls.cached_tokens
        if stream:
            events = self._cached_events("chat", _chat_events, model, prompt, n, usage, cached)
            return _Reply(200, events=events)
        return _Reply(200, self._cached_body("chat", _chat_body, model, prompt, n, cached))

    def _completions(self, request: dict[str, Any], controls: Controls) -> _Reply:
        model, prompt = completion_inputs(request)
        n = controls.chunks
        stream, usage = _stream(request)
        if stream:
            events = self._cached_events("text", _completion_events, model, prompt, n, usage)
            return _Reply(200, events=events)
        return _Reply(200, self._cached_body("text", _completion_body, model, prompt, n))

    def _embeddings(self, request: dict[str, Any], controls: Controls) -> _Reply:
        return _Reply(200, embeddings_body(request))

    def _responses(self, request: dict[str, Any], controls: Controls) -> _Reply:
        model, prompt = response_inputs(request)
        n = controls.chunks
        if request.get("stream") is True:
            return _Reply(
                200, events=self._cached_events("resp", _response_events, model, prompt, n)
            )
        return _Reply(200, self._cached_body("resp", _response_body, model, prompt, n))

    def _messages(self, request: dict[str, Any], controls: Controls) -> _Reply:
        model, prompt, cached = message_inputs(request)
        n = controls.chunks
        if request.get("stream") is True:
            events = self._cached_events("msg", _message_events, model, prompt, cached, n)
            return _Reply(200, events=events)
        return _Reply(200, self._cached_body("msg", _message_body, model, prompt, cached, n))

    def _echo(self, scope: Scope, body: bytes) -> bytes:
        raw_path = scope.get("raw_path")
        return orjson.dumps(
            {
                "method": scope["method"],
                "path": raw_path.decode("latin-1") if raw_path else scope["path"],
                "query": scope["query_string"].decode("latin-1"),
                "headers": [
                    [k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]
                ],
                "body": body.decode("utf-8", "replace"),
            }
        )

    # Sending

    def _gzip(self, body: bytes) -> bytes:
        compressed = self._gzipped.get(body)
        if compressed is None:
            compressed = gzip.compress(body, mtime=0)  # mtime=0: the same bytes every time
            if len(body) <= _CACHEABLE_BYTES:
                if len(self._gzipped) >= _CACHE_LIMIT:
                    self._gzipped.clear()
                self._gzipped[body] = compressed
        return compressed

    def _start(
        self, reply: _Reply, controls: Controls, exchange: _Exchange, length: int | None
    ) -> Message:
        headers: RawHeaders = [(b"content-type", _SSE if reply.events is not None else _JSON)]
        if length is not None:
            headers.append((b"content-length", b"%d" % length))
        if controls.gzip:
            headers.append((b"content-encoding", b"gzip"))
        headers.append((b"x-request-id", exchange.request_id))
        headers.append((b"openai-processing-ms", b"%d" % round(controls.delay * 1000)))
        headers.extend(OPENAI_HEADERS)
        headers.extend(reply.headers)
        return {"type": "http.response.start", "status": reply.status, "headers": headers}

    def _finishing(self, exchange: _Exchange) -> None:
        exchange.finished = True
        if exchange.record is not None:
            self.log.mark_completed(exchange.record)

    async def _respond(
        self, reply: _Reply, controls: Controls, exchange: _Exchange, receive: Receive, send: Send
    ) -> None:
        if reply.events is None and not controls.waits:
            # The hot path: one start and one body message, no watcher task.
            await self._send_whole(reply, controls, exchange, send)
            return
        exchange.stop = stop = asyncio.Event()
        if self._closing:
            stop.set()
        self._waiting.add(stop)
        watcher = asyncio.create_task(self._watch(receive, exchange))
        try:
            await self._play(reply, controls, exchange, send)
        except _Stopped:
            if exchange.disconnected:
                return  # nobody is listening; uvicorn expects nothing more
            if exchange.started:
                raise AbortConnection("the fake upstream is shutting down") from None
            length = len(_SHUTTING_DOWN.body)
            await send(self._start(_SHUTTING_DOWN, NO_CONTROLS, exchange, length))
            await send({"type": "http.response.body", "body": _SHUTTING_DOWN.body})
        finally:
            self._waiting.discard(stop)
            watcher.cancel()

    async def _watch(self, receive: Receive, exchange: _Exchange) -> None:
        """Wait for ``http.disconnect``; if the response had not finished, record it."""
        while (await receive())["type"] != "http.disconnect":
            pass
        if not exchange.finished:
            exchange.disconnected = True
            if exchange.record is not None:
                self.log.mark_disconnected(exchange.record)
            assert exchange.stop is not None
            exchange.stop.set()

    async def _pause(self, seconds: float, stop: asyncio.Event) -> None:
        if not stop.is_set():
            try:
                async with asyncio.timeout(seconds):
                    await stop.wait()
            except TimeoutError:
                return
        raise _Stopped

    async def _play(
        self, reply: _Reply, controls: Controls, exchange: _Exchange, send: Send
    ) -> None:
        stop = exchange.stop
        assert stop is not None
        if controls.delay:
            await self._pause(controls.delay, stop)
        if controls.hang:
            await stop.wait()
            raise _Stopped
        if reply.events is None:
            await self._send_whole(reply, controls, exchange, send)
            return
        exchange.started = True
        await send(self._start(reply, controls, exchange, None))
        await self._stream(reply.events, controls, exchange, send)
        if controls.cut is not None:
            await self._after_cut(controls, exchange)

    async def _send_whole(
        self, reply: _Reply, controls: Controls, exchange: _Exchange, send: Send
    ) -> None:
        """Send a non-stream reply, or only its first bytes when told to cut it short."""
        body = self._gzip(reply.body) if controls.gzip else reply.body
        exchange.started = True
        await send(self._start(reply, controls, exchange, len(body)))
        if controls.cut is None:
            self._finishing(exchange)
            await send({"type": "http.response.body", "body": body})
            return
        part = body[: max(0, min(controls.cut, len(body) - 1))]  # never all: it must be short
        await send({"type": "http.response.body", "body": part, "more_body": True})
        await self._after_cut(controls, exchange)

    async def _after_cut(self, controls: Controls, exchange: _Exchange) -> None:
        if controls.hang_after is not None:
            assert exchange.stop is not None  # hang-after is a wait: it took the watched path
            await exchange.stop.wait()
            raise _Stopped
        raise AbortConnection(f"x-fake-fail-after: {controls.fail_after}")

    async def _stream(
        self,
        events: tuple[bytes, ...],
        controls: Controls,
        exchange: _Exchange,
        send: Send,
    ) -> None:
        stop = exchange.stop
        assert stop is not None
        cut = controls.cut
        compressor = zlib.compressobj(wbits=31) if controls.gzip else None
        count = len(events) if cut is None else min(cut, len(events))
        for i in range(count):
            if i and controls.interval:
                await self._pause(controls.interval, stop)
            elif stop.is_set():
                raise _Stopped
            event = events[i]
            last = cut is None and i == count - 1
            if compressor is not None:
                flush = zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH
                event = compressor.compress(event) + compressor.flush(flush)
            if last:
                self._finishing(exchange)
            await send({"type": "http.response.body", "body": event, "more_body": not last})


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The whole request body, and whether the client disconnected while sending it."""
    message = await receive()
    if message["type"] == "http.disconnect":
        return b"", True
    body = message.get("body", b"")
    if not message.get("more_body", False):
        return body, False
    parts = [body]
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(parts), True
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts), False
