"""Rate limits: per-key token buckets for requests and LLM tokens (docs/design.md §3 "Limits").

How the proxy uses them, per request::

    plan = planner.charges(key=key, route=route, model=model, tokens=estimate_tokens(body, d))
    decision = await limiter.admit(plan)  # one Redis round trip; all buckets debited or none
    if not decision.allowed:
        raise decision.error()  # 429 (or 503 when Redis is down and on_failure is 'closed')
    ...  # relay, feeding every chunk to a UsageTap
    await limiter.settle(decision, usage.total_tokens if usage else None)  # off the hot path

and adds ``decision.headers()`` to the response.
"""

from gateway.limits.buckets import (
    RATELIMIT_HEADERS,
    Bucket,
    BucketSet,
    Charge,
    Decision,
    Kind,
    Plan,
    format_duration,
)
from gateway.limits.limiter import Limiter, LimiterStats
from gateway.limits.local_limiter import LocalLimiter
from gateway.limits.plan import Planner
from gateway.limits.redis_limiter import RedisLimiter, build_limiter

__all__ = [
    "RATELIMIT_HEADERS",
    "Bucket",
    "BucketSet",
    "Charge",
    "Decision",
    "Kind",
    "Limiter",
    "LimiterStats",
    "LocalLimiter",
    "Plan",
    "Planner",
    "RedisLimiter",
    "build_limiter",
    "format_duration",
]
