"""Rate limits: per-key token buckets for requests and LLM tokens (docs/design.md §3 "Limits").

How the proxy uses them, per request::

    spend = await limiter.reserve(account.spend_plan(cost, periods))  # only with a budget
    if not spend.allowed:
        raise spend.error(now)  # 429 budget_exceeded, before any rate limit is charged
    plan = planner.charges(key=key, route=route, model=model, tokens=estimate_tokens(body, d))
    decision = await limiter.admit(plan)  # one Redis round trip; all buckets debited or none
    if not decision.allowed:
        raise decision.error()  # 429 (or 503 when Redis is down and on_failure is 'closed')
    if decision.wait_ms:  # limits.max_wait: admitted for a slot in the future
        waited = await wait_for_slot(limiter, decision, receive, context)  # or gives it back
    ...  # relay, feeding every chunk to a UsageTap
    # off the hot path, one call: the buckets' correction, usage counters, budget correction
    await limiter.settle(decision, usage.total_tokens if usage else None, entry)

and adds ``decision.headers(waited)`` to the response.
"""

from gateway.limits.buckets import (
    QUEUE_WAIT_HEADER,
    RATELIMIT_HEADERS,
    Bucket,
    BucketSet,
    Charge,
    Decision,
    Kind,
    Plan,
    Scheduled,
    format_duration,
)
from gateway.limits.limiter import Limiter, LimiterStats
from gateway.limits.local_limiter import LocalLimiter
from gateway.limits.plan import Planner
from gateway.limits.redis_limiter import RedisLimiter, build_limiter
from gateway.limits.waiting import WaitingRoom, wait_for_slot

__all__ = [
    "QUEUE_WAIT_HEADER",
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
    "Scheduled",
    "WaitingRoom",
    "build_limiter",
    "format_duration",
    "wait_for_slot",
]
