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
import signal
import sys
import time
from typing import Any, TextIO

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router

from gateway import errors
from gateway.auth import AdminKeys
from gateway.config.checks import JOBS_PREFIX, RESERVED_PATHS
from gateway.config.model import GatewayConfig
from gateway.context import context_of
from gateway.endpoints import health
from gateway.endpoints.admin import PREFIX as ADMIN_PREFIX
from gateway.endpoints.admin import AdminApi, redact
from gateway.endpoints.jobs import JobsApi, is_jobs_path
from gateway.endpoints.openapi import openapi_document
from gateway.http.body import BodyBudget
from gateway.http.forwarded import ForwardedMiddleware, ForwardedStats, TrustedProxies
from gateway.http.prefer import preferences
from gateway.jobs.model import Job
from gateway.jobs.service import JobService, uses_redis
from gateway.limits import Limiter, LimiterStats, RedisLimiter, build_limiter
from gateway.limits.concurrency import ConcurrencyLimiter
from gateway.observability.access_log import AccessLog, BufferedLines
from gateway.observability.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.observability.metrics import Metrics, multiprocess_directory
from gateway.observability.recent import RecentActivity
from gateway.observability.workers import WorkerBoard
from gateway.pipeline.lifecycle import Lifecycle, Observer
from gateway.pipeline.proxy import Proxy
from gateway.reload import ConfigReloader
from gateway.runtime import Runtime, build_runtime, build_tables, retired_clients
from gateway.server.stats import ConnectionStats
from gateway.types import ASGIApp, Receive, Scope, Send
from gateway.upstream.health import HealthRegistry
from gateway.upstream.health_checks import HealthChecker
from gateway.upstream.health_sync import HealthSync
from gateway.upstream.seam import ClientFactory, UpstreamClient
from gateway.upstream.transports.aiohttp import AiohttpClient
from gateway.upstream.transports.http1 import Http1Client

logger = logging.getLogger("gateway.app")

# The upstream clients behind the seam (gateway/upstream/seam.py), by their config name.
CLIENTS: dict[str, ClientFactory] = {"http1": Http1Client, "aiohttp": AiohttpClient}

# How long a pool the new config no longer uses stays open for the requests still on it.
RETIRE_AFTER_SECONDS = 900.0

# Liveness and readiness, under the names Kubernetes examples use and those some platforms probe.
LIVE_PATHS = ("/healthz", "/health", "/live")
READY_PATHS = ("/readyz", "/ready")
# The gateway's own endpoints; the config loader refuses routes on these (RESERVED_PATHS).
OWN_PATHS = frozenset({*LIVE_PATHS, *READY_PATHS, "/openapi.json", "/metrics"})
assert OWN_PATHS <= RESERVED_PATHS
# How long POST /admin/reload waits for every worker to report its reload.
RELOAD_WAIT_SECONDS = 10.0


