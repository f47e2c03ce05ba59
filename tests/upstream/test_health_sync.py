"""Ejections shared between replicas through Redis (``gateway/upstream/health_sync.py``).

Two "replicas" are two snapshots of one config, each with its own ``HealthRegistry``, and each
with its own sync and its own client to one real redis-server this test starts (or a real
three-node Redis Cluster). Rounds are driven one at a time (``tick``) where the test counts
them; the outage test runs the background tasks as the gateway does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from gateway.config.loader import parse_config_text
from gateway.config.model import RedisSettings
from gateway.limits import LocalLimiter, RedisLimiter, build_limiter
from gateway.runtime import Runtime, build_runtime
from gateway.upstream.health import HealthRegistry
from gateway.upstream.health_sync import HealthSync, shared_key
from gateway.upstream.targets import UpstreamTarget
from tests.support.redisserver import RedisServer, running_cluster
from tests.support.redisserver import redis_server_fixture as redis_server_fixture
from tests.support.standin import StandInUpstream, in_process_gateway

INTERVAL = 0.05
CONFIG = """
upstreams:
  llm:
    targets:
      - {name: a, base_url: "http://a.test/v1"}
      - {name: b, base_url: "http://b.test/v1"}
      - {name: c, base_url: "http://c.test/v1"}
    outlier: {consecutive_failures: 1, base_ejection: %s, max_ejection: 300,
              max_ejected_percent: 50}
  solo:
    base_url: "http://solo.test/v1"
routes:
  - {name: chat, path: /v1/chat/completions, upstream: llm}
"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def replica(base_ejection: float = 30.0, clock: Callable[[], float] = time.monotonic) -> Runtime:
    config = parse_config_text(CONFIG % base_ejection)
    return build_runtime(
        config, StandInUpstream().factory, LocalLimiter(), health=HealthRegistry(clock=clock)
    )


def target(runtime: Runtime, name: str) -> UpstreamTarget:
    return next(t for t in runtime.upstreams["llm"].targets if t.target == name)


def eject(runtime: Runtime, name: str) -> float:
    group = runtime.upstreams["llm"]
    seconds = target(runtime, name).health.failed(False, group.may_eject)
    assert seconds is not None
    return seconds


