"""The admin API under ``/admin/``: what an operator needs to see and the one thing they may do.

Off (404, as any unknown path) unless ``admin.keys`` lists a key. Every endpoint asks for an
admin key, as ``Authorization: Bearer`` or HTTP Basic with the key as password (what a browser
keeps for the session once entered: RFC 7617). A client key is refused with 403, whatever it may
do on the API; no key or an unknown one gets 401. Admin keys are compared by their SHA-256, like
client keys.

Nothing here shows a key, a key hash or an upstream secret: keys appear by name and team, an
upstream by name and scheme://host:port (never its path, query or credentials), and text from a
refused config is passed through ``redact`` before it is shown.

Endpoints (all JSON, ``Cache-Control: no-store``):

- ``GET /admin/config``: generation, files, load times, the last reload error, every worker;
- ``GET /admin/routes``: the resolved route table with aliases and deprecations;
- ``GET /admin/keys``: keys by name and team, their limits, requests in flight and bucket levels;
- ``GET /admin/upstreams``: each upstream's recent health as this process saw it;
- ``GET /admin/errors``: the last failed requests (ids, routes, statuses, kinds; no bodies);
- ``GET /admin/usage``: requests, tokens and cost per key, team, model and period, and the
  budgets (``gateway/accounting/report.py``);
- ``GET /admin/jobs``: where jobs live, the bounds, jobs running here and queued; with
  ``?id=job_...`` one job of any key, without its request or answer bodies;
- ``GET /admin/health``: connections, limits (Redis breaker), request bodies, forwarded headers;
- ``POST /admin/reload``: reload the config in every worker and say which it reached;
- ``GET /admin/status``: the status page for people (``status_page.html``).
"""

from __future__ import annotations

import importlib.resources
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import orjson

from gateway import errors
from gateway.accounting.report import parse_query, usage_report
from gateway.auth import basic_password, presented_key
from gateway.jobs.redis_store import RedisStore
from gateway.jobs.refusals import job_not_found, store_unavailable
from gateway.jobs.store import STORE_FAILURES
from gateway.jobs.views import job_view
from gateway.limits.redis_limiter import FAILURES
from gateway.types import Receive, Scope, Send
from gateway.upstream.targets import UpstreamTarget

if TYPE_CHECKING:
    from gateway.app import Gateway

PREFIX = "/admin/"
_JSON_HEADERS = [
    (b"content-type", b"application/json"),
    (b"cache-control", b"no-store"),
]
_HTML_HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"cache-control", b"no-store"),
    # The page loads nothing from elsewhere and runs only its own script.
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; "
        b"connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        b"frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
# Anything shaped like a key hash or a gateway key, wherever it appears in text shown here.
_SECRET_SHAPES = re.compile(r"sha256:[0-9a-fA-F]{8,}|sk-[A-Za-z0-9_\-]{8,}")

Handler = Callable[["Gateway", Scope, Receive], Awaitable[Any]]


def redact(text: str | None, secrets: tuple[bytes, ...] = ()) -> str | None:
    """``text`` with key hashes, gateway keys and the upstreams' configured secrets masked."""
    if text is None:
        return None
    text = _SECRET_SHAPES.sub("***", text)
    for secret in secrets:
        text = text.replace(secret.decode("utf-8", "replace"), "***")
    return text


