"""An upstream as admission and the failover loop see it: its targets, how one is picked, and
the retry rules that apply to them.

One ``UpstreamGroup`` per configured upstream and config snapshot. Its targets' health outlives
the snapshot (``health.HealthRegistry``); its pools are reused by the next snapshot when a
target's settings did not change (``runtime.build_runtime``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gateway.config.model import Upstream
from gateway.config.resilience import RetryPolicy
from gateway.upstream.balance import Balancer
from gateway.upstream.health import Board
from gateway.upstream.targets import UpstreamTarget

# At most this many attempts by default, however many targets there are (Portkey's cap).
DEFAULT_MAX_ATTEMPTS = 5


@dataclass(slots=True, eq=False)
class _AllAvailable:
    """When the group last saw every target plainly available: its board's count then."""

    board: Board
    # False when the targets' healths are not on one board: ``seen`` is then never set.
    shared: bool
    seen: int = -1


def _all_available(targets: Sequence[UpstreamTarget]) -> _AllAvailable:
    boards = {id(t.health.board): t.health.board for t in targets}
    if len(boards) == 1:
        return _AllAvailable(next(iter(boards.values())), shared=True)
    return _AllAvailable(Board(), shared=False)


@dataclass(frozen=True, slots=True)
class UpstreamGroup:
    name: str
    config: Upstream
    targets: tuple[UpstreamTarget, ...]
    balancer: Balancer
    attempts: int
    # Every target's secrets, longest first: an answer is masked with all of them (a target's
    # error may quote a sibling's key, when they share a proxy or a deployment).
    secrets: tuple[bytes, ...]
    # The TLS files as they were when the pools were made (``tls.tls_files_stamp``).
    tls_stamp: tuple[tuple[str, int, int], ...] = ()
    # ``config.retry``, read by every request: an attribute, not a property.
    retry: RetryPolicy = field(init=False, compare=False)
    _available: _AllAvailable = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "retry", self.config.retry)
        object.__setattr__(self, "_available", _all_available(self.targets))

    @property
    def first(self) -> UpstreamTarget:
        return self.targets[0]

    def choose(self, now: float, tried: Sequence[UpstreamTarget]) -> UpstreamTarget | None:
        """A usable target, one this request has not tried when there is one; None when every
        target is out (ejected, rested or down)."""
        available = self._available
        if available.seen == available.board.changes:
            # Nothing changed since every target was seen plainly available: they all still
            # are (time only ends rests), and the balancer is handed the same tuple each time.
            usable: Sequence[UpstreamTarget] = self.targets
        else:
            targets = self.targets
            if len(targets) == 1:
                only = targets[0]
                return only if only.health.usable(now) else None
            usable = [t for t in targets if t.health.usable(now)]
            if not usable:
                return None
            if (
                len(usable) == len(targets)
                and available.shared
                and all(t.health.plainly_available(now) for t in targets)
            ):
                # None ejected, down or resting: remembered until the board's count moves.
                available.seen = available.board.changes
                usable = targets
        if not tried:  # a request's first attempt: every usable target is fresh
            return self.balancer.pick(usable)
        fresh = [t for t in usable if t not in tried]
        return self.balancer.pick(fresh or usable)

    def next_return(self, now: float) -> float | None:
        """The earliest time a target that is out only for a while may be tried again."""
        times = [at for t in self.targets if (at := t.health.returns_at(now)) is not None]
        return min(times) if times else None

    def last_resort(self, now: float) -> UpstreamTarget:
        """The target to try when none is usable and there is nowhere else to go (Envoy's panic
        routing: a wrong health verdict must not turn every request away). The one back
        soonest, else the first."""

        def back_at(target: UpstreamTarget) -> float:
            at = target.health.returns_at(now)
            return at if at is not None else float("inf")

        return min(self.targets, key=back_at)

    def may_eject(self) -> bool:
        """May one more target be ejected? Never all of them; at most max_ejected_percent,
        and at least one of two or more (Envoy ejects one whatever the percentage)."""
        count = len(self.targets)
        if count < 2:
            return False
        allowed = max(1, count * self.config.outlier.max_ejected_percent // 100)
        allowed = min(allowed, count - 1)
        out = sum(1 for t in self.targets if t.health.probation)
        return out < allowed

    def usable_targets(self) -> int:
        """Targets neither ejected nor down: zero makes readiness fail."""
        return sum(1 for t in self.targets if t.health.in_service())


def default_attempts(upstream: Upstream) -> int:
    if upstream.retry.attempts is not None:
        return upstream.retry.attempts
    return min(len(upstream.target_list()), DEFAULT_MAX_ATTEMPTS)


def all_secrets(targets: Sequence[UpstreamTarget]) -> tuple[bytes, ...]:
    found = {secret for target in targets for secret in target.secrets}
    return tuple(sorted(found, key=lambda secret: (-len(secret), secret)))


def build_group(
    name: str,
    upstream: Upstream,
    targets: Sequence[UpstreamTarget],
    make_balancer: Callable[[str], Balancer],
    tls_stamp: tuple[tuple[str, int, int], ...] = (),
) -> UpstreamGroup:
    return UpstreamGroup(
        name=name,
        config=upstream,
        targets=tuple(targets),
        balancer=make_balancer(upstream.balance),
        attempts=default_attempts(upstream),
        secrets=all_secrets(targets),
        tls_stamp=tls_stamp,
    )
