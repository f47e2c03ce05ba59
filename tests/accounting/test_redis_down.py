"""Budgets and usage while Redis is down, and after it comes back.

Budgets follow ``redis.on_failure`` as the limits do (``closed``: 503; ``local``: this process
decides from what Redis last reported; ``open``: admitted and counted). A request settled while
Redis is down keeps its usage and spend in the process, and they are added to Redis once it
answers again, so the shared totals still add up.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest

from gateway.accounting.accounts import Accounts
from gateway.accounting.periods import PeriodClock
from gateway.config.model import GatewayConfig, RedisSettings
from gateway.limits import RedisLimiter, build_limiter
from gateway.openai.usage import Usage
from tests.limits.conftest import RedisServer

MOMENT = dt.datetime(2026, 12, 3, 14, 30, tzinfo=dt.UTC).timestamp()
CONFIG = GatewayConfig.model_validate(
    {
        "keys": [
            {
                "name": "alice",
                "hash": "sha256:" + "a" * 64,
                "limits": {"budget": {"usd_per_day": 0.001}},
            }
        ],
        "prices": {"models": {"gpt-4o": {"input": 1, "output": 1}}},
    }
)
USAGE = Usage(input_tokens=100, output_tokens=50, total_tokens=150)  # 150 micro-dollars


def limiter_for(server: RedisServer, on_failure: str) -> RedisLimiter:
    settings = RedisSettings.model_validate(
        {
            "url": server.url,
            "on_failure": on_failure,
            "timeout_ms": 200,
            "breaker_failures": 1,
            "breaker_seconds": 0.05,
        }
    )
    limiter = build_limiter(settings)
    assert isinstance(limiter, RedisLimiter)
    return limiter


@pytest.fixture
def accounts() -> Accounts:
    return Accounts(CONFIG, clock=PeriodClock(lambda: MOMENT))


@pytest.mark.parametrize(
    ("on_failure", "allowed", "unavailable"),
    [("closed", False, True), ("local", False, False), ("open", True, False)],
)
async def test_budgets_follow_on_failure(
    tmp_path: Path, accounts: Accounts, on_failure: str, allowed: bool, unavailable: bool
) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    limiter = limiter_for(server, on_failure)
    try:
        plan = accounts.keys["alice"].spend_plan(600, accounts.clock.now())
        assert (await limiter.reserve(plan)).allowed  # Redis: 600 of 1,000
        server.stop()
        decision = await limiter.reserve(plan)
        assert decision.degraded
        # 'local' continues from the 600 Redis reported: 1,200 would pass the budget.
        assert (decision.allowed, decision.unavailable) == (allowed, unavailable)
        if unavailable:
            assert decision.error(MOMENT).status == 503
    finally:
        server.stop()
        await limiter.aclose()


async def test_usage_settled_while_redis_is_down_reaches_it_once_it_is_back(
    tmp_path: Path, accounts: Accounts
) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    limiter = limiter_for(server, "local")
    alice = accounts.keys["alice"]
    periods = accounts.clock.now()
    try:
        reserved = await limiter.reserve(alice.spend_plan(400, periods))  # in Redis
        server.stop()
        local = await limiter.reserve(alice.spend_plan(300, periods))  # in this process
        assert local.allowed
        assert local.degraded
        for spend in (reserved, local):
            entry, _ = accounts.entry(
                alice, model="gpt-4o", answered_model=None, usage=USAGE, failed=False, spend=spend
            )
            await limiter.settle(None, None, entry)
        assert limiter.stats.usage_pending == 2
        server.start()  # empty: what Redis held before is gone, as after a crash
        await asyncio.sleep(0.06)  # the breaker's cooldown: the next settle probes Redis
        entry, _ = accounts.entry(
            alice, model="gpt-4o", answered_model=None, usage=USAGE, failed=False, spend=None
        )
        await limiter.settle(None, None, entry)  # succeeds, and flushes what waited
        for _ in range(100):
            if limiter.stats.usage_pending == 0:
                break
            await asyncio.sleep(0.01)
        assert limiter.stats.usage_pending == 0
        hashes = await limiter.read_hashes(alice.usage_keys(periods))
        assert all(
            h == {"gpt-4o|req": 3, "gpt-4o|in": 300, "gpt-4o|out": 150, "gpt-4o|usd": 450}
            for h in hashes
        ), hashes
        # The spend counter: the first request's correction (150 - 400) and the second's whole
        # cost (Redis never saw its reservation) on an empty Redis.
        [day] = await limiter.read_counters(reserved.plan.keys)
        assert day == (150 - 400) + 150
    finally:
        server.stop()
        await limiter.aclose()
