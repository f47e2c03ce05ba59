"""The app factory: one config in, one ASGI app out.

The middleware order is one expression (after Starlette): the request's lifecycle first (its
context and id, the one error path, the access log as the context's observer), so that a fault
anywhere below still gets an OpenAI-shaped answer and a log line; then the forwarded headers, so
every rule sees the real client, scheme and root path; then the dispatch between the gateway's
own endpoints and the relay.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router

from gateway import errors
from gateway.config.checks import RESERVED_PATHS
from gateway.config.model import GatewayConfig
from gateway.endpoints.openapi import openapi_document
from gateway.http.body import BodyBudget
from gateway.http.forwarded import ForwardedMiddleware, ForwardedStats, TrustedProxies
from gateway.limits import Limiter, LimiterStats, build_limiter
from gateway.limits.concurrency import ConcurrencyLimiter
from gateway.observability.access_log import AccessLog, BufferedLines
from gateway.pipeline.lifecycle import Lifecycle
from gateway.pipeline.proxy import Proxy
from gateway.reload import ConfigReloader
from gateway.runtime import Runtime, build_runtime, build_tables, retired_clients
from gateway.server.stats import ConnectionStats
from gateway.types import ASGIApp, Receive, Scope, Send
from gateway.upstream.seam import ClientFactory, UpstreamClient
from gateway.upstream.transports.aiohttp import AiohttpClient
from gateway.upstream.transports.http1 import Http1Client

logger = logging.getLogger("gateway.app")

# The upstream clients behind the seam (gateway/upstream/seam.py), by their config name.
CLIENTS: dict[str, ClientFactory] = {"http1": Http1Client, "aiohttp": AiohttpClient}

# How long a pool the new config no longer uses stays open for the requests still on it.
RETIRE_AFTER_SECONDS = 900.0

# The gateway's own endpoints; the config loader refuses routes on these (RESERVED_PATHS).
OWN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json"})
assert OWN_PATHS <= RESERVED_PATHS


class Gateway:
    """The ASGI application: lifespan, the gateway's own endpoints, and the relay."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        client_factory: ClientFactory | None = None,
        root_path: str | None = None,
        config_files: tuple[str, ...] = (),
    ) -> None:
        # The config the app starts with; after a reload the current one is the runtime's.
        self._startup_config = config
        self.client_factory = client_factory or CLIENTS[config.server.upstream_client]
        self.forwarded_stats = ForwardedStats()
        # Read by the connection protocol (gateway/server/protocol.py) for each connection.
        self.connection_settings = config.server.connections
        self.connection_stats = ConnectionStats()
        self.access_lines = BufferedLines(sys.stderr)
        self._runtime: Runtime | None = None
        self._config_files = config_files
        self.reloader: ConfigReloader | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self.limiter_stats = LimiterStats()
        self.limiter: Limiter | None = None
        self.concurrency = ConcurrencyLimiter()
        self.body_budget = BodyBudget(
            config.server.max_buffered_body_bytes, config.server.body_buffer_wait
        )
        self._proxy = Proxy(self.runtime, self.concurrency, self.body_budget)
        self._own = Router(
            routes=[
                Route("/healthz", self._healthz, methods=["GET", "HEAD"]),
                Route("/readyz", self._readyz, methods=["GET", "HEAD"]),
                Route("/openapi.json", self._openapi, methods=["GET", "HEAD"]),
            ],
            redirect_slashes=False,
            default=self._not_found,
        )
        server = config.server
        self._app: ASGIApp = Lifecycle(
            ForwardedMiddleware(
                self._dispatch,
                trusted=TrustedProxies(server.trusted_proxies),
                root_path=server.root_path if root_path is None else root_path,
                stats=self.forwarded_stats,
            ),
            observers=[AccessLog(self.access_lines.write)] if server.access_log else [],
        )

    def runtime(self) -> Runtime:
        runtime = self._runtime
        if runtime is None:
            raise errors.not_ready()
        return runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        await self._app(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no websockets: the gateway relays HTTP APIs only
        if self._runtime is None:
            await errors.not_ready().send(send)
            return
        root_path: str = scope.get("root_path", "")
        path: str = scope["path"]
        relative = path[len(root_path) :] if root_path and path.startswith(root_path) else path
        if relative in OWN_PATHS:
            if scope["method"] not in ("GET", "HEAD"):
                # Starlette's own 405 is plain text; every gateway error has OpenAI's shape.
                await errors.method_not_allowed(scope["method"], relative, ("GET", "HEAD")).send(
                    send
                )
                return
            await self._own(scope, receive, send)
        else:
            await self._proxy(scope, receive, send)

    @staticmethod
    async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
        await errors.unknown_route(scope["method"], scope["path"]).send(send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # the server reports it and exits
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        config = self._startup_config
        self.limiter = build_limiter(config.redis, stats=self.limiter_stats)
        self._runtime = build_runtime(config, self.client_factory, self.limiter)
        if self._config_files:
            self.reloader = ConfigReloader(
                self._config_files[0],
                self._config_files,
                self.apply,
                interval=config.server.reload_interval,
            )
            self.reloader.start()

    async def shutdown(self) -> None:
        if self.reloader is not None:
            await self.reloader.stop()
        for task in list(self._retiring):
            task.cancel()
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            await runtime.aclose()
        if self.limiter is not None:
            await self.limiter.aclose()
        self.access_lines.flush()

    async def apply(self, config: GatewayConfig) -> None:
        """Swap in a snapshot of ``config``; requests in flight finish on the old one."""
        previous = self.runtime()
        for section in ("server", "redis"):
            if getattr(config, section) != getattr(previous.config, section):
                logger.warning("the '%s' section changed; restart the gateway to apply it", section)
        tables = await asyncio.to_thread(build_tables, config, previous)
        current = build_runtime(config, self.client_factory, previous.limiter, previous, tables)
        self._runtime = current
        retired = retired_clients(previous, current)
        if retired:
            task = asyncio.ensure_future(self._retire(retired))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    @staticmethod
    async def _retire(clients: list[UpstreamClient]) -> None:
        try:
            await asyncio.sleep(RETIRE_AFTER_SECONDS)
        finally:
            for client in clients:
                try:
                    await client.aclose()
                except Exception:
                    # One pool failing to close must not keep the others open; say which.
                    logger.exception("closing a retired upstream pool failed")

    async def _healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _readyz(self, request: Request) -> Response:
        runtime = self._runtime
        if runtime is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        body: dict[str, object] = {
            "status": "ready",
            # Which process answered: with --workers N each has its own config generation.
            "pid": os.getpid(),
            "routes": len(runtime.routes.endpoints),
            "upstreams": len(runtime.upstreams),
            "keys": len(runtime.keys),
        }
        if self.reloader is not None:
            # Anyone may call /readyz, so counts and times only: a refused reload's text names
            # the config files and may quote their values. It is in the log (and kept in
            # ReloadStatus.last_error) for those who may read it.
            status = self.reloader.status
            body["config"] = {
                "generation": status.generation,
                "reload_failures": status.failures,
                "last_reload_failed": status.last_error is not None,
                "last_reload_at": status.last_reload_at,
            }
        stats = self.limiter_stats
        body["limits"] = {
            "store": "redis" if runtime.config.redis.url else "local (per process)",
            "degraded_decisions": stats.degraded,
            "redis_errors": stats.redis_errors,
            # closed, open or half-open; and the last failure's class and Unix time only: its
            # text may name hosts, and anyone may call /readyz.
            "breaker": stats.breaker if runtime.config.redis.url else None,
            "last_error": (
                None
                if stats.last_error is None
                else {"type": stats.last_error, "at": stats.last_error_at}
            ),
        }
        body["connections"] = self.connection_stats.as_dict()
        bodies = self.body_budget
        body["request_bodies"] = {
            "held_bytes": bodies.capacity - bodies.available,
            "capacity_bytes": bodies.capacity,
        }
        # Forwarded headers that were ignored: malformed values, or sent by a peer outside
        # trusted_proxies (a spoofing attempt, or a proxy missing from the list).
        forwarded = self.forwarded_stats
        body["forwarded_headers_ignored"] = {
            "malformed": dict(forwarded.malformed),
            "untrusted_peer": forwarded.untrusted,
        }
        return JSONResponse(body)

    async def _openapi(self, request: Request) -> Response:
        document = openapi_document(self.runtime().routes, request.scope.get("root_path", ""))
        return Response(orjson.dumps(document), media_type="application/json")


def app_from_environment() -> Gateway:
    """uvicorn factory for ``gateway serve`` workers: the config path comes from the environment."""
    from gateway.config.loader import load_config_files

    path = os.environ["GATEWAY_CONFIG"]
    root_path = os.environ.get("GATEWAY_ROOT_PATH")
    config, files = load_config_files(path)
    return Gateway(config, root_path=root_path, config_files=files)
