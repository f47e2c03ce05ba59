"""The breaker in front of Redis: when Redis is skipped and when it is asked again.

A fake clock and no Redis: these run in microseconds. What counts as a failure (a timeout only
when Redis itself was late) is ``test_redis_timeouts.py``'s subject.
"""

from __future__ import annotations

import pytest

from gateway.limits import LimiterStats
from gateway.limits.breaker import Breaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def stats() -> LimiterStats:
    return LimiterStats()


@pytest.fixture
def breaker(clock: FakeClock, stats: LimiterStats) -> Breaker:
    return Breaker(stats, failures=3, cooldown=1.0, clock=clock)


def fail(breaker: Breaker, times: int) -> list[bool]:
    return [breaker.failed() for _ in range(times)]


def test_it_starts_closed_and_lets_every_call_through(breaker: Breaker) -> None:
    assert breaker.state == "closed"
    assert all(breaker.allow() for _ in range(100))
    assert breaker.retry_in() == 0.0


def test_failures_short_of_the_threshold_do_not_open_it(breaker: Breaker) -> None:
    # One slow reply or one reset connection is not an outage: the call falls back, the
    # others still go to Redis.
    assert fail(breaker, 2) == [False, False]
    assert breaker.state == "closed"
    assert breaker.allow()


def test_only_failures_in_a_row_count(breaker: Breaker) -> None:
    fail(breaker, 2)
    breaker.succeeded()
    states = []
    for _ in range(3):
        breaker.failed()
        states.append(breaker.state)
    assert states == ["closed", "closed", "open"]


def test_the_threshold_opens_it_and_redis_is_skipped_for_the_cooldown(
    breaker: Breaker, clock: FakeClock, stats: LimiterStats
) -> None:
    assert fail(breaker, 3) == [False, False, True]
    assert (breaker.state, stats.breaker) == ("open", "open")
    assert breaker.retry_in() == pytest.approx(1.0)
    clock.now += 0.999
    assert not breaker.allow()
    assert breaker.retry_in() == pytest.approx(0.001)


def test_after_the_cooldown_one_call_probes_and_the_others_fall_back(
    breaker: Breaker, clock: FakeClock, stats: LimiterStats
) -> None:
    fail(breaker, 3)
    clock.now += 1.0
    assert breaker.allow()  # the probe
    assert (breaker.state, stats.breaker) == ("half-open", "half-open")
    assert [breaker.allow() for _ in range(10)] == [False] * 10


def test_an_answer_to_the_probe_closes_it(
    breaker: Breaker, clock: FakeClock, stats: LimiterStats
) -> None:
    fail(breaker, 3)
    clock.now += 1.0
    assert breaker.allow()
    breaker.succeeded()
    assert (breaker.state, stats.breaker) == ("closed", "closed")
    assert all(breaker.allow() for _ in range(10))
    assert fail(breaker, 2) == [False, False]  # the count starts over


def test_a_failed_probe_opens_it_for_another_cooldown(breaker: Breaker, clock: FakeClock) -> None:
    fail(breaker, 3)
    clock.now += 1.0
    assert breaker.allow()
    assert breaker.failed() is False  # re-opened, not a new trip
    assert breaker.state == "open"
    clock.now += 0.5
    assert not breaker.allow()
    clock.now += 0.5
    assert breaker.allow()


def test_a_probe_that_never_reports_frees_the_slot_after_a_cooldown(
    breaker: Breaker, clock: FakeClock
) -> None:
    # Its request was cancelled (the client went away) before Redis answered.
    fail(breaker, 3)
    clock.now += 1.0
    assert breaker.allow()
    clock.now += 0.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()
    assert breaker.state == "half-open"


def test_an_answer_while_open_closes_it(breaker: Breaker) -> None:
    # A call sent before the breaker opened may still be answered: Redis is back.
    fail(breaker, 3)
    breaker.succeeded()
    assert breaker.state == "closed"


def test_a_threshold_of_one_opens_on_the_first_failure(
    clock: FakeClock, stats: LimiterStats
) -> None:
    breaker = Breaker(stats, failures=1, cooldown=0.5, clock=clock)
    assert fail(breaker, 1) == [True]
    assert breaker.retry_in() == pytest.approx(0.5)
