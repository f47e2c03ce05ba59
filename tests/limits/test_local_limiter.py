from __future__ import annotations

from gateway.limits import LocalLimiter

from .factories import limits, make_key, plan_for


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_refill_follows_the_clock_exactly() -> None:
    clock = FakeClock()
    limiter = LocalLimiter(clock=clock)
    plan = plan_for(make_key("demo", limits=limits(60, request_burst=2)))
    assert [limiter.admit_now(plan).allowed for _ in range(3)] == [True, True, False]
    clock.now += 0.75
    refused = limiter.admit_now(plan)
    assert not refused.allowed
    assert refused.retry_after_ms == 250
    clock.now += 0.25
    admitted = limiter.admit_now(plan)
    assert admitted.allowed
    assert admitted.reset_ms == (2000,)


def test_memory_is_bounded_and_full_buckets_go_first() -> None:
    clock = FakeClock()
    limiter = LocalLimiter(max_buckets=10, clock=clock)
    debtor = plan_for(make_key("debtor", limits=limits(1)))  # refills in a minute
    assert limiter.admit_now(debtor).allowed
    for i in range(50):
        clock.now += 1  # each fast bucket is full again a second later
        assert limiter.admit_now(plan_for(make_key(f"k{i}", limits=limits(6000)))).allowed
        assert len(limiter) <= 10
    assert not limiter.admit_now(debtor).allowed  # its debt survived the sweeps


def test_past_the_bound_the_least_recently_used_are_dropped() -> None:
    limiter = LocalLimiter(max_buckets=10, clock=FakeClock())
    for i in range(100):
        assert limiter.admit_now(plan_for(make_key(f"k{i}", limits=limits(1)))).allowed
        assert len(limiter) <= 10
    # The newest key keeps its state; the oldest was forgiven.
    assert not limiter.admit_now(plan_for(make_key("k99", limits=limits(1)))).allowed
    assert limiter.admit_now(plan_for(make_key("k0", limits=limits(1)))).allowed


def test_force_counts_but_admits() -> None:
    limiter = LocalLimiter(clock=FakeClock())
    plan = plan_for(make_key("demo", limits=limits(60, request_burst=1)))
    decisions = [limiter.admit_now(plan, force=True, degraded=True) for _ in range(3)]
    assert [d.allowed for d in decisions] == [True] * 3
    assert [d.remaining for d in decisions] == [(0,), (-1,), (-2,)]
    assert all(d.degraded for d in decisions)
    assert limiter.stats.admitted == 3


def test_observed_levels_are_where_the_buckets_continue_from() -> None:
    # What the Redis limiter does with every answer, so that its fallback does not start
    # from full buckets for keys Redis has been counting.
    clock = FakeClock()
    limiter = LocalLimiter(clock=clock)
    key = make_key("demo", limits=limits(60, 600, request_burst=10))
    plan = plan_for(key, 100)
    limiter.observe(plan.buckets, (1, 150))
    decision = limiter.admit_now(plan)
    assert decision.allowed
    assert decision.remaining == (0, 50)
    assert not limiter.admit_now(plan).allowed  # both short now
    clock.now += 1.0  # one request and 10 tokens refill a second
    assert limiter.admit_now(plan_for(key, 60)).remaining == (0, 0)


def test_an_observed_full_bucket_keeps_no_state() -> None:
    limiter = LocalLimiter(clock=FakeClock())
    plan = plan_for(make_key("demo", limits=limits(60, request_burst=3)))
    limiter.observe(plan.buckets, (1,))
    assert len(limiter) == 1
    limiter.observe(plan.buckets, (3,))
    assert len(limiter) == 0  # a missing bucket is a full one
    assert limiter.admit_now(plan).remaining == (2,)


def test_observing_stays_within_the_memory_bound() -> None:
    limiter = LocalLimiter(max_buckets=10, clock=FakeClock())
    for i in range(100):
        plan = plan_for(make_key(f"k{i}", limits=limits(1, request_burst=5)))
        limiter.observe(plan.buckets, (0,))
        assert len(limiter) <= 10