def in_service(runtime: Runtime, name: str) -> bool:
    return target(runtime, name).health.in_service()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A plain client to look at what the syncs wrote."""
    client = Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


def lean(url: str) -> RedisLimiter:
    limiter = build_limiter(RedisSettings(url=url, timeout_ms=500))
    assert isinstance(limiter, RedisLimiter)
    return limiter


def redis_py(url: str) -> RedisLimiter:
    return RedisLimiter(Redis.from_url(url), timeout=0.5)


@pytest.mark.parametrize("client", [lean, redis_py], ids=["lean", "redis-py"])
async def test_an_ejection_in_one_replica_is_adopted_by_another_after_one_round_of_each(
    redis_server: RedisServer, redis: Redis, client: Callable[[str], RedisLimiter]
) -> None:
    a, b = replica(), replica()
    store_a, store_b = client(redis_server.url), client(redis_server.url)
    sync_a = HealthSync(store_a, lambda: a, interval=INTERVAL)
    sync_b = HealthSync(store_b, lambda: b, interval=INTERVAL)
    try:
        assert await sync_a.tick()
        assert await sync_b.tick()
        assert await redis.keys("gateway:outlier:*") == []

        before = time.time()
        seconds = eject(a, "a")
        assert await sync_a.tick()
        value = await redis.get(shared_key("llm", "a"))
        assert value is not None
        until_ms, ejections = (int(part) for part in value.split())
        assert ejections == 1
        assert before + seconds - 0.5 <= until_ms / 1000 <= time.time() + seconds + 0.001  # ms
        assert 29_000 < await redis.pttl(shared_key("llm", "a")) <= 30_000  # it ends with it

        assert await sync_b.tick()
        health = target(b, "a").health
        assert health.probation
        assert health.adopted
        assert health.ejections == 1
        assert 29.0 < health.ejected_until - time.monotonic() <= 30.0
        assert not health.usable(time.monotonic())
        assert in_service(b, "b")
        assert in_service(b, "c")
        assert health.ejected_total == 0  # not B's own: B shares nothing back
        assert await sync_b.tick()
        assert await redis.keys("gateway:outlier:*") == [shared_key("llm", "a").encode()]

        # A reads its own key back as its own: its ejection stays local, not adopted.
        assert await sync_a.tick()
        assert target(a, "a").health.probation
        assert not target(a, "a").health.adopted
    finally:
        await store_a.aclose()
        await store_b.aclose()


async def test_an_adopted_ejection_ends_when_the_ejecting_replica_sees_the_target_recover(
    redis_server: RedisServer, redis: Redis
) -> None:
    clock = FakeClock()  # A's monotonic clock: its ejection runs out when the test says
    a, b = replica(clock=clock), replica()
    store_a, store_b = lean(redis_server.url), lean(redis_server.url)
    sync_a = HealthSync(store_a, lambda: a, interval=INTERVAL, clock=clock)
    sync_b = HealthSync(store_b, lambda: b, interval=INTERVAL)
    try:
        eject(a, "b")
        assert await sync_a.tick()
        assert await sync_b.tick()
        assert target(b, "b").health.adopted

        clock.now += 31  # A's ejection is over: its next request there is the probe
        health = target(a, "b").health
        probe = health.started(clock())
        assert probe
        assert health.succeeded(probe)  # the probe answered: back in service at A
        assert await sync_a.tick()
        assert await redis.exists(shared_key("llm", "b")) == 0  # withdrawn, 29 s early

        assert await sync_b.tick()
        assert in_service(b, "b")
        assert not target(b, "b").health.adopted
        assert target(b, "b").health.usable(time.monotonic())
    finally:
        await store_a.aclose()
        await store_b.aclose()


async def test_a_replica_that_sees_an_adopted_ejection_recover_withdraws_it_for_everyone(
    redis_server: RedisServer, redis: Redis
) -> None:
    clock = FakeClock()
    a, b, c = replica(), replica(clock=clock), replica()
    stores = [lean(redis_server.url) for _ in range(3)]
    syncs = [
        HealthSync(stores[0], lambda: a, interval=INTERVAL),
        HealthSync(stores[1], lambda: b, interval=INTERVAL, clock=clock),
        HealthSync(stores[2], lambda: c, interval=INTERVAL),
    ]
    try:
        eject(a, "c")
        for sync in syncs:
            assert await sync.tick()
        assert target(b, "c").health.adopted
        assert target(c, "c").health.adopted

        clock.now += 31  # B's copy has run out; B's own probe passes
        health = target(b, "c").health
        assert health.succeeded(health.started(clock()))
        assert await syncs[1].tick()
        assert await redis.exists(shared_key("llm", "c")) == 0
        assert await syncs[2].tick()
        assert in_service(c, "c")
        # A's ejection is its own: A lets its own probe decide, whatever Redis says.
        assert await syncs[0].tick()
        assert target(a, "c").health.probation
    finally:
        for store in stores:
            await store.aclose()


async def test_a_shared_ejection_expires_with_its_key(
    redis_server: RedisServer, redis: Redis
) -> None:
    a, b = replica(base_ejection=0.3), replica(base_ejection=0.3)
    store_a, store_b = lean(redis_server.url), lean(redis_server.url)
    sync_a = HealthSync(store_a, lambda: a, interval=INTERVAL)
    sync_b = HealthSync(store_b, lambda: b, interval=INTERVAL)
    try:
        eject(a, "a")
        assert await sync_a.tick()
        assert await sync_b.tick()
        assert target(b, "a").health.adopted
        assert 0 < await redis.pttl(shared_key("llm", "a")) <= 300

        await asyncio.sleep(0.35)
        assert await redis.exists(shared_key("llm", "a")) == 0  # Redis dropped it (PX)
        assert await sync_b.tick()
        assert in_service(b, "a")
        # At A the ejection was its own: over, it waits for its probe (health.py), as before.
        assert await sync_a.tick()
        health = target(a, "a").health
        assert health.probation
        assert health.usable(time.monotonic())
    finally:
        await store_a.aclose()
        await store_b.aclose()


async def test_adopted_ejections_never_leave_an_upstream_with_fewer_targets_than_it_may(
    redis_server: RedisServer,
) -> None:
    """Of three targets at 50%, one may be out: A ejects a, B ejects b; neither adopts the
    other's, so each keeps two of three (max_ejected_percent holds for adopted ejections)."""
    a, b = replica(), replica()
    store_a, store_b = lean(redis_server.url), lean(redis_server.url)
    sync_a = HealthSync(store_a, lambda: a, interval=INTERVAL)
    sync_b = HealthSync(store_b, lambda: b, interval=INTERVAL)
    try:
        eject(a, "a")
        eject(b, "b")
        for _ in range(2):
            assert await sync_a.tick()
            assert await sync_b.tick()
        assert a.upstreams["llm"].usable_targets() == 2
        assert b.upstreams["llm"].usable_targets() == 2
        assert not target(a, "b").health.probation
        assert not target(b, "a").health.probation
    finally:
        await store_a.aclose()
        await store_b.aclose()