def upstream_origin(base_url: str) -> str:
    """scheme://host[:port] of an upstream: never its path, query or user info."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


class AdminApi:
    """The ASGI app for ``/admin/...`` (the path relative to the root path)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._routes: dict[tuple[str, str], Handler] = {
            ("GET", "config"): _config,
            ("GET", "routes"): _routes,
            ("GET", "keys"): _keys,
            ("GET", "upstreams"): _upstreams,
            ("GET", "errors"): _errors,
            ("GET", "usage"): _usage,
            ("GET", "jobs"): _jobs,
            ("GET", "health"): _health,
            ("POST", "reload"): _reload,
        }
        self._page = (
            importlib.resources.files("gateway.endpoints").joinpath("status_page.html").read_bytes()
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send, relative: str) -> None:
        gateway = self._gateway
        keys = gateway.admin_keys()
        name = relative[len(PREFIX) :]
        method = "GET" if scope["method"] == "HEAD" else scope["method"]
        if not keys:
            await errors.unknown_route(scope["method"], scope["path"]).send(send)
            return
        if keys.identify(scope["headers"]) is None:
            await self._refuse(scope, send)
            return
        if name == "status":
            if method != "GET":
                await errors.method_not_allowed(scope["method"], relative, ("GET",)).send(send)
                return
            await _send(send, 200, _HTML_HEADERS, self._page)
            return
        handler = self._routes.get((method, name))
        if handler is None:
            allowed = [m for (m, n) in self._routes if n == name]
            if allowed:
                refusal = errors.method_not_allowed(scope["method"], relative, allowed)
            else:
                refusal = errors.unknown_route(scope["method"], scope["path"])
            await refusal.send(send, [(b"cache-control", b"no-store")])
            return
        try:
            document = await handler(gateway, scope, receive)
        except errors.GatewayError as refusal:  # a bad query (400), the store failing (503)
            await refusal.send(send, [(b"cache-control", b"no-store")])
            return
        await _send(send, 200, _JSON_HEADERS, orjson.dumps(document))

    async def _refuse(self, scope: Scope, send: Send) -> None:
        key = presented_key(scope["headers"]) or basic_password(scope["headers"])
        runtime = self._gateway.current_runtime()
        if key is not None and runtime is not None and runtime.keys.knows(key):
            await errors.admin_key_required().send(send)
            return
        # A browser asks for the key once and keeps it for the session (RFC 7617).
        challenge = (b"www-authenticate", b'Basic realm="gateway admin", charset="UTF-8"')
        await errors.admin_key_missing(key is not None).send(send, [challenge])


async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    head = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def _secrets(gateway: Gateway) -> tuple[bytes, ...]:
    runtime = gateway.runtime()
    return tuple(s for target in runtime.upstreams.values() for s in target.secrets)


async def _config(gateway: Gateway, scope: Scope, receive: Receive) -> dict[str, Any]:
    return gateway.config_status(redact_with=_secrets(gateway))


async def _routes(gateway: Gateway, scope: Scope, receive: Receive) -> dict[str, Any]:
    config = gateway.runtime().config
    routes = []
    for route in config.routes:
        routes.append(
            {
                "name": route.name,
                "path": route.path,
                "methods": list(route.methods),
                "upstream": route.upstream,
                "upstream_path": route.target_path(),
                "model_in_body": route.model_in_body,
                "models_list": route.models_list,
                "aliases": [
                    {
                        "path": alias.path,
                        "deprecated": _when(alias.deprecated),
                        "sunset": _when(alias.sunset),
                        "successor": alias.successor,
                    }
                    for alias in route.aliases
                ],
            }
        )
    models = {
        name: {"upstream": alias.upstream, "model": alias.model or name}
        for name, alias in config.models.items()
    }
    return {
        "routes": routes,
        "models": models,
        "allow_unlisted_models": config.allow_unlisted_models,
    }


def _when(value: object) -> object:
    if value is None or isinstance(value, bool):
        return value
    return str(value)


async def _keys(gateway: Gateway, scope: Scope, receive: Receive) -> dict[str, Any]:
    runtime = gateway.runtime()
    config = runtime.config
    out = []
    for key in config.keys:
        plan = runtime.planner.charges(key=key, route="", model=None, tokens=0)
        levels = await runtime.limiter.peek(plan.buckets.buckets)
        out.append(
            {
                "name": key.name,
                "team": key.team,
                "routes": list(key.routes),
                "models": list(key.models),
                "limits": (key.limits or config.limits.default).model_dump(),
                "in_flight": gateway.concurrency.in_flight(key.name),
                "buckets": [
                    {
                        "scope": bucket.scope,
                        "kind": bucket.kind,
                        "capacity": bucket.capacity,
                        "per_minute": round(bucket.per_second * 60, 3),
                        "available": None if level is None else round(level, 3),
                    }
                    for bucket, level in zip(plan.buckets.buckets, levels, strict=True)
                ],
            }
        )
    store = "redis" if config.redis.url else "local"
    return {"keys": out, "limits_store": store, "pid": os.getpid()}


