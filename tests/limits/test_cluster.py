"""The same script on a real three-node Redis Cluster, through ``RedisCluster``."""

from __future__ import annotations

import asyncio

from redis.crc import key_slot

from gateway.config.model import LimitsSection, RedisSettings
from gateway.limits import Planner, RedisLimiter, build_limiter

from .conftest import RedisServer
from .factories import limits, make_key


async def test_admissions_are_exact_on_a_cluster_for_team_and_teamless_keys(
    redis_cluster: list[RedisServer],
) -> None:
    solo = make_key("solo", limits=limits(1, 1000, request_burst=20))
    member = make_key("member", team="ml", limits=limits(1, 1000, request_burst=100))
    other = make_key("other", team="ml", limits=limits(1, 1000, request_burst=100))
    section = LimitsSection(
        teams={"ml": limits(1, request_burst=30)}, routes={"chat": limits(1, request_burst=50)}
    )
    planner = Planner(section, [solo, member, other])
    plans = {
        k.name: planner.charges(key=k, route="chat", model=None, tokens=1)
        for k in (solo, member, other)
    }
    slots = {
        name: {key_slot(b.key.encode()) for b in plan.buckets.buckets}
        for name, plan in plans.items()
    }
    assert all(len(s) == 1 for s in slots.values())  # one slot per request: one script
    assert slots["member"] == slots["other"]  # the team's slot

    settings = RedisSettings(url=redis_cluster[0].url, cluster=True, timeout_ms=2000)
    limiters = [build_limiter(settings) for _ in range(3)]
    try:
        decisions = await asyncio.gather(
            *(
                limiter.admit(plans[name])
                for limiter in limiters
                for name in ("solo", "member", "other")
                for _ in range(20)
            )
        )
    finally:
        for limiter in limiters:
            await limiter.aclose()
    by_key: dict[str, int] = {}
    for decision in decisions:
        assert not decision.degraded, [lim.stats.last_error for lim in limiters]
        by_key[decision.plan.key_name] = by_key.get(decision.plan.key_name, 0) + decision.allowed
    assert by_key["solo"] == 20  # its own burst of 20
    assert by_key["member"] + by_key["other"] == 30  # the team's burst of 30
    assert all(isinstance(limiter, RedisLimiter) for limiter in limiters)
