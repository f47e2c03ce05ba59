"""Request ids and the access log: pure ASGI middleware, one JSON line per request.

The line names the key by its configured name and never carries headers, bodies or query
strings: those are where credentials and prompts live.
"""

from __future__ import annotations

import logging
import os
import time

import orjson

from gateway.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = b"x-gateway-request-id"


class AccessLog:
    def __init__(self, app: ASGIApp, *, enabled: bool, logger: logging.Logger) -> None:
        self.app = app
        self.enabled = enabled
        self.logger = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = os.urandom(8).hex()
        scope["gateway.request_id"] = request_id
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER, request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.enabled:
                self._log(scope, request_id, status, time.perf_counter() - started)

    def _log(self, scope: Scope, request_id: str, status: int, elapsed: float) -> None:
        client = scope.get("client")
        record = {
            "ts": time.time(),
            "request_id": request_id,
            "client": client[0] if client else None,
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "ms": round(elapsed * 1000, 3),
            "route": scope.get("gateway.route"),
            "key": scope.get("gateway.key"),
            "upstream": scope.get("gateway.upstream"),
            "bytes": scope.get("gateway.bytes"),
        }
        if "gateway.upstream_error" in scope:
            record["upstream_error"] = scope["gateway.upstream_error"]
        if scope.get("gateway.client_gone"):
            record["client_gone"] = True
        self.logger.info(orjson.dumps(record).decode())