class Gateway:
    """The ASGI application: lifespan, the gateway's own endpoints, and the relay."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        client_factory: ClientFactory | None = None,
        root_path: str | None = None,
        config_files: tuple[str, ...] = (),
        access_stream: TextIO | None = None,
    ) -> None:
        # The config the app starts with; after a reload the current one is the runtime's.
        self._startup_config = config
        self.client_factory = client_factory or CLIENTS[config.server.upstream_client]
        self.forwarded_stats = ForwardedStats()
        # Read by the connection protocol (gateway/server/protocol.py) for each connection.
        self.connection_settings = config.server.connections
        self.connection_stats = ConnectionStats()
        self.access_lines = BufferedLines(sys.stderr if access_stream is None else access_stream)
        self._runtime: Runtime | None = None
        self._config_files = config_files
        self.reloader: ConfigReloader | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self.limiter_stats = LimiterStats()
        self.limiter: Limiter | None = None
        self.concurrency = ConcurrencyLimiter()
        # What this process knows of every upstream target's health; outlives reloads.
        self.target_health = HealthRegistry()
        # Active health checks, and ejections shared through Redis: started in the lifespan.
        self.health_checks = HealthChecker()
        self.health_sync: HealthSync | None = None
        self.body_budget = BodyBudget(
            config.server.max_buffered_body_bytes, config.server.body_buffer_wait
        )
        self.started_at = time.time()
        self.config_loaded_at: float | None = None
        self.recent = RecentActivity()
        self.workers = WorkerBoard.from_environment()
        self.metrics: Metrics | None = None
        if config.metrics.enabled:
            self.metrics = Metrics(multiprocess_dir=multiprocess_directory())
            self.metrics.watch_models(self._known_models)
        self._metrics_need_admin = config.metrics.require_admin_key
        self._admin = AdminApi(self)
        self._proxy = Proxy(
            self.runtime,
            self.concurrency,
            self.body_budget,
            self.metrics,
            read_usage=self.metrics is not None,
        )
        # Jobs (gateway/jobs/): made in the lifespan when the config enables them.
        self.jobs: JobService | None = None
        self._jobs_api: JobsApi | None = None
        # Set by the server on SIGTERM (gateway/server/runner.py): /readyz answers 503 from then
        # on, so load balancers stop sending new requests before the listening socket closes.
        self.draining = False
        self._own = Router(
            routes=[
                *(Route(path, self._healthz, methods=["GET", "HEAD"]) for path in LIVE_PATHS),
                *(Route(path, self._readyz, methods=["GET", "HEAD"]) for path in READY_PATHS),
                Route("/openapi.json", self._openapi, methods=["GET", "HEAD"]),
                Route("/metrics", self._metrics, methods=["GET", "HEAD"]),
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
            observers=self._observers(config),
        )

    def _observers(self, config: GatewayConfig) -> list[Observer]:
        observers: list[Observer] = [self.recent]
        if self.metrics is not None:
            observers.append(self.metrics)
        if config.server.access_log:
            observers.append(AccessLog(self.access_lines.write))
        return observers

    def _job_finished(self, job: Job) -> None:
        if self.metrics is not None:
            self.metrics.job_finished(job.status.value)

    def _known_models(self) -> frozenset[str]:
        runtime = self._runtime
        return runtime.known_models if runtime is not None else frozenset()

    def current_runtime(self) -> Runtime | None:
        return self._runtime

    def admin_keys(self) -> AdminKeys:
        runtime = self._runtime
        if runtime is None:
            return AdminKeys({})
        return runtime.admin_keys

    def begin_drain(self) -> None:
        """From now on /readyz says 503 ``draining``; requests are still served."""
        if not self.draining:
            logger.info("draining: /readyz now answers 503")
        self.draining = True

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
        admin = relative.startswith(ADMIN_PREFIX)
        if not admin and relative not in OWN_PATHS:
            jobs = self._jobs_api
            if jobs is not None:
                if relative.startswith(JOBS_PREFIX) and is_jobs_path(relative):
                    await jobs(scope, receive, send, relative)
                    return
                asked = preferences(scope["headers"])
                if asked is not None and asked.respond_async:
                    await jobs.submit_preferred(scope, receive, send, asked)
                    return
            await self._proxy(scope, receive, send)
            return
        context = context_of(scope)
        if context is not None:
            context.own = True  # not API traffic: the metrics and recent activity skip it
        if admin:
            await self._admin(scope, receive, send, relative)
        elif scope["method"] not in ("GET", "HEAD"):
            # Starlette's own 405 is plain text; every gateway error has OpenAI's shape.
            await errors.method_not_allowed(scope["method"], relative, ("GET", "HEAD")).send(send)
        else:
            await self._own(scope, receive, send)

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
        self._runtime = build_runtime(
            config, self.client_factory, self.limiter, health=self.target_health
        )
        self.health_checks.start(self._runtime)
        if isinstance(self.limiter, RedisLimiter):
            self.health_sync = HealthSync(self.limiter, self.current_runtime)
            self.health_sync.start()
        if config.jobs.enabled and self.workers.shared and not uses_redis(config):
            # Each worker would hold its own queue: a job polled through another worker would
            # be a 404. Jobs need Redis to be shared by workers (as by replicas).
            logger.warning(
                "jobs are off: with several workers they need Redis (set redis.url), since an "
                "in-process queue is seen by one worker only"
            )
        elif config.jobs.enabled:
            # A job's run is a request the gateway makes to itself, through the same relay and
            # observers as any (gateway/jobs/execution.py).
            relay = Lifecycle(self._proxy, observers=self._observers(config))
            finished = None if self.metrics is None else self._job_finished
            self.jobs = JobService(config, relay, self.current_runtime, on_finish=finished)
            submitted = None if self.metrics is None else self.metrics.jobs_submitted.inc
            self._jobs_api = JobsApi(self.jobs, self.runtime, self.body_budget, submitted)
            self.jobs.start()
        self.config_loaded_at = time.time()
        if self._config_files:
            self.reloader = ConfigReloader(
                self._config_files[0],
                self._config_files,
                self.apply,
                interval=config.server.reload_interval,
                on_attempt=self._publish,
            )
            self.reloader.start()
        self._publish()

    async def shutdown(self) -> None:
        if self.reloader is not None:
            await self.reloader.stop()
        # Before the pools and the Redis client they use are closed.
        self._jobs_api = None
        if self.jobs is not None:
            await self.jobs.stop()
        await self.health_checks.stop()
        if self.health_sync is not None:
            await self.health_sync.stop()
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
        for section in ("server", "redis", "jobs"):
            if getattr(config, section) != getattr(previous.config, section):
                logger.warning("the '%s' section changed; restart the gateway to apply it", section)
        tables = await asyncio.to_thread(build_tables, config, previous)
        current = build_runtime(
            config, self.client_factory, previous.limiter, previous, tables, self.target_health
        )
        self._runtime = current
        self.health_checks.follow(current)
        self.config_loaded_at = time.time()
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
        status, word = health.readiness(self)
        return JSONResponse({"status": word}, status_code=status)

    async def _metrics(self, request: Request) -> Response:
        metrics = self.metrics
        if metrics is None:
            return await self._missing(request)
        if (
            self._metrics_need_admin
            and self.admin_keys().identify(request.scope["headers"]) is None
        ):
            return await self._missing(request)
        metrics.limiter_state(self.limiter_stats)
        metrics.target_state(self.target_health.all())
        if self.jobs is not None:
            metrics.jobs_state(self.jobs.workers.running, await self.jobs.queued())
        if self.reloader is not None:
            metrics.reload_state(self.reloader.status)
        return Response(metrics.exposition(), media_type=METRICS_CONTENT_TYPE)

    @staticmethod
    async def _missing(request: Request) -> Response:
        refusal = errors.unknown_route(request.method, request.url.path)
        return Response(refusal.body(), refusal.status, media_type="application/json")

    # -- what the admin API reads and does ---------------------------------------------------

    def health_detail(self) -> dict[str, Any]:
        return health.health_detail(self)

    def _record(self) -> dict[str, Any]:
        """This worker's entry on the worker board."""
        status = self.reloader.status if self.reloader is not None else None
        record: dict[str, Any] = {
            "generation": status.generation if status is not None else 1,
            "loaded_at": self.config_loaded_at,
            "started_at": self.started_at,
            "draining": self.draining,
            "breaker": self.limiter_stats.breaker,
        }
        if status is not None:
            record.update(
                last_reload_at=status.last_reload_at,
                last_attempt_at=status.last_attempt_at,
                reload_failures=status.failures,
                last_error=status.last_error,
                last_error_at=status.last_error_at,
            )
        return record

    def _publish(self) -> None:
        self.workers.publish(self._record())
        if self.metrics is not None and self.reloader is not None:
            self.metrics.reload_state(self.reloader.status)

    def config_status(self, *, redact_with: tuple[bytes, ...] = ()) -> dict[str, Any]:
        workers = [_redacted(record, redact_with) for record in self.workers.records()]
        own = _redacted(self._record(), redact_with)
        return {
            "pid": os.getpid(),
            "files": list(self._config_files),
            **own,
            "workers": workers,
        }

    async def reload_everywhere(
        self, asked_at: float, *, redact_with: tuple[bytes, ...] = ()
    ) -> dict[str, Any]:
        """Reload in this process, or with several workers, in every one (the supervisor passes
        SIGHUP on to each); then say what each worker did, or that it did not answer."""
        if self.reloader is None:
            return {"reloaded": False, "reason": "the config was not read from a file"}
        if not self.workers.shared:
            ok = await self.reloader.reload()
            return {"reloaded": ok, "workers": [_redacted(self._record(), redact_with)]}
        before = {record["pid"] for record in self.workers.records()}
        os.kill(os.getppid(), signal.SIGHUP)
        deadline = time.monotonic() + RELOAD_WAIT_SECONDS
        while True:
            records = self.workers.records()
            done = [r for r in records if (r.get("last_attempt_at") or 0) >= asked_at]
            if len(done) >= len(before) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        reached = {record["pid"] for record in done}
        results = [
            {**_redacted(record, redact_with), "reached": record["pid"] in reached}
            for record in records
        ]
        ok = all(r["reached"] and r.get("last_error") is None for r in results)
        return {"reloaded": ok, "workers": results}

    async def _openapi(self, request: Request) -> Response:
        document = openapi_document(
            self.runtime().routes,
            request.scope.get("root_path", ""),
            jobs=self._jobs_api is not None,
        )
        return Response(orjson.dumps(document), media_type="application/json")


def _redacted(record: dict[str, Any], secrets: tuple[bytes, ...]) -> dict[str, Any]:
    if record.get("last_error") is None:
        return record
    return {**record, "last_error": redact(record["last_error"], secrets)}


def app_from_environment() -> Gateway:
    """uvicorn factory for ``gateway serve`` workers: the config path comes from the environment."""
    from gateway.config.loader import load_config_files

    path = os.environ["GATEWAY_CONFIG"]
    root_path = os.environ.get("GATEWAY_ROOT_PATH")
    config, files = load_config_files(path)
    return Gateway(config, root_path=root_path, config_files=files)
