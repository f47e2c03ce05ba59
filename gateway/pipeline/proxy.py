"""The relay: one request in, one upstream exchange, the upstream's bytes out as they arrive.

``Proxy.__call__`` reads top to bottom as the algorithm (after Go's ``ReverseProxy.ServeHTTP``):
route, authenticate, read the body when a rule needs it, resolve the model (from a JSON body, a
form's ``model`` field, or a model named in the path), send upstream, relay. It writes ASGI
messages itself: Starlette's ``StreamingResponse`` costs more than the whole relay
(docs/design.md §5).
The relayed bytes are the upstream's, except for the model list (and a model retrieved through
an alias), rewritten for the caller (``models_list``), and an error body that quotes an upstream
secret, masked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import orjson

from gateway import errors
from gateway.auth import Principal
from gateway.http import body as request_body
from gateway.http import multipart
from gateway.http.headers import (
    INFLATABLE_CODINGS,
    downstream_response_headers,
    mask_secrets,
    upstream_request_headers,
)
from gateway.limits import RATELIMIT_HEADERS, Decision, Limiter, Plan
from gateway.limits.concurrency import ConcurrencyLimiter, Slot
from gateway.openai import models_list
from gateway.openai.tokens import estimate_tokens
from gateway.openai.usage import UsageTap
from gateway.routing import Match, MethodMismatch, PathVerdict, judge_path, relative_raw_path
from gateway.runtime import Runtime, UpstreamTarget
from gateway.types import Body, RawHeaders, Receive, Scope, Send
from gateway.upstream.seam import (
    OutboundRequest,
    UpstreamConnectError,
    UpstreamError,
    UpstreamResponse,
    UpstreamStreamError,
    UpstreamTimeout,
)

logger = logging.getLogger("gateway.pipeline.proxy")

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

# Turns the upstream's whole successful JSON body into the one sent to the client; None when
# the body is not what it expects (see ``models_list``).
_Rewrite = Callable[[bytes], bytes | None]


@dataclass(frozen=True, slots=True)
class _Admission:
    """An admitted request's limits: settled from the response's real usage when it ends."""

    limiter: Limiter
    decision: Decision


# The disconnect watcher starts only once an exchange has run this long: most non-streaming
# answers finish sooner and never pay for a task, while a long generation is still cancelled
# well within a second of the client leaving.
WATCH_AFTER_SECONDS = 0.05


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


class Proxy:
    """The ASGI app that serves every route of the current snapshot."""

    def __init__(
        self,
        runtime: Callable[[], Runtime],
        concurrency: ConcurrencyLimiter,
        bodies: request_body.BodyBudget,
    ) -> None:
        self._runtime = runtime
        # Both outlive config snapshots: what is in flight stays counted across a reload.
        self._concurrency = concurrency
        self._bodies = bodies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = self._runtime()  # one snapshot for the whole request
        headers: RawHeaders = scope["headers"]
        method: str = scope["method"]
        root_path: str = scope.get("root_path", "")
        path = relative_raw_path(scope.get("raw_path"), scope["path"], root_path)
        lease = self._bodies.lease()
        slot: Slot | None = None
        try:
            extra: RawHeaders = []
            try:
                # Judged by what the path means once decoded; what is forwarded is exactly the raw
                # path that was matched.
                verdict = judge_path(path)
                if verdict is PathVerdict.UNSAFE:
                    raise errors.unsafe_path()
                match = runtime.routes.match(method, path)
                if match is None:
                    raise errors.unknown_route(method, path)
                if isinstance(match, MethodMismatch):
                    raise errors.method_not_allowed(method, path, match.allowed)
                if verdict is PathVerdict.ENCODED_SLASH and not match.encoded_slashes_confined(
                    path
                ):
                    raise errors.unsafe_path()
                extra = self._endpoint_headers(match, root_path)
                route = match.endpoint.route
                scope["gateway.route"] = route.name

                principal = runtime.keys.authenticate(headers)
                scope["gateway.key"] = principal.name
                if not principal.may_use_route(route.name):
                    raise errors.route_not_allowed(route.name)

                caps = runtime.concurrency.get(principal.name)
                if caps is not None:
                    # Held until the response's last byte: an open stream keeps its slot.
                    slot = self._concurrency.acquire(principal.name, caps)

                payload = await request_body.read_body(
                    receive, headers, runtime.config.server.max_body_bytes, lease
                )
                upstream = runtime.upstreams[route.upstream]
                document: dict[str, Any] | None = None
                model: str | None = None
                rewrite: _Rewrite | None = None
                if route.model_in_body and method in _BODY_METHODS and payload:
                    media = request_body.media_type(headers)
                    if request_body.may_be_json(media):
                        parsed = request_body.parse_json(payload)
                        if isinstance(parsed, dict):
                            document = parsed
                            upstream, model, renamed = self._resolve_model(
                                runtime, principal, document.get("model"), upstream
                            )
                            if renamed is not None:
                                document["model"] = renamed
                            asked = route.stream_usage and _ask_for_stream_usage(document)
                            if renamed is not None or asked:
                                # Re-serialised once, and only when a rule changed the document;
                                # otherwise the client's bytes go upstream untouched.
                                payload = orjson.dumps(document)
                    elif media == multipart.FORM_DATA:
                        if (
                            not principal.all_models
                            or not runtime.config.allow_unlisted_models
                            or runtime.models
                        ):
                            upstream, model, payload = self._resolve_form_model(
                                runtime, principal, headers, payload, upstream
                            )
                    elif not principal.all_models or not runtime.config.allow_unlisted_models:
                        # A model rule applies but the model of a binary body cannot be read:
                        # refuse rather than let the body pass unchecked.
                        raise errors.unsupported_media(media.decode("latin-1"), route.name)
                elif route.model_in_path is not None:
                    upstream, match, rewrite = self._resolve_path_model(
                        runtime, principal, match, route.model_in_path, upstream
                    )
                elif route.models_list and method == "GET":
                    rewrite = self._models_list(runtime, principal, upstream)
                scope["gateway.upstream"] = upstream.name

                # Limits come last among the checks: a request refused for any other reason
                # costs its key nothing. Nothing reaches the upstream for a refused request.
                admission: _Admission | None = None
                plan = runtime.planner.charges(
                    key=principal.config, route=route.name, model=model, tokens=0
                )
                if plan.buckets.buckets:
                    if plan.buckets.has_tokens:
                        plan = Plan(
                            plan.key_name, plan.buckets, _reserve(runtime, document, payload)
                        )
                    decision = await runtime.limiter.admit(plan)
                    if not decision.allowed:
                        raise decision.error()
                    extra = [*extra, *decision.headers()]
                    admission = _Admission(runtime.limiter, decision)

                outbound = OutboundRequest(
                    method=method,
                    url=upstream.url(match.upstream_path, scope.get("query_string", b"")),
                    headers=upstream_request_headers(
                        headers,
                        upstream.added_headers,
                        self._forwarded_for(scope, upstream),
                        replaced=upstream.added_names,
                    ),
                    body=payload,
                    timeouts=runtime.timeouts(route.name, upstream),
                )
            except errors.GatewayError as refusal:
                await refusal.send(send, extra)
                return
            except request_body.ClientDisconnected:
                return
            await self._exchange(
                scope, receive, send, upstream, outbound, extra, admission, rewrite
            )
        finally:
            # The body's bytes go back to the budget and the key's slot is freed however the
            # request ended: refused, cut, cancelled or complete.
            lease.release()
            if slot is not None:
                slot.release()

    @staticmethod
    def _endpoint_headers(match: Match, root_path: str) -> RawHeaders:
        endpoint = match.endpoint
        if not endpoint.deprecated:
            return []
        extra = list(endpoint.deprecation_headers)
        link = endpoint.successor_link(root_path)
        if link is not None:
            extra.append(link)
        return extra

    @staticmethod
    def _resolve_model(
        runtime: Runtime,
        principal: Principal,
        model: object,
        route_upstream: UpstreamTarget,
    ) -> tuple[UpstreamTarget, str | None, str | None]:
        """Apply the key's model rule and the model alias table to a body's ``model``; returns
        the upstream, the public model name, and the upstream's name for the model when it
        differs (the body must then be renamed), else None."""
        if model is None:
            # No model: the upstream answers as it would have directly.
            return route_upstream, None, None
        if not isinstance(model, str):
            raise errors.invalid_model_type()
        if not principal.may_use_model(model):
            raise errors.model_not_allowed(model)
        alias = runtime.models.get(model)
        if alias is None:
            if not runtime.config.allow_unlisted_models:
                raise errors.unknown_model(model)
            return route_upstream, model, None
        upstream_model = alias.model or model
        renamed = upstream_model if upstream_model != model else None
        return runtime.upstreams[alias.upstream], model, renamed

    @staticmethod
    def _resolve_form_model(
        runtime: Runtime,
        principal: Principal,
        headers: RawHeaders,
        payload: Body,
        route_upstream: UpstreamTarget,
    ) -> tuple[UpstreamTarget, str | None, Body]:
        """The model rules for a ``multipart/form-data`` body (uploads: audio, files): its
        ``model`` field is read like a JSON body's ``model``. A form without one passes, as a
        JSON body without one does (``files.create``). A renaming alias rewrites only the
        field's value; every other byte of the form goes upstream as the client sent it."""
        form_boundary = multipart.boundary(headers)
        found = multipart.find_model(payload, form_boundary)
        if found is None:
            return route_upstream, None, payload
        upstream, model, renamed = Proxy._resolve_model(
            runtime, principal, found.value, route_upstream
        )
        if renamed is not None:
            payload = multipart.with_model(payload, found, renamed, form_boundary)
        return upstream, model, payload

    @staticmethod
    def _resolve_path_model(
        runtime: Runtime,
        principal: Principal,
        match: Match,
        param: str,
        route_upstream: UpstreamTarget,
    ) -> tuple[UpstreamTarget, Match, _Rewrite | None]:
        """The model rules for a model named in the path (``GET /v1/models/{model}``).

        A model the key may not use does not exist for it: 404, as OpenAI answers. An alias is
        asked of its upstream under the upstream's name, and its answer's ``id`` is the alias."""
        model = unquote(match.params[param])
        if not principal.may_use_model(model):
            raise errors.unknown_model(model)
        alias = runtime.models.get(model)
        if alias is None:
            if not runtime.config.allow_unlisted_models:
                raise errors.unknown_model(model)
            return route_upstream, match, None
        upstream = runtime.upstreams[alias.upstream]
        upstream_model = alias.model or model
        if upstream_model == model:
            return upstream, match, None
        # Encoded as a client encodes an id in a path: an 'org/name' id as one segment.
        params = {**match.params, param: quote(upstream_model, safe="")}
        renamed = dataclasses.replace(
            match, upstream_path=match.endpoint.target.fill(params), params=params
        )
        return upstream, renamed, functools.partial(models_list.model_as_alias, alias=model)

    @staticmethod
    def _models_list(
        runtime: Runtime, principal: Principal, upstream: UpstreamTarget
    ) -> _Rewrite | None:
        """How the upstream's model list is rewritten for this caller; None when it would not
        change (every model allowed, unlisted ones too, no aliases): then it is relayed raw."""
        aliases = runtime.models
        unlisted = runtime.config.allow_unlisted_models
        if not models_list.rewrites_list(principal, aliases, unlisted):
            return None
        return functools.partial(
            models_list.list_for_caller,
            principal=principal,
            aliases=aliases,
            unlisted=unlisted,
            upstream=upstream.name,
        )

    @staticmethod
    def _forwarded_for(scope: Scope, upstream: UpstreamTarget) -> str | None:
        if not upstream.append_forwarded_for:
            return None
        chain = scope.get("gateway.forwarded_for")
        if chain:
            return ", ".join(chain)
        client = scope.get("client")
        return client[0] if client else None

    async def _exchange(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        upstream: UpstreamTarget,
        outbound: OutboundRequest,
        extra: RawHeaders,
        admission: _Admission | None,
        rewrite: _Rewrite | None = None,
    ) -> None:
        exchange = _Exchange(task=asyncio.current_task())
        timer = asyncio.get_running_loop().call_later(
            WATCH_AFTER_SECONDS, exchange.start_watching, receive
        )
        response: UpstreamResponse | None = None
        tap: UsageTap | None = None
        complete = False
        unanswered = False  # the upstream failed before its response: it used no tokens
        try:
            try:
                response = await upstream.client.send(outbound)
            except Exception as exc:
                unanswered = True
                scope["gateway.upstream_error"] = type(exc).__name__
                if not isinstance(exc, UpstreamError):
                    # A fault in the client itself, not the upstream: still an OpenAI-shaped
                    # 502 for the caller, with the traceback for the operator.
                    logger.exception("upstream client failed for upstream '%s'", upstream.name)
                await _upstream_refusal(exc, upstream.name).send(send, extra)
            else:
                if admission is not None and admission.decision.plan.buckets.has_tokens:
                    tap = _usage_tap(response.raw_headers)
                if rewrite is not None and response.status == 200:
                    complete = await self._relay_rewritten(
                        scope,
                        send,
                        response,
                        extra,
                        tap,
                        rewrite,
                        strip_ratelimit=admission is not None,
                        upstream=upstream,
                    )
                else:
                    complete = await self._relay(
                        scope,
                        send,
                        response,
                        extra,
                        tap,
                        strip_ratelimit=admission is not None,
                        secrets=upstream.secrets,
                    )
        except asyncio.CancelledError:
            if not exchange.client_gone:
                raise
            # The client left: drop the upstream connection so the upstream stops generating.
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            scope["gateway.client_gone"] = True
        finally:
            exchange.stop_watching(timer)
            if response is not None:
                if complete:
                    response.release()
                else:
                    response.close()
        if admission is not None and admission.decision.plan.buckets.has_tokens:
            # Every ending gets here, a client disconnect included (docs/design.md §3); the
            # response is already complete, so settling inline delays nobody.
            used = _used_tokens(tap)
            if used is None and (unanswered or (response is not None and response.status >= 400)):
                # The upstream failed or refused (and reported no usage): it generated nothing,
                # so the reservation is refunded rather than kept.
                used = 0
            if used is not None:
                await admission.limiter.settle(admission.decision, used)

    @staticmethod
    async def _relay(
        scope: Scope,
        send: Send,
        response: UpstreamResponse,
        extra: RawHeaders,
        tap: UsageTap | None,
        *,
        strip_ratelimit: bool,
        secrets: Sequence[bytes] = (),
    ) -> bool:
        """Forward the head, then each raw chunk the moment it arrives. True if it completed.

        The usage tap reads the same chunk objects; it never changes or delays them. One
        exception to "the moment it arrives": when the upstream has ``secrets``, the body of a
        non-streamed error is held first (up to ``ERROR_BODY_BYTES``) so that a credential it
        quotes can be masked before anything is sent (``_masked_error_body``)."""
        headers, event_stream = downstream_response_headers(
            response.raw_headers,
            extra,
            # The upstream's x-ratelimit-* describe the gateway's own upstream key; the
            # caller's limits replace them.
            drop=RATELIMIT_HEADERS if strip_ratelimit else frozenset(),
            secrets=secrets,
        )
        status = response.status
        read = response.read_chunk
        sent = 0
        held: Sequence[bytes] = ()
        complete = False
        if secrets and status >= 400 and not event_stream:
            try:
                held, complete = await _hold_body(read, tap, ERROR_BODY_BYTES)
            except UpstreamStreamError as exc:
                # Cut before it could be inspected: the head, none of the body, a cut stream.
                await send({"type": "http.response.start", "status": status, "headers": headers})
                return _cut(scope, exc, sent)
            masked = _masked_error_body(held, headers, secrets) if complete else None
            if masked is not None:
                headers, held = masked
                logger.warning(
                    "upstream '%s' quoted its credentials in a %d response; masked",
                    scope.get("gateway.upstream"),
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
                return _cut(scope, exc, sent)
            if not chunk:
                break
            sent += len(chunk)
            if tap is not None:
                tap.feed(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        scope["gateway.bytes"] = sent
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True

    @staticmethod
    async def _relay_rewritten(
        scope: Scope,
        send: Send,
        response: UpstreamResponse,
        extra: RawHeaders,
        tap: UsageTap | None,
        rewrite: _Rewrite,
        *,
        strip_ratelimit: bool,
        upstream: UpstreamTarget,
    ) -> bool:
        """Send the body ``rewrite`` makes of the upstream's whole successful body (the model
        list for the caller, a model retrieved through an alias). True if the upstream's body
        was read to its end.

        The body is read whole, up to ``models_list.MAX_BODY_BYTES`` before and after inflating
        (gzip and deflate: the codings the gateway asks for), and goes out decoded with its own
        ``Content-Length``. One that cannot be read or is not what ``rewrite`` expects is a
        502: a list the gateway could not filter would show the caller models it may not use."""
        headers, _ = downstream_response_headers(
            response.raw_headers,
            extra,
            drop=RATELIMIT_HEADERS if strip_ratelimit else frozenset(),
            secrets=upstream.secrets,
        )
        limit = models_list.MAX_BODY_BYTES
        try:
            held, complete = await _hold_body(response.read_chunk, tap, limit)
        except UpstreamStreamError as exc:
            scope["gateway.upstream_error"] = str(exc)
            await errors.upstream_failed(upstream.name).send(send, extra)
            return False
        plain = _decoded_body(b"".join(held), headers, limit) if complete else None
        body = rewrite(plain) if plain is not None else None
        if body is None:
            await models_list.unreadable(upstream.name).send(send, extra)
            return complete
        # The representation changed: the upstream's coding, length and validator describe
        # another one (RFC 9110 §8.8.3).
        headers = [(n, v) for n, v in headers if n not in _REWRITTEN_DROPS]
        headers.append((b"content-length", str(len(body)).encode("ascii")))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        scope["gateway.bytes"] = len(body)
        return True


_REWRITTEN_DROPS = frozenset({b"content-encoding", b"content-length", b"etag"})


def _cut(scope: Scope, exc: UpstreamStreamError, sent: int) -> bool:
    """The upstream failed after the head: returns False, the relay did not complete.

    The status cannot change any more. Returning without the final message makes the server
    drop the connection: the client sees a cut stream, never a clean end."""
    scope["gateway.upstream_error"] = str(exc)
    scope["gateway.bytes"] = sent
    logger.warning("upstream failed mid-response after %d bytes: %s", sent, exc)
    return False


# The most of a non-streamed error body held to mask the upstream's secrets in it, before and
# after inflating: an error is a few hundred bytes. A larger body is relayed as it comes,
# unmasked (README: "What the gateway guarantees about upstream secrets").
ERROR_BODY_BYTES = 1024 * 1024
_GZIP_OR_ZLIB = 32 + zlib.MAX_WBITS  # zlib detects either header
_INFLATE_INPUT_STEP = 64 * 1024


async def _hold_body(
    read: Callable[[], Awaitable[bytes]], tap: UsageTap | None, limit: int
) -> tuple[list[bytes], bool]:
    """The chunks of a body up to ``limit`` bytes (the one crossing it included), and whether
    they are the whole body. The usage tap reads them as they arrive."""
    held: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await read()
        if not chunk:
            return held, True
        if tap is not None:
            tap.feed(chunk)
        held.append(chunk)
        size += len(chunk)
    return held, False


def _masked_error_body(
    held: Sequence[bytes], headers: RawHeaders, secrets: Sequence[bytes]
) -> tuple[RawHeaders, list[bytes]] | None:
    """The headers and body to send instead of a whole error body that quotes a secret, or
    None to send it unchanged (no secret in it, or it cannot be read within the bound).

    A gzip or deflate body is searched in an inflated copy; when it holds a secret it goes out
    masked and decoded, without ``Content-Encoding`` and with its own ``Content-Length``."""
    plain = _decoded_body(b"".join(held), headers, ERROR_BODY_BYTES)
    if plain is None:
        return None
    masked = mask_secrets(plain, secrets)
    if masked is plain:
        return None
    kept = [(n, v) for n, v in headers if n != b"content-encoding" and n != b"content-length"]
    kept.append((b"content-length", str(len(masked)).encode("ascii")))
    return kept, [masked]


def _decoded_body(body: bytes, headers: RawHeaders, limit: int) -> bytes | None:
    """``body`` without its content coding, or None when it is over ``limit`` bytes before or
    after inflating, or in a coding the gateway did not offer (br, zstd, several)."""
    coding = b""
    for name, value in headers:
        if name == b"content-encoding":
            coding = value.strip().lower()
    if coding in (b"", b"identity"):
        return body if len(body) <= limit else None
    if coding in INFLATABLE_CODINGS:
        return _inflated_error_body(body, coding, limit)
    return None


def _inflated_error_body(body: bytes, coding: bytes, limit: int = ERROR_BODY_BYTES) -> bytes | None:
    """``body`` inflated, or None when it inflates past ``limit``. A corrupt or truncated body
    gives what inflated before the fault: what a lenient client would show."""
    wbits = _GZIP_OR_ZLIB
    if coding == b"deflate" and not _zlib_wrapped(body):
        # RFC 9110 §8.4.1.2: deflate is zlib-wrapped, but some servers send it raw.
        wbits = -zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    pieces: list[bytes] = []
    room = limit
    for start in range(0, len(body), _INFLATE_INPUT_STEP):
        try:
            # Fed in steps, so a fault loses only the step it is in.
            piece = inflater.decompress(body[start : start + _INFLATE_INPUT_STEP], room + 1)
        except zlib.error:
            break
        if len(piece) > room or inflater.unconsumed_tail:
            return None
        pieces.append(piece)
        room -= len(piece)
        if inflater.eof:
            break
    return b"".join(pieces)


def _zlib_wrapped(body: bytes) -> bool:
    """Whether ``body`` starts with a zlib header (RFC 1950 §2.2: CM 8, FCHECK)."""
    return len(body) >= 2 and body[0] & 0x0F == 8 and ((body[0] << 8) | body[1]) % 31 == 0


def _upstream_refusal(exc: Exception, upstream: str) -> errors.GatewayError:
    if isinstance(exc, UpstreamTimeout):
        return errors.upstream_timeout(upstream)
    if isinstance(exc, UpstreamConnectError):
        return errors.upstream_unreachable(upstream)
    return errors.upstream_failed(upstream)


def _ask_for_stream_usage(document: dict[str, Any]) -> bool:
    """Add ``stream_options.include_usage`` to a stream request that did not ask for it, so
    token limits settle exactly; True if the document changed. The client then receives the
    final usage chunk (empty ``choices``) exactly as the upstream sends it, as if it had asked
    itself."""
    if document.get("stream") is not True:
        return False
    options = document.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    document["stream_options"] = {
        **(options if isinstance(options, dict) else {}),
        "include_usage": True,
    }
    return True


def _usage_tap(raw_headers: Any) -> UsageTap:
    content_type = content_encoding = None
    for name, value in raw_headers:
        lowered = name.lower()
        if lowered == b"content-type":
            content_type = value.decode("latin-1")
        elif lowered == b"content-encoding":
            content_encoding = value.decode("latin-1")
    return UsageTap(content_type, content_encoding)


def _used_tokens(tap: UsageTap | None) -> int | None:
    """The tokens to settle a reservation to: the response's final usage, input (prompt-cache
    reads and writes included) plus output, as ``Usage.total_tokens`` counts them.

    ``None`` when there is no final count: no usage was read, or the response ended before it
    (a client that left, an upstream that failed mid-stream). The reservation then stands,
    since the upstream generated until it was cancelled and nothing says how far; only an
    upstream that never answered, or answered with an error status, has it refunded."""
    usage = tap.finish() if tap is not None else None
    return usage.total_tokens if usage is not None else None


def _reserve(runtime: Runtime, document: dict[str, Any] | None, payload: Body) -> int:
    """Tokens to reserve at admission."""
    default = runtime.config.limits.default_max_tokens
    try:
        return estimate_tokens(document, default)
    except RecursionError:
        # Pathologically nested JSON (orjson accepts 1024 levels): a bound from its size.
        return len(payload) // 4 + default
