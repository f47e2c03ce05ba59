"""The relay: one upstream exchange, the upstream's bytes out as they arrive, then settlement.

It writes ASGI messages itself: Starlette's ``StreamingResponse`` costs more than the whole relay
(docs/design.md §5). The relayed bytes are the upstream's, with two exceptions: a body
``rewrite`` makes for the caller (the model list, a model retrieved through an alias), and an
error body that quotes an upstream secret, masked (``held_bodies.py``).

Once the response head has gone to the client nothing is retried or hidden: a failure after it
cuts the response (the server drops the connection), so the client sees an error, never a clean
end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway import errors
from gateway.context import RequestContext
from gateway.http.decoding import decoded_body
from gateway.http.headers import downstream_response_headers
from gateway.limits import RATELIMIT_HEADERS
from gateway.openai import models_list
from gateway.openai.usage import Usage, UsageTap, usage_tap
from gateway.pipeline.dispatch import Dispatch
from gateway.pipeline.failover import Answer, Unanswered, failure_kind, first_answer
from gateway.pipeline.held_bodies import ERROR_BODY_BYTES, hold_body, masked_error_body
from gateway.pipeline.model_rules import Rewrite
from gateway.pipeline.settlement import Settlement
from gateway.types import RawHeaders, Receive, Send
from gateway.upstream.seam import UpstreamResponse, UpstreamStreamError

logger = logging.getLogger("gateway.relay")

# The disconnect watcher starts only once an exchange has run this long: most non-streaming
# answers finish sooner and never pay for a task, while a long generation is still cancelled
# well within a second of the client leaving.
WATCH_AFTER_SECONDS = 0.05

# Names the target that served a response (``server.target_header``): its label, never its URL.
TARGET_HEADER = b"x-gateway-target"

# The representation changed: the upstream's coding, length and validator describe another one
# (RFC 9110 §8.8.3).
_REWRITTEN_DROPS = frozenset({b"content-encoding", b"content-length", b"etag"})


class StreamGauge(Protocol):
    """Counts the event streams being relayed (the metrics' open-streams gauge)."""

    def stream_opened(self) -> None: ...

    def stream_closed(self) -> None: ...


@dataclass(slots=True)
class _Exchange:
    """What the disconnect watcher and the relay share for one request."""

    task: asyncio.Task[Any] | None
    finished: bool = False
    client_gone: bool = False
    watcher: asyncio.Task[None] | None = None

    def start_watching(self, receive: Receive) -> None:
        if not self.finished:
            self.watcher = asyncio.ensure_future(_watch_disconnect(receive, self))

    def stop_watching(self, timer: asyncio.TimerHandle) -> None:
        self.finished = True
        timer.cancel()
        if self.watcher is not None:
            self.watcher.cancel()


async def _watch_disconnect(receive: Receive, exchange: _Exchange) -> None:
    """Cancel the relay when the client goes away, even while the upstream is silent.

    Without this, a client that closes a paced stream would keep the upstream generating (and
    billing) until the next chunk failed to send (docs/design.md §3: cancel promptly)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not exchange.finished and exchange.task is not None:
                exchange.client_gone = True
                exchange.task.cancel()
            return


async def exchange(
    context: RequestContext,
    receive: Receive,
    send: Send,
    dispatch: Dispatch,
    extra: RawHeaders,
    settlement: Settlement | None,
    rewrite: Rewrite | None = None,
    streams: StreamGauge | None = None,
    read_usage: bool = False,
) -> None:
    """Send the request (``failover.first_answer``: retries and failover happen there, before
    anything is relayed) and relay the answer; settle the limits and accounts once, however the
    exchange ended, a client that left included. The response's token usage is read when the
    settlement needs it (a token limit, usage accounting, a budget), or when ``read_usage``
    asks (for the metrics)."""
    watch = _Exchange(task=asyncio.current_task())
    timer = asyncio.get_running_loop().call_later(
        WATCH_AFTER_SECONDS, watch.start_watching, receive
    )
    answer: Answer | None = None
    tap: UsageTap | None = None
    complete = False
    unanswered = False  # the upstream failed before its response: it used no tokens
    strip_ratelimit = settlement is not None and settlement.limited
    started = time.perf_counter()
    try:
        try:
            answer = await first_answer(dispatch, context)
        except Unanswered as failed:
            unanswered = True
            context.upstream_error = failure_kind(failed.error)
            target = failed.target
            context.upstream = target.name
            if dispatch.target_header:
                extra = [*extra, (TARGET_HEADER, target.label_bytes)]
            await _upstream_refusal(context.upstream_error, target.name).send(send, extra)
        else:
            response = answer.response
            target = answer.target
            context.upstream = target.name
            context.upstream_seconds = time.perf_counter() - answer.sent_at
            if dispatch.target_header:
                extra = [*extra, (TARGET_HEADER, target.label_bytes)]
            if read_usage or (settlement is not None and settlement.reads_usage):
                tap = usage_tap(response.raw_headers)
            secrets = answer.step.group.secrets
            if rewrite is not None and response.status == 200:
                complete = await _relay_rewritten(
                    context, send, response, extra, tap, rewrite, strip_ratelimit, secrets
                )
            else:
                complete = await _relay(
                    context,
                    send,
                    response,
                    extra,
                    tap,
                    strip_ratelimit,
                    secrets,
                    answer.sent_at,
                    streams,
                )
    except asyncio.CancelledError:
        if not watch.client_gone:
            raise
        # The client left: drop the upstream connection so the upstream stops generating.
        asyncio.current_task().uncancel()  # type: ignore[union-attr]
        context.client_gone = True
    finally:
        context.upstream_total_seconds = time.perf_counter() - started
        if context.event_stream and streams is not None:
            streams.stream_closed()
        watch.stop_watching(timer)
        if answer is not None:
            if complete:
                answer.response.release()
            else:
                answer.response.close()
            answer.finish(complete, context.client_gone)
    usage = _record_usage(context, tap)
    if settlement is not None:
        # The upstream failed or refused (and reported no usage): it generated nothing, so
        # the reservations are refunded rather than kept.
        refunded = unanswered or (answer is not None and answer.response.status >= 400)
        # Every ending gets here, a client disconnect included (docs/design.md §3); the
        # response is already complete, so settling inline delays nobody. Charged once per
        # client request, however many attempts it took.
        await settlement.settle(context, usage, refunded)


def _record_usage(context: RequestContext, tap: UsageTap | None) -> Usage | None:
    """The response's final usage: a request is charged its input (prompt-cache reads and
    writes included) plus output tokens, as ``Usage.total_tokens`` counts them.

    ``None`` when there is no final count: no usage was read, or the response ended before it
    (a client that left, an upstream that failed mid-stream). The reservation then stands,
    since the upstream generated until it was cancelled and nothing says how far; only an
    upstream that never answered, or answered with an error status, has it refunded."""
    usage = tap.finish() if tap is not None else None
    if usage is None:
        return None
    context.tokens_in = usage.input_tokens
    context.tokens_out = usage.output_tokens
    return usage


async def _relay(
    context: RequestContext,
    send: Send,
    response: UpstreamResponse,
    extra: RawHeaders,
    tap: UsageTap | None,
    strip_ratelimit: bool,
    secrets: Sequence[bytes],
    started: float,
    streams: StreamGauge | None,
) -> bool:
    """Forward the head, then each raw chunk the moment it arrives. True if it completed.

    ``started`` is when the request was sent upstream (for the time to the first chunk).

    The usage tap reads the same chunk objects; it never changes or delays them. One exception
    to "the moment it arrives": when the upstream has ``secrets``, the body of a non-streamed
    error is held first (up to ``ERROR_BODY_BYTES``) so that a credential it quotes can be
    masked before anything is sent."""
    headers, event_stream = downstream_response_headers(
        response.raw_headers,
        extra,
        # The upstream's x-ratelimit-* describe the gateway's own upstream key; the caller's
        # limits replace them.
        drop=RATELIMIT_HEADERS if strip_ratelimit else frozenset(),
        secrets=secrets,
        keep_length=True,
    )
    if event_stream:
        context.event_stream = True
        if streams is not None:
            streams.stream_opened()  # closed by ``exchange`` however the relay ends
    status = response.status
    read = response.read_chunk
    sent = 0
    held: Sequence[bytes] = ()
    complete = False
    if secrets and status >= 400 and not event_stream:
        try:
            held, complete = await hold_body(read, tap, ERROR_BODY_BYTES)
        except UpstreamStreamError as exc:
            # Cut before it could be inspected: the head, none of the body, a cut stream.
            await send({"type": "http.response.start", "status": status, "headers": headers})
            return _cut(context, exc, sent)
        masked = masked_error_body(held, headers, secrets) if complete else None
        if masked is not None:
            headers, held = masked
            logger.warning(
                "upstream '%s' quoted its credentials in a %d response; masked",
                context.upstream,
                status,
            )
    await send({"type": "http.response.start", "status": status, "headers": headers})
    for chunk in held:
        sent += len(chunk)
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    while not complete:
        try:
            chunk = await read()
        except UpstreamStreamError as exc:
            return _cut(context, exc, sent)
        if not chunk:
            break
        if not sent:
            context.first_chunk_seconds = time.perf_counter() - started
        sent += len(chunk)
        if tap is not None:
            tap.feed(chunk)
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    context.bytes_sent = sent
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return True


async def _relay_rewritten(
    context: RequestContext,
    send: Send,
    response: UpstreamResponse,
    extra: RawHeaders,
    tap: UsageTap | None,
    rewrite: Rewrite,
    strip_ratelimit: bool,
    secrets: Sequence[bytes],
) -> bool:
    """Send the body ``rewrite`` makes of the upstream's whole successful body (the model list
    for the caller, a model retrieved through an alias). True if the upstream's body was read
    to its end.

    The body is read whole, up to ``models_list.MAX_BODY_BYTES`` before and after inflating
    (gzip and deflate: the codings the gateway asks for), and goes out decoded with its own
    ``Content-Length``. One that cannot be read or is not what ``rewrite`` expects is a 502: a
    list the gateway could not filter would show the caller models it may not use."""
    headers, _ = downstream_response_headers(
        response.raw_headers,
        extra,
        drop=RATELIMIT_HEADERS if strip_ratelimit else frozenset(),
        secrets=secrets,
    )
    limit = models_list.MAX_BODY_BYTES
    try:
        held, complete = await hold_body(response.read_chunk, tap, limit)
    except UpstreamStreamError as exc:
        context.upstream_error = "stream"
        upstream = context.upstream or ""
        logger.warning(
            "upstream '%s' failed while its model list was read (request %s): %s",
            upstream,
            context.request_id,
            exc,
        )
        await errors.upstream_failed(upstream).send(send, extra)
        return False
    plain = decoded_body(b"".join(held), headers, limit) if complete else None
    body = rewrite(plain) if plain is not None else None
    if body is None:
        await errors.unreadable_model_list(context.upstream or "").send(send, extra)
        return complete
    headers = [(n, v) for n, v in headers if n not in _REWRITTEN_DROPS]
    headers.append((b"content-length", str(len(body)).encode("ascii")))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
    context.bytes_sent = len(body)
    return True


def _cut(context: RequestContext, exc: UpstreamStreamError, sent: int) -> bool:
    """The upstream failed after the head: returns False, the relay did not complete.

    The status cannot change any more. Returning without the final message makes the server
    drop the connection: the client sees a cut stream, never a clean end."""
    context.upstream_error = "stream"
    context.bytes_sent = sent
    logger.warning(
        "upstream failed mid-response after %d bytes (request %s): %s",
        sent,
        context.request_id,
        exc,
    )
    return False


def _upstream_refusal(kind: str, upstream: str) -> errors.GatewayError:
    """The answer to a failure of ``kind`` (``_failure_kind``) before the response head."""
    if kind == "timeout":
        return errors.upstream_timeout(upstream)
    if kind == "connect":
        return errors.upstream_unreachable(upstream)
    return errors.upstream_failed(upstream)