async def test_a_redis_killed_mid_run_costs_nothing_and_sharing_resumes_on_the_same_port(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.health_sync")
    a, b = replica(), replica()
    store_a, store_b = lean(redis_server.url), lean(redis_server.url)
    sync_a = HealthSync(store_a, lambda: a, interval=INTERVAL)
    sync_b = HealthSync(store_b, lambda: b, interval=INTERVAL)
    sync_a.start()
    sync_b.start()
    try:
        await asyncio.sleep(2 * INTERVAL)
        assert not sync_a.failing
        assert not sync_b.failing

        redis_server.stop()  # SIGKILL
        eject(a, "a")  # made while Redis is gone: shared once it is back
        await asyncio.sleep(8 * INTERVAL)
        assert sync_a.failing
        assert sync_b.failing
        assert sync_a.errors >= 3
        assert sync_b.errors >= 3
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2, [r.getMessage() for r in warnings]  # one per replica
        assert not target(b, "a").health.probation

        redis_server.start()
        deadline = time.monotonic() + 5
        while not target(b, "a").health.adopted:
            assert time.monotonic() < deadline, "B never adopted A's ejection"
            await asyncio.sleep(INTERVAL / 2)
        await asyncio.sleep(2 * INTERVAL)
        assert not sync_a.failing
        assert not sync_b.failing
        back = [r for r in caplog.records if "works again" in r.getMessage()]
        assert len(back) == 2
    finally:
        await sync_a.stop()
        await sync_b.stop()
        await store_a.aclose()
        await store_b.aclose()


async def test_one_mget_reads_every_key_on_a_redis_cluster(tmp_path: Path) -> None:
    with running_cluster(tmp_path) as nodes:
        a, b = replica(), replica()
        keys = [shared_key(name, t.target) for name, g in a.upstreams.items() for t in g.targets]
        assert len({key_slot(key.encode()) for key in keys}) == 1  # one hash tag, one slot
        settings = RedisSettings(url=nodes[0].url, cluster=True, timeout_ms=2000)
        store_a, store_b = build_limiter(settings), build_limiter(settings)
        assert isinstance(store_a, RedisLimiter)
        assert isinstance(store_b, RedisLimiter)
        sync_a = HealthSync(store_a, lambda: a, interval=INTERVAL)
        sync_b = HealthSync(store_b, lambda: b, interval=INTERVAL)
        try:
            eject(a, "b")
            assert await sync_a.tick(), sync_a.last_error
            assert await sync_b.tick(), sync_b.last_error
            assert target(b, "b").health.adopted
        finally:
            await store_a.aclose()
            await store_b.aclose()


async def test_two_gateways_with_redis_share_ejections_from_startup_to_shutdown(
    redis_server: RedisServer,
) -> None:
    """The lifespan starts a sync when ``redis.url`` is set and stops it at shutdown."""
    config = CONFIG % 30 + f"redis: {{url: '{redis_server.url}', timeout_ms: 500}}\n"
    async with (
        in_process_gateway(config, StandInUpstream()) as one,
        in_process_gateway(config, StandInUpstream()) as two,
    ):
        assert one.health_sync is not None
        assert two.health_sync is not None
        eject(one.runtime(), "c")
        async with asyncio.timeout(3):  # the default round is 0.5 s
            while not target(two.runtime(), "c").health.adopted:
                await asyncio.sleep(0.02)
        assert two.health_detail()["shared_ejections"] == {
            "store": "redis",
            "failing": False,
            "errors": 0,
            "last_error": None,
        }
        syncs = [t for t in asyncio.all_tasks() if t.get_name() == "health-sync"]
        assert len(syncs) == 2
    assert all(task.done() for task in syncs)
