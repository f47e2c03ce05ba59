"""Four OS processes, each with its own client, hammer one key through one real Redis."""

from __future__ import annotations

import asyncio
import multiprocessing
import time

from redis.asyncio import Redis

from gateway.limits import RedisLimiter

from .conftest import RedisServer
from .factories import limits, make_key, plan_for

CAPACITY = 20
PER_SECOND = 10
DURATION = 1.0


def hammer(url: str, start_at: float) -> tuple[int, int]:
    """Admit as fast as possible during the window; return (admitted, refused)."""

    async def run() -> tuple[int, int]:
        limiter = RedisLimiter(Redis.from_url(url), timeout=1.0)
        plan = plan_for(make_key("shared", limits=limits(PER_SECOND * 60, request_burst=CAPACITY)))
        admitted = refused = 0
        try:
            await asyncio.sleep(max(0.0, start_at - time.time()))
            while time.time() < start_at + DURATION:
                decisions = await asyncio.gather(*(limiter.admit(plan) for _ in range(8)))
                for decision in decisions:
                    assert not decision.degraded, limiter.stats.last_error
                    if decision.allowed:
                        admitted += 1
                    else:
                        refused += 1
        finally:
            await limiter.aclose()
        return admitted, refused

    return asyncio.run(run())


def test_processes_never_exceed_capacity_plus_refill(redis_server: RedisServer) -> None:
    context = multiprocessing.get_context("spawn")
    start_at = time.time() + 2.0  # time for the children to start and import
    with context.Pool(4) as pool:
        results = pool.starmap(hammer, [(redis_server.url, start_at)] * 4)
    admitted = sum(a for a, _ in results)
    refused = sum(r for _, r in results)
    assert all(a > 0 for a, _ in results)  # every process took part
    assert refused > 0
    # The burst, plus what refills during the window (and one call's latency after it); the
    # lower bound is loose because four processes on two cores start their windows unevenly.
    assert admitted >= CAPACITY + PER_SECOND * DURATION / 2, results
    assert admitted <= CAPACITY + PER_SECOND * (DURATION + 0.1) + 1, results