async def _upstreams(gateway: Gateway, scope: Scope, receive: Receive) -> dict[str, Any]:
    runtime = gateway.runtime()
    seen = gateway.recent.upstreams
    out = []
    now = time.monotonic()
    for name, group in runtime.upstreams.items():
        activity = seen.get(name)
        out.append(
            {
                "name": name,
                "origin": upstream_origin(group.first.base_url),
                "max_connections": group.config.max_connections,
                "balance": group.config.balance,
                "attempts": group.attempts,
                "usable_targets": group.usable_targets(),
                "targets": [target_state(target, now) for target in group.targets],
                **(activity.as_dict() if activity is not None else {"requests": 0}),
            }
        )
    return {"upstreams": out, "pid": os.getpid(), "since": gateway.started_at}


def target_state(target: UpstreamTarget, now: float) -> dict[str, Any]:
    """One target as this process sees it: its origin (never its path, query or key) and its
    health (``upstream/health.py``)."""
    health = target.health
    if health.active_down:
        state = "down"
    elif health.probation:
        state = "ejected" if now < health.ejected_until else "probation"
    elif now < health.rested_until:
        state = "rested"
    else:
        state = "in service"
    return {
        "name": target.target,
        "origin": upstream_origin(target.base_url),
        "weight": target.weight,
        "state": state,
        "back_in_seconds": round(max(0.0, health.ejected_until - now), 3)
        if health.probation
        else None,
        "ejections": health.ejections,
        "ejected_total": health.ejected_total,
        "consecutive_failures": health.consecutive_failures,
        "failures_total": health.failures_total,
        "outstanding": health.outstanding,
    }


async def _errors(gateway: Gateway, scope: Scope, receive: Receive) -> dict[str, Any]:
    return {"errors": list(gateway.recent.errors), "pid": os.getpid()}


async def _usage(gateway: Gateway, scope: Scope, receive: Receive) -> dict[str, Any]:
    runtime = gateway.runtime()
    accounts = runtime.accounts
    query = parse_query(scope.get("query_string", b""), accounts, accounts.clock.time())
    try:
        report = await usage_report(query, accounts, runtime.limiter)
    except FAILURES as exc:
        raise errors.GatewayError(
            503,
            f"The usage counters could not be read ({type(exc).__name__}); try again shortly.",
            type="api_error",
            code="usage_unavailable",
            headers=[(b"retry-after", b"1")],
        ) from None
    store = "redis" if runtime.config.redis.url else "local"
    return {**report, "store": store, "pid": os.getpid()}


async def _jobs(gateway: Gateway, scope: Scope, receive: Receive) -> dict[str, Any]:
    jobs = gateway.jobs
    if jobs is None:
        return {"enabled": False, "pid": os.getpid()}
    wanted = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("id")
    if wanted:
        try:
            job = await jobs.store.get(wanted[0])
        except STORE_FAILURES:
            raise store_unavailable() from None
        if job is None:
            raise job_not_found(wanted[0])
        # What an operator needs to follow a job, not its content: no bodies, and the webhook
        # URL without its query (it may carry the receiver's token).
        view = job_view(job, body=False)
        if job.webhook_url is not None:
            view["webhook"]["url"] = upstream_origin(job.webhook_url)
        return {"job": {**view, "owner": job.owner, "team": job.team}}
    settings = jobs.settings
    return {
        "enabled": True,
        # The store in use, not the config's wish: the redis section applies at a restart.
        "store": "redis" if isinstance(jobs.store, RedisStore) else "memory",
        "concurrency": settings.concurrency,
        "per_key_concurrency": settings.per_key_concurrency,
        "max_queued_per_key": settings.max_queued_per_key,
        "running": jobs.workers.running,
        "queued": await jobs.queued(),
        "webhooks": jobs.deliveries is not None,
        "pid": os.getpid(),
    }


async def _health(gateway: Gateway, scope: Scope, receive: Receive) -> dict[str, Any]:
    return gateway.health_detail()


async def _reload(gateway: Gateway, scope: Scope, receive: Receive) -> dict[str, Any]:
    started = time.time()
    return await gateway.reload_everywhere(started, redact_with=_secrets(gateway))
