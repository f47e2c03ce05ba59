"""Choosing a target in a group (``gateway/upstream/group.py``): while every target is plainly
available the group skips asking each (its health board has not moved); any change of one
target's availability is seen by the next choice."""

from __future__ import annotations

import random
from collections.abc import Sequence

from gateway.config.model import Upstream
from gateway.upstream.balance import RoundRobin, WeightedRandom
from gateway.upstream.group import UpstreamGroup, build_group
from gateway.upstream.health import HealthRegistry
from gateway.upstream.targets import UpstreamTarget, build_target
from tests.support.standin import StandInUpstream


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


UPSTREAM = Upstream.model_validate(
    {
        "targets": [{"name": n, "base_url": f"http://{n}.test"} for n in ("a", "b", "c")],
        "outlier": {"consecutive_failures": 1, "base_ejection": 10},
    }
)


def group(registry: HealthRegistry | None, balance: str = "weighted_random") -> UpstreamGroup:
    pool = StandInUpstream().factory(max_connections=1)
    targets = [
        build_target(
            "u",
            UPSTREAM,
            pool,
            target,
            None
            if registry is None
            else registry.health("u", target.name or "", target.base_url, UPSTREAM.outlier, False),
        )
        for target in UPSTREAM.target_list()
    ]

    def make(policy: str) -> WeightedRandom | RoundRobin:
        return RoundRobin() if policy == "round_robin" else WeightedRandom(random.Random(3))

    return build_group("u", UPSTREAM.model_copy(update={"balance": balance}), targets, make)


def chosen(upstream: UpstreamGroup, now: float, times: int = 60) -> set[str]:
    picks = [upstream.choose(now, ()) for _ in range(times)]
    return {t.target for t in picks if t is not None}


def by_name(upstream: UpstreamGroup, name: str) -> UpstreamTarget:
    return next(t for t in upstream.targets if t.target == name)


def test_every_change_of_availability_is_seen_after_all_were_available() -> None:
    clock = Clock()
    upstream = group(HealthRegistry(clock=clock))
    a, b, c = (by_name(upstream, n).health for n in "abc")
    assert chosen(upstream, clock.now) == {"a", "b", "c"}  # now remembered as all available
    a.failed(False, upstream.may_eject)  # ejected (one failure in a row)
    assert chosen(upstream, clock.now) == {"b", "c"}
    b.rest(5)
    assert chosen(upstream, clock.now) == {"c"}
    clock.now += 5  # b's rest is over; a is out until +10
    assert chosen(upstream, clock.now) == {"b", "c"}
    c.checked(False)
    assert chosen(upstream, clock.now) == {"b"}
    c.checked(True)
    clock.now += 5  # a may be probed: one request at a time
    a.started(clock.now)
    assert chosen(upstream, clock.now) == {"b", "c"}
    a.finished()
    a.succeeded(probe=True)
    assert chosen(upstream, clock.now) == {"a", "b", "c"}
    b.probation = True  # set directly, as a test or the admin might: seen all the same
    b.ejected_until = clock.now + 60
    assert chosen(upstream, clock.now) == {"a", "c"}


def test_targets_not_on_one_board_are_asked_every_time() -> None:
    upstream = group(None)  # each target's health on a board of its own
    assert chosen(upstream, 0.0) == {"a", "b", "c"}
    by_name(upstream, "b").health.rest(1e9)
    assert chosen(upstream, 0.0) == {"a", "c"}


def test_a_retry_prefers_an_untried_target_and_round_robin_still_takes_turns() -> None:
    upstream = group(HealthRegistry(), balance="round_robin")
    first = [upstream.choose(0.0, ()) for _ in range(6)]
    assert [t.target for t in first if t] == ["b", "c", "a", "b", "c", "a"]
    tried: Sequence[UpstreamTarget] = [by_name(upstream, "a"), by_name(upstream, "b")]
    again = [upstream.choose(0.0, tried) for _ in range(4)]
    assert {t.target for t in again if t} == {"c"}
