"""Liveness, readiness, and the health detail behind them for the admin API.

``/healthz`` (also ``/health``, ``/live``) says the process answers; ``/readyz`` (also
``/ready``) says it should get traffic: a config loaded, pools up, not draining, and, when
``server.unready_without_targets`` asks, every upstream that traffic can reach with a usable
target (``no_usable_target`` otherwise: all its targets ejected or down by active checks).
Their bodies carry a status word and nothing else: anyone may call them, and counts,
generations, error classes or upstream names there tell an outsider about the deployment. The
detail is ``health_detail``, behind an admin key (``GET /admin/health``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.runtime import Runtime


def readiness(gateway: Gateway) -> tuple[int, str]:
    runtime = gateway.current_runtime()
    if runtime is None:
        return 503, "starting"
    if gateway.draining:
        return 503, "draining"
    if runtime.config.server.unready_without_targets and unusable_upstreams(runtime):
        return 503, "no_usable_target"
    return 200, "ready"


def served_upstreams(runtime: Runtime) -> set[str]:
    """The upstreams requests can reach: those of routes, of model aliases and of their
    fallback steps. An upstream nothing uses does not make the gateway unready."""
    names = {route.upstream for route in runtime.config.routes}
    for alias in runtime.models.values():
        names.add(alias.upstream)
        names.update(step.upstream for step in alias.fallbacks)
    return names


def unusable_upstreams(runtime: Runtime) -> list[str]:
    """Served upstreams none of whose targets is in service (ejected or down), by name."""
    served = served_upstreams(runtime)
    return sorted(
        name
        for name, group in runtime.upstreams.items()
        if name in served and group.usable_targets() == 0
    )


def health_detail(gateway: Gateway) -> dict[str, Any]:
    runtime = gateway.current_runtime()
    status, word = readiness(gateway)
    body: dict[str, Any] = {"status": word, "ready": status == 200, "pid": os.getpid()}
    if runtime is not None:
        body["counts"] = {
            "routes": len(runtime.routes.endpoints),
            "upstreams": len(runtime.upstreams),
            "keys": len(runtime.keys),
        }
        # Names and counts only: an upstream's URL and keys never appear here.
        body["upstreams"] = {
            name: {"usable_targets": group.usable_targets(), "targets": len(group.targets)}
            for name, group in runtime.upstreams.items()
        }
        body["unusable_upstreams"] = unusable_upstreams(runtime)
    sync = gateway.health_sync
    if sync is not None:
        # Ejections shared between replicas (upstream/health_sync.py): the failure's class only.
        body["shared_ejections"] = {
            "store": "redis",
            "failing": sync.failing,
            "errors": sync.errors,
            "last_error": sync.last_error,
        }
    stats = gateway.limiter_stats
    redis = runtime is not None and runtime.config.redis.url is not None
    body["limits"] = {
        "store": "redis" if redis else "local (per process)",
        "admitted": stats.admitted,
        "refused": stats.refused,
        "degraded_decisions": stats.degraded,
        "redis_errors": stats.redis_errors,
        "breaker_trips": stats.breaker_trips,
        # Settled requests whose usage and spend wait for Redis, and those dropped meanwhile.
        "usage_pending": stats.usage_pending,
        "usage_dropped": stats.usage_dropped,
        # closed, open or half-open; and the last failure's class and time only: its text may
        # name hosts.
        "breaker": stats.breaker if redis else None,
        "last_error": (
            None
            if stats.last_error is None
            else {"type": stats.last_error, "at": stats.last_error_at}
        ),
    }
    body["connections"] = gateway.connection_stats.as_dict()
    bodies = gateway.body_budget
    body["request_bodies"] = {
        "held_bytes": bodies.capacity - bodies.available,
        "capacity_bytes": bodies.capacity,
    }
    # Forwarded headers that were ignored: malformed values, or sent by a peer outside
    # trusted_proxies (a spoofing attempt, or a proxy missing from the list).
    forwarded = gateway.forwarded_stats
    body["forwarded_headers_ignored"] = {
        "malformed": dict(forwarded.malformed),
        "untrusted_peer": forwarded.untrusted,
    }
    body["workers"] = gateway.workers.records()
    return body
