"""The outermost middleware: one ``RequestContext`` per request, its id, and the one error path.

For every HTTP request it

1. makes the request's context (``gateway/context.py``) with its id (``http/request_id.py``);
2. adds the id to the response head and records the status as the head goes out;
3. turns any exception that escapes the request path into an OpenAI-shaped 500 that names the
   request id, with the traceback in the gateway's log under the same id (never uvicorn's
   plain-text 500, never a traceback to the client). An exception after the head went out
   cannot change the status: the connection is dropped, so the client sees a cut response;
4. hands the finished context to the observers (the access log; later metrics), however the
   request ended, a client that left or a cancellation included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from gateway import errors
from gateway.context import SCOPE_KEY, RequestContext
from gateway.http.request_id import GATEWAY_REQUEST_ID, REQUEST_ID, request_id
from gateway.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("gateway.request")

Observer = Callable[[RequestContext], None]


class Lifecycle:
    def __init__(self, app: ASGIApp, observers: Sequence[Observer] = ()) -> None:
        self.app = app
        self.observers = tuple(observers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope["headers"])
        context = RequestContext(rid, scope["method"], scope["path"])
        client = scope.get("client")
        context.client = client[0] if client else None
        scope[SCOPE_KEY] = context
        id_value = rid.encode("ascii")
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                context.status = message["status"]
                headers = message["headers"]
                extra = [(GATEWAY_REQUEST_ID, id_value)]
                # The upstream's own X-Request-ID is relayed as it is (http/request_id.py).
                if not any(name == REQUEST_ID for name, _ in headers):
                    extra.append((REQUEST_ID, id_value))
                message["headers"] = [*headers, *extra]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            logger.exception("request %s failed in the gateway", rid)
            context.gateway_error = type(exc).__name__
            if not started:
                await errors.internal_error(rid).send(send_with_id)
            # Else returning without the final body message makes the server drop the
            # connection: the status already sent cannot be taken back.
        finally:
            for observe in self.observers:
                try:
                    observe(context)
                except Exception:
                    # An observer's fault must not turn a served request into an error.
                    logger.exception("observer failed for request %s", rid)
