"""One specification, run against every limiter the gateway builds: same semantics.

``build_limiter`` picks the client from the settings, so the specification runs through it,
once per client it can pick: the lean client (``gateway/limits/resp.py``) for ``redis://``,
redis-py's ``Redis`` for ``unix://`` and ``rediss://`` (and for ``redis://`` when the benchmark
asks for it), ``RedisCluster`` for ``cluster: true``, and the local limiter without a URL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway.config.model import LimitsSection, RedisSettings
from gateway.limits import Limiter, LocalLimiter, Planner, RedisLimiter, build_limiter
from gateway.limits.redis_limiter import CLIENT_OVERRIDE_ENV
from gateway.limits.resp import RespClient

from .conftest import RedisServer, TlsFiles
from .factories import limits, make_key, plan_for

# Generous: the specification is about decisions, not latency (tests/limits/test_redis_timeouts.py
# is about latency), and must hold on a busy machine, where a hundred concurrent calls through
# redis-py over TLS open a hundred connections, each handshake inside its call's timeout: seconds
# in all on a loaded two-core machine.
TIMEOUT_MS = 30_000


def _server(
    request: pytest.FixtureRequest,
    *,
    unix_socket: Path | None = None,
    tls: TlsFiles | None = None,
) -> RedisServer:
    tmp_path: Path = request.getfixturevalue("tmp_path")
    server = RedisServer(tmp_path / "redis", unix_socket=unix_socket, tls=tls)
    server.start()
    request.addfinalizer(server.stop)
    return server


def _redis_lean(request: pytest.FixtureRequest) -> tuple[RedisSettings, type]:
    return RedisSettings(url=_server(request).url, timeout_ms=TIMEOUT_MS), RespClient


def _redis_redis_py(request: pytest.FixtureRequest) -> tuple[RedisSettings, type]:
    request.getfixturevalue("monkeypatch").setenv(CLIENT_OVERRIDE_ENV, "redis-py")
    return RedisSettings(url=_server(request).url, timeout_ms=TIMEOUT_MS), Redis


def _unix(request: pytest.FixtureRequest) -> tuple[RedisSettings, type]:
    path = request.getfixturevalue("short_dir") / "redis.sock"
    url = _server(request, unix_socket=path).unix_url
    return RedisSettings(url=url, timeout_ms=TIMEOUT_MS), Redis


def _rediss(request: pytest.FixtureRequest) -> tuple[RedisSettings, type]:
    url = _server(request, tls=request.getfixturevalue("tls_files")).tls_url
    return RedisSettings(url=url, timeout_ms=TIMEOUT_MS), Redis


def _cluster(request: pytest.FixtureRequest) -> tuple[RedisSettings, type]:
    nodes: list[RedisServer] = request.getfixturevalue("flushed_redis_cluster")
    return RedisSettings(url=nodes[0].url, cluster=True, timeout_ms=TIMEOUT_MS), RedisCluster


CLIENTS: dict[str, Callable[[pytest.FixtureRequest], tuple[RedisSettings, type]]] = {
    "redis-lean": _redis_lean,
    "redis-redis-py": _redis_redis_py,
    "unix-redis-py": _unix,
    "rediss-redis-py": _rediss,
    "cluster-redis-py": _cluster,
}


@pytest.fixture(params=["local", *CLIENTS])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[Limiter]:
    if request.param == "local":
        local = build_limiter(RedisSettings())
        assert isinstance(local, LocalLimiter)
        yield local
        return
    settings, client_type = CLIENTS[request.param](request)
    redis_limiter = build_limiter(settings)
    assert isinstance(redis_limiter, RedisLimiter)
    assert type(redis_limiter.client) is client_type  # the client this parameter stands for
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


async def test_more_concurrent_admissions_than_a_connection_pool_holds_are_all_decided(
    limiter: Limiter,
) -> None:
    # redis-py's pools hold 100 connections (per node): a gateway has more requests in flight.
    plan = plan_for(make_key("demo", limits=limits(1, request_burst=250)))
    decisions = await asyncio.gather(*(limiter.admit(plan) for _ in range(400)))
    assert not any(d.degraded for d in decisions)
    assert sum(d.allowed for d in decisions) == 250


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
    await asyncio.sleep(refused.retry_after_ms / 1000 + 0.01)
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
