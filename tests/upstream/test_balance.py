"""Picking a target (``gateway/upstream/balance.py``): by weight, in turn, or by fewest in
flight."""

from __future__ import annotations

import random
from collections import Counter

from gateway.config.model import Upstream
from gateway.upstream.balance import LeastOutstanding, RoundRobin, WeightedRandom
from gateway.upstream.targets import UpstreamTarget, build_target
from tests.support.standin import StandInUpstream


def targets(*weights: float) -> list[UpstreamTarget]:
    upstream = Upstream.model_validate(
        {
            "targets": [
                {"name": f"t{i}", "base_url": f"http://t{i}.test", "weight": weight}
                for i, weight in enumerate(weights)
            ]
        }
    )
    pool = StandInUpstream().factory(max_connections=1)
    return [build_target("u", upstream, pool, target) for target in upstream.target_list()]


def test_weighted_random_follows_the_weights() -> None:
    candidates = targets(1, 3)
    policy = WeightedRandom(random.Random(7))
    picks = Counter(policy.pick(candidates).target for _ in range(4000))
    assert 0.22 < picks["t0"] / 4000 < 0.28


def test_round_robin_takes_each_in_turn() -> None:
    candidates = targets(1, 1, 1)
    policy = RoundRobin()
    picked = [policy.pick(candidates).target for _ in range(6)]
    assert sorted(picked[:3]) == ["t0", "t1", "t2"]
    assert picked[:3] == picked[3:]


def test_least_outstanding_picks_the_least_busy() -> None:
    candidates = targets(1, 1, 1)
    candidates[0].health.outstanding = 2
    candidates[1].health.outstanding = 0
    candidates[2].health.outstanding = 1
    assert LeastOutstanding(random.Random(1)).pick(candidates).target == "t1"


def test_a_single_candidate_is_picked_by_every_policy() -> None:
    only = targets(1)
    for policy in (WeightedRandom(), RoundRobin(), LeastOutstanding()):
        assert policy.pick(only) is only[0]


def test_weighted_random_picks_alike_from_a_tuple_it_remembers_and_from_a_list() -> None:
    # A group hands over its own tuple while every target is available (the running totals
    # are then kept), a list otherwise: the same draws pick the same targets either way.
    candidates = targets(1, 3, 0.5, 2, 1)
    as_tuple, as_list = WeightedRandom(random.Random(11)), WeightedRandom(random.Random(11))
    frozen = tuple(candidates)
    for _ in range(2000):
        assert as_tuple.pick(frozen) is as_list.pick(list(candidates))
