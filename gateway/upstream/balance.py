"""How one target is picked among the usable ones: three small policies, one method each.

The candidates are already filtered (usable, and untried by this request where possible); a
policy only chooses. Their state (the round-robin position) belongs to one config snapshot.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate
from typing import Protocol

from gateway.upstream.targets import UpstreamTarget


class Balancer(Protocol):
    def pick(self, candidates: Sequence[UpstreamTarget]) -> UpstreamTarget: ...


class WeightedRandom:
    """Each candidate in proportion to its weight (Portkey's loadbalance, Caddy's
    weighted_round_robin in expectation): no shared state, so replicas need no coordination."""

    def __init__(self, rng: random.Random | None = None) -> None:
        # Spreading load, not secrecy: a predictable generator is fine here.
        self._random = (rng or random.Random()).random  # noqa: S311
        # The last tuple of candidates, its weights' total and running totals but the last: the
        # group hands over its own tuple while every target is available, so this is summed
        # once per snapshot rather than per request.
        self._summed: tuple[UpstreamTarget, ...] = ()
        self._total = 0.0
        self._bounds: list[float] = []

    def pick(self, candidates: Sequence[UpstreamTarget]) -> UpstreamTarget:
        if candidates is self._summed:
            # The first candidate whose running total exceeds the point (the loop below); a
            # point past every bound is the last one's.
            return self._summed[bisect_right(self._bounds, self._random() * self._total)]
        if len(candidates) == 1:
            return candidates[0]
        if isinstance(candidates, tuple):  # immutable: safe to remember
            running = list(accumulate(t.weight for t in candidates))
            self._summed, self._total, self._bounds = candidates, running[-1], running[:-1]
            return self.pick(candidates)
        total = 0.0
        for target in candidates:
            total += target.weight
        point = self._random() * total
        for target in candidates:
            point -= target.weight
            if point < 0:
                return target
        return candidates[-1]


class RoundRobin:
    """Each candidate in turn; a candidate that is out is skipped, not waited for."""

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, candidates: Sequence[UpstreamTarget]) -> UpstreamTarget:
        self._turn += 1
        return candidates[self._turn % len(candidates)]


class LeastOutstanding:
    """The candidate with the fewest requests in flight from this process (Caddy's
    least_conn); ties broken at random so that an idle group does not favour its first."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._choice = (rng or random.Random()).choice  # noqa: S311

    def pick(self, candidates: Sequence[UpstreamTarget]) -> UpstreamTarget:
        if len(candidates) == 1:
            return candidates[0]
        least = min(target.health.outstanding for target in candidates)
        return self._choice([t for t in candidates if t.health.outstanding == least])


def balancer(policy: str, rng: random.Random | None = None) -> Balancer:
    if policy == "round_robin":
        return RoundRobin()
    if policy == "least_outstanding":
        return LeastOutstanding(rng)
    return WeightedRandom(rng)
