"""One specification, run against the Redis limiter and the local one: same semantics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from gateway.config.model import LimitsSection
from gateway.limits import Limiter, LocalLimiter, Planner, RedisLimiter

from .conftest import RedisServer
from .factories import limits, make_key, plan_for


@pytest.fixture(params=["redis", "local"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[Limiter]:
    if request.param == "local":
        yield LocalLimiter()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    redis_limiter = RedisLimiter(Redis.from_url(server.url), timeout=1.0)
    try:
        yield redis_limiter
    finally:
        await redis_limiter.aclose()
        assert redis_limiter.stats.degraded == 0, redis_limiter.stats.last_error


async def test_a_bucket_admits_its_capacity_then_refuses(limiter: Limiter) -> None:
    plan = plan_for(make_key("demo", limits=limits(60, request_burst=3)))
    decisions = [await limiter.admit(plan) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [(2,), (1,), (0,), (0,)]
    refused = decisions[-1]
    assert refused.kind == "requests"
    assert refused.limiting == 0
    assert 900 <= refused.retry_after_ms <= 1000  # one request per second refills
    assert not refused.degraded


async def test_concurrent_admissions_admit_exactly_the_capacity(limiter: Limiter) -> None:
    plan = plan_for(make_key("demo", limits=limits(1, request_burst=25)))
    decisions = await asyncio.gather(*(limiter.admit(plan) for _ in range(100)))
    assert sum(d.allowed for d in decisions) == 25


async def test_all_buckets_debited_or_none(limiter: Limiter) -> None:
    key = make_key("demo", team="ml", limits=limits(100, 1000))
    section = LimitsSection(teams={"ml": limits(100, 10_000)})
    assert (await limiter.admit(plan_for(key, 800, section=section))).allowed
    refused = await limiter.admit(plan_for(key, 300, section=section))
    assert not refused.allowed
    assert refused.kind == "tokens"
    assert refused.limiting == 1  # the key's own token bucket
    assert refused.remaining == (99, 200, 99, 9200)  # nothing debited
    admitted = await limiter.admit(plan_for(key, 200, section=section))
    assert admitted.allowed
    assert admitted.remaining == (98, 0, 98, 9000)


async def test_team_keys_share_the_team_bucket(limiter: Limiter) -> None:
    a = make_key("a", team="ml", limits=limits(60))
    b = make_key("b", team="ml", limits=limits(60))
    planner = Planner(LimitsSection(teams={"ml": limits(60, request_burst=3)}), [a, b])
    results = [
        (await limiter.admit(planner.charges(key=k, route="chat", model=None, tokens=0))).allowed
        for k in (a, b, a, b)
    ]
    assert results == [True, True, True, False]


async def test_buckets_refill_with_time(limiter: Limiter) -> None:
    plan = plan_for(make_key("demo", limits=limits(1200, request_burst=2)))  # 20 per second
    assert (await limiter.admit(plan)).allowed
    assert (await limiter.admit(plan)).allowed
    refused = await limiter.admit(plan)
    assert not refused.allowed
    assert 1 <= refused.retry_after_ms <= 50
    await asyncio.sleep(refused.retry_after + 0.01)
    again = await limiter.admit(plan)
    assert again.allowed
    assert again.reset_ms[0] > 0


async def test_the_slowest_bucket_sets_retry_after(limiter: Limiter) -> None:
    key = make_key("demo", limits=limits(60, 600, request_burst=1))  # 1 rps, 10 tps
    first = await limiter.admit(plan_for(key, 600))
    assert first.allowed
    refused = await limiter.admit(plan_for(key, 100))
    assert not refused.allowed
    assert refused.kind == "tokens"
    assert 9_900 <= refused.retry_after_ms <= 10_000
    assert 59_900 <= refused.reset_ms[1] <= 60_000


async def test_settle_refunds_unused_tokens(limiter: Limiter) -> None:
    plan = plan_for(make_key("demo", limits=limits(tpm=6000)), 1000)
    decision = await limiter.admit(plan)
    assert decision.remaining == (5000,)
    await limiter.settle(decision, 200)
    after = await limiter.admit(plan_for(make_key("demo", limits=limits(tpm=6000)), 0))
    assert 5800 <= after.remaining[0] <= 5801


async def test_settle_debits_overuse_and_may_go_negative(limiter: Limiter) -> None:
    key = make_key("demo", limits=limits(tpm=600))  # 10 tokens per second
    decision = await limiter.admit(plan_for(key, 500))
    await limiter.settle(decision, 1500)
    refused = await limiter.admit(plan_for(key, 10))
    assert not refused.allowed
    assert -900 <= refused.remaining[0] <= -899
    assert 90_900 <= refused.retry_after_ms <= 91_000
    assert dict(refused.headers())[b"x-ratelimit-remaining-tokens"] == b"0"


async def test_settle_never_refunds_above_capacity(limiter: Limiter) -> None:
    key = make_key("demo", limits=limits(tpm=600))
    decision = await limiter.admit(plan_for(key, 100))
    await limiter.settle(decision, 0)
    await limiter.settle(decision, 0)  # a double settle must not overfill the bucket
    assert (await limiter.admit(plan_for(key, 0))).remaining == (600,)


async def test_settle_without_usage_keeps_the_reservation(limiter: Limiter) -> None:
    key = make_key("demo", limits=limits(tpm=600))
    decision = await limiter.admit(plan_for(key, 100))
    await limiter.settle(decision, None)
    assert (await limiter.admit(plan_for(key, 0))).remaining[0] in (500, 501)


async def test_settling_a_refused_request_changes_nothing(limiter: Limiter) -> None:
    key = make_key("demo", limits=limits(tpm=600))
    refused = await limiter.admit(plan_for(key, 700))
    assert not refused.allowed
    await limiter.settle(refused, 0)
    assert (await limiter.admit(plan_for(key, 0))).remaining == (600,)


async def test_a_request_larger_than_capacity_can_never_pass(limiter: Limiter) -> None:
    decision = await limiter.admit(plan_for(make_key("demo", limits=limits(60, 1000)), 1001))
    assert not decision.allowed
    assert decision.retry_after_ms == -1
    assert decision.kind == "tokens"
    assert decision.remaining == (60, 1000)


async def test_requests_without_tokens_pass_token_debt(limiter: Limiter) -> None:
    key = make_key("demo", limits=limits(60, 600))
    decision = await limiter.admit(plan_for(key, 600))
    await limiter.settle(decision, 1200)
    assert not (await limiter.admit(plan_for(key, 1))).allowed
    assert (await limiter.admit(plan_for(key, 0))).allowed  # e.g. GET /v1/models


async def test_a_zero_rate_blocks_everything(limiter: Limiter) -> None:
    decision = await limiter.admit(plan_for(make_key("demo", limits=limits(0))))
    assert not decision.allowed
    assert decision.retry_after_ms == -1


async def test_a_key_without_limits_is_always_admitted(limiter: Limiter) -> None:
    decision = await limiter.admit(plan_for(make_key("free"), 10**9))
    assert decision.allowed
    assert decision.headers() == []
    await limiter.settle(decision, 5)


async def test_headers_of_an_admission(limiter: Limiter) -> None:
    decision = await limiter.admit(plan_for(make_key("demo", limits=limits(60, 6000)), 100))
    headers = dict(decision.headers())
    assert headers[b"x-ratelimit-limit-requests"] == b"60"
    assert headers[b"x-ratelimit-remaining-requests"] == b"59"
    assert headers[b"x-ratelimit-reset-requests"] == b"1s"
    assert headers[b"x-ratelimit-limit-tokens"] == b"6000"
    assert headers[b"x-ratelimit-remaining-tokens"] == b"5900"
    assert headers[b"x-ratelimit-reset-tokens"] == b"1s"
