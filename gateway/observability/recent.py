"""What this process saw lately, for the admin API and the status page: per-upstream health and
the last errors. An observer of finished requests, like the access log.

Bounded by construction: a fixed window of latencies per configured upstream, a fixed number of
recent errors. Nothing here carries a key, a body or a URL: names, statuses, kinds and times.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.context import RequestContext

LATENCY_WINDOW = 200  # the last N upstream response times per upstream
RECENT_ERRORS = 50


@dataclass(slots=True)
class UpstreamActivity:
    requests: int = 0
    failures: int = 0  # upstream errors and 5xx answers
    in_flight: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    last_ok_at: float | None = None
    latencies: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=LATENCY_WINDOW)
    )

    def as_dict(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        return {
            "requests": self.requests,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "last_ok_at": self.last_ok_at,
            "time_to_first_byte_ms": {
                "p50": _quantile_ms(ordered, 0.5),
                "p99": _quantile_ms(ordered, 0.99),
                "samples": len(ordered),
            },
        }


def _quantile_ms(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)


class RecentActivity:
    """Observer: rolling upstream health and the last errors of this process."""

    def __init__(self) -> None:
        self.upstreams: dict[str, UpstreamActivity] = {}
        self.errors: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_ERRORS)

    def __call__(self, context: RequestContext) -> None:
        if context.own:
            return
        failed = context.gateway_error is not None or context.status >= 500
        upstream = context.upstream
        if upstream is not None and (
            context.upstream_seconds is not None or context.upstream_error is not None
        ):
            activity = self.upstreams.get(upstream)
            if activity is None:
                activity = self.upstreams[upstream] = UpstreamActivity()
            activity.requests += 1
            now = time.time()
            if context.upstream_seconds is not None:
                activity.latencies.append(context.upstream_seconds)
            if context.upstream_error is not None or context.status >= 500:
                activity.failures += 1
                activity.last_error = context.upstream_error or f"status {context.status}"
                activity.last_error_at = now
            else:
                activity.last_ok_at = now
            failed = failed or context.upstream_error is not None
        if failed:
            self.errors.appendleft(
                {
                    "at": time.time(),
                    "request_id": context.request_id,
                    "route": context.route,
                    "key": context.key,
                    "upstream": context.upstream,
                    "status": context.status,
                    "upstream_error": context.upstream_error,
                    "error": context.gateway_error,
                }
            )
