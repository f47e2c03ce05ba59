"""A target's health (``gateway/upstream/health.py``): ejection after failures in a row, longer
each time, a probe back in, rests for Retry-After, and active verdicts; on a fake clock."""

from __future__ import annotations

from collections.abc import Callable

from gateway.config.resilience import OutlierPolicy
from gateway.upstream.health import HealthRegistry, TargetHealth


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


POLICY = OutlierPolicy(consecutive_failures=3, base_ejection=10, max_ejection=25)


def health(clock: Clock, checked: bool = False) -> TargetHealth:
    return TargetHealth("u", "a", POLICY, clock, checked)


def fail(target: TargetHealth, times: int, may_eject: bool = True) -> float | None:
    ejected = None
    for _ in range(times):
        probe = target.started(target.clock())
        target.finished()
        ejected = target.failed(probe, lambda: may_eject)
    return ejected


def test_failures_in_a_row_eject_and_a_success_between_them_resets_the_count() -> None:
    clock = Clock()
    target = health(clock)
    assert fail(target, 2) is None
    target.succeeded(probe=False)
    assert fail(target, 2) is None
    assert fail(target, 1) == 10
    assert not target.usable(clock.now)
    assert target.probation


def test_the_group_may_refuse_an_ejection() -> None:
    target = health(Clock())
    assert fail(target, 5, may_eject=False) is None
    assert not target.probation


def test_after_the_ejection_one_request_probes_and_others_stay_away() -> None:
    clock = Clock()
    target = health(clock)
    fail(target, 3)
    clock.now += 10
    assert target.usable(clock.now)
    assert target.started(clock.now) is True  # the probe
    assert not target.usable(clock.now)  # one probe at a time
    target.finished()
    assert target.succeeded(probe=True) is True
    assert target.usable(clock.now)
    assert not target.probation


def test_a_failed_probe_ejects_again_at_once_and_for_longer_up_to_the_maximum() -> None:
    clock = Clock()
    target = health(clock)
    assert fail(target, 3) == 10
    clock.now += 10
    assert fail(target, 1) == 20  # the probe failed: twice the base
    clock.now += 20
    assert fail(target, 1) == 25  # capped at max_ejection


def test_the_multiplier_decays_after_a_max_ejection_spent_healthy() -> None:
    clock = Clock()
    target = health(clock)
    fail(target, 3)
    clock.now += 10
    target.started(clock.now)
    target.succeeded(probe=True)
    assert target.ejections == 1
    clock.now += 25
    target.succeeded(probe=False)
    assert target.ejections == 0


def test_a_rest_keeps_traffic_away_for_retry_after_and_is_not_a_failure() -> None:
    clock = Clock()
    target = health(clock)
    target.rest(2)
    assert not target.usable(clock.now)
    assert target.returns_at(clock.now) == clock.now + 2
    assert target.consecutive_failures == 0
    assert target.in_service()
    clock.now += 2
    assert target.usable(clock.now)


def test_with_an_active_check_only_a_passing_check_ends_a_probation() -> None:
    clock = Clock()
    target = health(clock, checked=True)
    fail(target, 3)
    clock.now += 100
    assert not target.usable(clock.now)  # no traffic probes when checks do
    assert target.returns_at(clock.now) is None
    assert target.checked(True) is True
    assert target.usable(clock.now)


def test_a_target_marked_down_is_not_usable_and_not_in_service() -> None:
    clock = Clock()
    target = health(clock, checked=True)
    target.checked(False)
    assert not target.usable(clock.now)
    assert not target.in_service()
    target.checked(True)
    assert target.usable(clock.now)


def test_an_adopted_ejection_is_released_when_its_replica_says_so() -> None:
    clock = Clock()
    target = health(clock)
    target.adopt(5, 2)
    assert not target.usable(clock.now)
    assert target.ejections == 2
    target.released()
    assert target.usable(clock.now)


def test_the_registry_keeps_a_targets_health_across_snapshots_while_name_and_url_stay() -> None:
    registry = HealthRegistry()
    first = registry.health("u", "a", "http://a", POLICY, False)
    assert registry.health("u", "a", "http://a", POLICY, True) is first
    assert first.actively_checked
    assert registry.health("u", "a", "http://other", POLICY, False) is not first
    registry.keep_only({("u", "a", "http://other")})
    assert registry.health("u", "a", "http://a", POLICY, False) is not first


def test_the_board_counts_every_change_of_availability_and_nothing_else() -> None:
    clock = Clock()
    registry = HealthRegistry(clock=clock)
    target = registry.health("u", "a", "http://a", POLICY, False)
    other = registry.health("u", "b", "http://b", POLICY, False)
    board = registry.board
    assert target.board is board
    assert other.board is board

    def moved(change: Callable[[], object]) -> int:
        before = board.changes
        change()
        return board.changes - before

    assert moved(lambda: fail(target, 2)) == 0  # failures below the threshold
    assert moved(lambda: target.succeeded(probe=False)) == 0
    assert moved(lambda: fail(target, 2)) == 0
    assert moved(lambda: fail(target, 1)) == 1  # the third in a row: ejected
    clock.now += 10
    assert moved(lambda: target.started(clock.now)) == 0  # the probe: still on probation
    assert moved(lambda: target.succeeded(probe=True)) == 1  # back in
    assert moved(lambda: other.rest(2)) == 1
    assert moved(lambda: other.checked(True)) == 0  # up already
    assert moved(lambda: other.checked(False)) == 1
    assert moved(lambda: other.unchecked()) == 1
    assert moved(lambda: other.adopt(5, 1)) == 1
    assert moved(lambda: other.released()) == 1

    def set_directly() -> None:  # as tests do: through the same setters
        target.probation = True

    assert moved(set_directly) == 1
    assert target.probation
