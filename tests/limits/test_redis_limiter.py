"""What only the Redis limiter has to show: one round trip, its keys, its clock, its script
cache, and how it behaves when Redis fails and comes back."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from gateway.config.model import LimitsSection, RedisSettings
from gateway.limits import LocalLimiter, RedisLimiter, build_limiter

from .conftest import RedisServer
from .factories import limits, make_key, plan_for, raw_key


async def command_calls(client: Redis) -> dict[str, int]:
    stats: dict[str, Any] = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items()}


async def test_one_evalsha_per_admission(redis_server: RedisServer, redis_client: Redis) -> None:
    limiter = RedisLimiter(Redis.from_url(redis_server.url), timeout=1.0)
    key = make_key("demo", team="ml", limits=limits(600, 60_000))
    plan = plan_for(key, 10, section=LimitsSection(teams={"ml": limits(600)}))
    try:
        await limiter.admit(plan)  # connects (HELLO / CLIENT SETINFO) and loads the script
        await redis_client.config_resetstat()
        for _ in range(10):
            assert (await limiter.admit(plan)).allowed
        calls = await command_calls(redis_client)
        script_calls = {n: calls.pop(n) for n in ("time", "hmget", "hset", "pexpire")}
        calls.pop("config|resetstat", None)
        calls.pop("info", None)
        assert calls == {"evalsha": 10}
        assert script_calls == {"time": 10, "hmget": 30, "hset": 30, "pexpire": 30}
    finally:
        await limiter.aclose()


async def test_concurrent_admissions_from_many_clients_are_exact(
    redis_server: RedisServer,
) -> None:
    limiters = [RedisLimiter(Redis.from_url(redis_server.url), timeout=2.0) for _ in range(4)]
    plan = plan_for(make_key("demo", limits=limits(1, request_burst=60, tpm=1000)), 3)
    try:
        decisions = await asyncio.gather(
            *(limiter.admit(plan) for limiter in limiters for _ in range(50))
        )
    finally:
        for limiter in limiters:
            await limiter.aclose()
    assert sum(d.allowed for d in decisions) == 60
    assert {d.kind for d in decisions if not d.allowed} == {"requests"}


async def test_keys_have_a_hash_tag_no_raw_key_and_a_ttl(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    limiter = RedisLimiter(Redis.from_url(redis_server.url), timeout=1.0)
    key = make_key("demo", team="ml", limits=limits(60, 6000))
    section = LimitsSection(teams={"ml": limits(600)}, routes={"chat": limits(30)})
    try:
        assert (await limiter.admit(plan_for(key, 600, section=section))).allowed
    finally:
        await limiter.aclose()
    names = sorted(k.decode() if isinstance(k, bytes) else k for k in await redis_client.keys("*"))
    assert len(names) == 4
    assert len({key_slot(name.encode()) for name in names}) == 1
    for name in names:
        assert name.startswith("rl:{t:ml}:")
        assert raw_key("demo") not in name
        assert key.hash not in name
    ttls = {name: await redis_client.pttl(name) for name in names}
    # Each key lives about as long as its bucket takes to refill: then it is full anyway.
    assert 900 <= ttls[f"rl:{{t:ml}}:k:{key.hash[7:23]}:rpm"] <= 1000  # 1 of 60 at 1/s
    assert 5_900 <= ttls[f"rl:{{t:ml}}:k:{key.hash[7:23]}:tpm"] <= 6_000  # 600 at 100/s
    assert 1_900 <= ttls[f"rl:{{t:ml}}:k:{key.hash[7:23]}:r:chat:rpm"] <= 2_000
    assert 90 <= ttls["rl:{t:ml}:rpm"] <= 100


async def test_the_clock_is_redis_time(redis_server: RedisServer, redis_client: Redis) -> None:
    # The limiter's own clock runs wildly wrong: the buckets must not notice.
    limiter = RedisLimiter(Redis.from_url(redis_server.url), timeout=1.0, clock=lambda: 1e9)
    key = make_key("demo", limits=limits(60))
    try:
        assert (await limiter.admit(plan_for(key))).allowed
        seconds, micros = await redis_client.time()
        stored = float(await redis_client.hget(f"rl:{{k:{key.hash[7:23]}}}:rpm", "t") or 0)
        assert abs(stored - (seconds * 1000 + micros / 1000)) < 1000
    finally:
        await limiter.aclose()


async def test_a_flushed_script_cache_falls_back_to_eval(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    limiter = RedisLimiter(Redis.from_url(redis_server.url), timeout=1.0)
    plan = plan_for(make_key("demo", limits=limits(60, request_burst=3)))
    try:
        assert (await limiter.admit(plan)).remaining == (2,)
        await redis_client.script_flush()
        await redis_client.config_resetstat()
        decision = await limiter.admit(plan)
        assert decision.allowed
        assert not decision.degraded
        assert decision.remaining == (1,)
        calls = await command_calls(redis_client)
        assert (calls["evalsha"], calls["eval"]) == (1, 1)
        assert (await limiter.admit(plan)).remaining == (0,)  # EVAL cached it again
        assert (await command_calls(redis_client))["evalsha"] == 2
        assert limiter.stats.redis_errors == 0
    finally:
        await limiter.aclose()


async def test_a_redis_that_refuses_evalsha_gets_eval(tmp_path: Path) -> None:
    # As behind a proxy that does not pass EVALSHA (or SCRIPT) on.
    server = RedisServer(tmp_path / "r", None, "--rename-command", "EVALSHA", "")
    server.start()
    limiter = RedisLimiter(Redis.from_url(server.url), timeout=1.0)
    plan = plan_for(make_key("demo", limits=limits(60, 600)), 100)
    try:
        first = await limiter.admit(plan)
        second = await limiter.admit(plan)
        assert (first.remaining, second.remaining) == ((59, 500), (58, 400))
        await limiter.settle(second, 0)
        assert (await limiter.admit(plan)).remaining == (57, 400)
        assert limiter.stats.degraded == 0
    finally:
        await limiter.aclose()
        server.stop()


async def timed_admissions(limiter: RedisLimiter, plan: Any, n: int) -> list[Any]:
    decisions = []
    for _ in range(n):
        start = time.perf_counter()
        decisions.append(await limiter.admit(plan))
        assert time.perf_counter() - start < 0.005, "a call in the breaker window took >= 5 ms"
    return decisions


@pytest.mark.parametrize("mode", ["open", "closed", "local"])
async def test_redis_dies_then_the_failure_mode_applies_and_recovery_is_automatic(
    redis_server: RedisServer, mode: str
) -> None:
    settings = RedisSettings(
        url=redis_server.url, on_failure=mode, timeout_ms=50, breaker_seconds=0.5
    )
    limiter = build_limiter(settings)
    assert isinstance(limiter, RedisLimiter)
    plan = plan_for(make_key("demo", limits=limits(60, request_burst=3)))
    try:
        healthy = await limiter.admit(plan)
        assert healthy.allowed
        assert not healthy.degraded
        assert healthy.remaining == (2,)

        redis_server.stop()
        # Three failures in a row (breaker_failures) open the breaker; each falls back alone.
        decisions = []
        states = []
        for _ in range(3):
            decisions.append(await limiter.admit(plan))
            states.append(limiter.breaker)
        assert states == ["closed", "closed", "open"]
        decisions += await timed_admissions(limiter, plan, 2)
        assert all(d.degraded for d in decisions)
        if mode == "open":  # admitted, and counted locally so the headers mean something
            assert [d.allowed for d in decisions] == [True] * 5
            # Counted on from the 2 Redis left, not from a full bucket.
            assert [d.remaining for d in decisions] == [(1,), (0,), (-1,), (-2,), (-3,)]
            assert dict(decisions[-1].headers())[b"x-ratelimit-remaining-requests"] == b"0"
        elif mode == "closed":  # refused with 503 and Retry-After
            assert not any(d.allowed for d in decisions)
            error = decisions[-1].error()
            assert error.status == 503
            assert dict(error.headers)[b"retry-after"] == b"1"
            assert 0 < decisions[-1].retry_after_ms <= 500
        else:  # per-process buckets, enforced, from the level Redis last reported
            assert [d.allowed for d in decisions] == [True, True, False, False, False]
            assert decisions[-1].error().status == 429
        assert limiter.stats.degraded == 5
        assert limiter.stats.redis_errors == 3
        assert limiter.stats.breaker_trips == 1
        assert limiter.stats.last_error == "ConnectionError"

        redis_server.start()  # same port, empty
        await asyncio.sleep(0.55)
        recovered = await limiter.admit(plan)
        assert recovered.allowed
        assert not recovered.degraded
        assert recovered.remaining == (2,)  # Redis' own, fresh bucket
        assert limiter.breaker == "closed"
    finally:
        await limiter.aclose()


async def test_one_failed_call_falls_back_alone_and_redis_decides_the_next(
    redis_server: RedisServer,
) -> None:
    limiter = build_limiter(RedisSettings(url=redis_server.url, timeout_ms=50))
    assert isinstance(limiter, RedisLimiter)
    plan = plan_for(make_key("demo", limits=limits(60, request_burst=3)))
    try:
        assert (await limiter.admit(plan)).remaining == (2,)
        redis_server.stop()
        assert (await limiter.admit(plan)).degraded
        redis_server.start()  # empty again
        after = await limiter.admit(plan)
        assert not after.degraded
        assert after.remaining == (2,)
        assert (limiter.breaker, limiter.stats.breaker_trips) == ("closed", 0)
    finally:
        await limiter.aclose()


async def test_the_local_fallback_continues_from_the_levels_redis_reported(
    redis_server: RedisServer,
) -> None:
    # A key Redis has drained stays drained when Redis goes away: the fallback does not hand it a
    # fresh burst on top of what Redis already admitted (per process, with several gateways).
    limiter = build_limiter(RedisSettings(url=redis_server.url, timeout_ms=50))
    assert isinstance(limiter, RedisLimiter)
    drained = plan_for(make_key("drained", limits=limits(1, request_burst=3)))
    half = plan_for(make_key("half", limits=limits(1, request_burst=4)))
    unseen = plan_for(make_key("unseen", limits=limits(1, request_burst=2)))
    try:
        assert [(await limiter.admit(drained)).allowed for _ in range(4)] == [True] * 3 + [False]
        assert [(await limiter.admit(half)).remaining for _ in range(2)] == [(3,), (2,)]
        redis_server.stop()
        assert not (await limiter.admit(drained)).allowed
        assert [(await limiter.admit(half)).allowed for _ in range(3)] == [True, True, False]
        # A key Redis never reported on gets the per-process bucket, full.
        assert [(await limiter.admit(unseen)).allowed for _ in range(3)] == [True, True, False]
        assert limiter.stats.degraded == 7
    finally:
        await limiter.aclose()


async def test_redis_is_asked_again_within_a_second_of_answering_again(
    redis_server: RedisServer,
) -> None:
    limiter = build_limiter(RedisSettings(url=redis_server.url, timeout_ms=50))  # defaults
    assert isinstance(limiter, RedisLimiter)
    plan = plan_for(make_key("demo", limits=limits(6000)))
    try:
        redis_server.stop()
        for _ in range(3):
            await limiter.admit(plan)
        assert limiter.breaker_open
        redis_server.start()
        back = time.monotonic()
        while (await limiter.admit(plan)).degraded:  # traffic every 20 ms
            await asyncio.sleep(0.02)
        assert time.monotonic() - back < 1.1
        assert limiter.breaker == "closed"
    finally:
        await limiter.aclose()


async def test_a_hung_redis_costs_a_few_timeouts_then_nothing(redis_server: RedisServer) -> None:
    limiter = build_limiter(RedisSettings(url=redis_server.url, timeout_ms=50, breaker_seconds=0.3))
    assert isinstance(limiter, RedisLimiter)
    plan = plan_for(make_key("demo", limits=limits(60)))
    process = redis_server.process
    assert process is not None
    try:
        assert not (await limiter.admit(plan)).degraded
        process.send_signal(signal.SIGSTOP)
        try:
            for _ in range(3):  # breaker_failures
                start = time.perf_counter()
                decision = await limiter.admit(plan)
                assert 0.05 <= time.perf_counter() - start < 0.25
                assert decision.degraded
                assert decision.allowed  # on_failure defaults to local
            assert limiter.stats.last_error == "TimeoutError"
            await timed_admissions(limiter, plan, 5)
        finally:
            process.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.35)
        assert not (await limiter.admit(plan)).degraded
    finally:
        await limiter.aclose()


async def test_only_one_request_probes_a_recovering_redis(redis_server: RedisServer) -> None:
    limiter = build_limiter(
        RedisSettings(url=redis_server.url, timeout_ms=200, breaker_failures=1, breaker_seconds=0.2)
    )
    assert isinstance(limiter, RedisLimiter)
    plan = plan_for(make_key("demo", limits=limits(60)))
    try:
        redis_server.stop()
        assert (await limiter.admit(plan)).degraded
        assert limiter.breaker == "open"
        redis_server.start()
        await asyncio.sleep(0.25)
        decisions = await asyncio.gather(*(limiter.admit(plan) for _ in range(10)))
        assert [d.degraded for d in decisions] == [False] + [True] * 9
        assert not (await limiter.admit(plan)).degraded
    finally:
        await limiter.aclose()


async def test_settle_survives_a_dead_redis(redis_server: RedisServer) -> None:
    limiter = build_limiter(RedisSettings(url=redis_server.url, timeout_ms=50))
    plan = plan_for(make_key("demo", limits=limits(tpm=6000)), 100)
    try:
        decision = await limiter.admit(plan)
        redis_server.stop()
        await limiter.settle(decision, 10)  # does not raise
        assert limiter.stats.redis_errors == 1
    finally:
        await limiter.aclose()


async def test_degraded_admissions_settle_in_the_local_limiter(redis_server: RedisServer) -> None:
    limiter = build_limiter(RedisSettings(url=redis_server.url, timeout_ms=50))
    assert isinstance(limiter, RedisLimiter)
    key = make_key("demo", limits=limits(tpm=6000))
    try:
        redis_server.stop()
        decision = await limiter.admit(plan_for(key, 1000))
        assert decision.degraded
        assert decision.remaining == (5000,)
        await limiter.settle(decision, 100)
        after = limiter.local.admit_now(plan_for(key, 0))
        assert after.remaining[0] >= 5900
    finally:
        await limiter.aclose()


async def test_settlements_in_redis_reach_the_fallbacks_copy_too(redis_server: RedisServer) -> None:
    limiter = build_limiter(RedisSettings(url=redis_server.url, timeout_ms=50))
    assert isinstance(limiter, RedisLimiter)
    key = make_key("demo", limits=limits(tpm=1, token_burst=6000))
    try:
        decision = await limiter.admit(plan_for(key, 1000))
        assert decision.remaining == (5000,)
        await limiter.settle(decision, 100)  # used 100 of the 1000 reserved: Redis has 5900
        redis_server.stop()
        fallback = await limiter.admit(plan_for(key, 0))
        assert fallback.degraded
        assert fallback.remaining == (5900,)
    finally:
        await limiter.aclose()


async def test_build_limiter_without_redis_is_local() -> None:
    limiter = build_limiter(RedisSettings())
    assert isinstance(limiter, LocalLimiter)
    assert (await limiter.admit(plan_for(make_key("demo", limits=limits(1))))).allowed
    await limiter.aclose()
