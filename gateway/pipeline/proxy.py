"""The ASGI app that serves every route: admission, then the relay.

One request, top to bottom: the current config snapshot is read once (a reload never changes
the rules under a request in flight), ``admission.admit`` decides and builds the outbound
request, ``relay.exchange`` sends it and relays the answer, and whatever admission took (body
bytes from the budget, the key's concurrency slot) is given back however the request ended.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway import errors
from gateway.context import SCOPE_KEY, RequestContext
from gateway.http.body import BodyBudget, ClientDisconnected
from gateway.limits.concurrency import ConcurrencyLimiter
from gateway.pipeline import relay
from gateway.pipeline.admission import Held, admit
from gateway.runtime import Runtime
from gateway.types import Receive, Scope, Send


class Proxy:
    def __init__(
        self,
        runtime: Callable[[], Runtime],
        concurrency: ConcurrencyLimiter,
        bodies: BodyBudget,
        streams: relay.StreamGauge | None = None,
        *,
        read_usage: bool = False,
    ) -> None:
        self._runtime = runtime
        # The metrics: the open-streams gauge, and every response's token usage.
        self._streams = streams
        self._read_usage = read_usage
        # Both outlive config snapshots: what is in flight stays counted across a reload.
        self._concurrency = concurrency
        self._bodies = bodies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = self._runtime()  # one snapshot for the whole request
        # Made by the lifecycle middleware, which the app always puts in front.
        context: RequestContext = scope[SCOPE_KEY]
        held = Held(self._bodies.lease())
        try:
            try:
                admitted = await admit(runtime, self._concurrency, scope, receive, context, held)
            except errors.GatewayError as refusal:
                await refusal.send(send, held.extra)
                return
            except ClientDisconnected:
                context.client_gone = True
                return
            await relay.exchange(
                context,
                receive,
                send,
                admitted.dispatch,
                held.extra,
                admitted.settlement,
                admitted.rewrite,
                self._streams,
                self._read_usage,
            )
        finally:
            held.release()
