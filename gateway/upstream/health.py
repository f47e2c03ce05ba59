"""What the gateway knows about one target's health, and the rules that change it.

Three verdicts meet here (docs/resilience.md):

- **Passive (outlier detection, after Envoy's).** ``consecutive_failures`` failures in a row eject
  the target for ``base_ejection`` times the number of its ejections (at most ``max_ejection``),
  so a target that keeps failing stays out longer each time. When the time is up the target is
  *probed*: with an active health check, the next passing check brings it back; without one,
  exactly one request at a time goes to it until one succeeds. A failed probe ejects it again at
  once, for longer. The multiplier decays by one for each ``max_ejection`` spent healthy.
- **Rested.** A 429 with ``Retry-After`` keeps the target out for that long: it is not a failure
  (the target is working as designed), so it never ejects.
- **Active.** A health check's verdict, kept as is until the next one.

A replica's ejections are also shared through Redis when it is configured
(``upstream/health_sync.py``); what another replica decided arrives as ``adopt``.

State here is per process and outlives config snapshots (a reload keeps what was learnt about
the targets it keeps); it is owned by the app, never by a module.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.config.resilience import OutlierPolicy

Clock = Callable[[], float]

# A Retry-After longer than this is treated as this: a target is rested, not retired.
MAX_REST_SECONDS = 300.0


@dataclass(slots=True, eq=False)
class Board:
    """Counts the changes of its targets' availability: ejected or back in, marked down or up,
    rested. A group that saw every one of its targets plainly available (none ejected, down or
    rested) at one count knows they still are while the count stands, without asking each
    (``group.UpstreamGroup.choose``): the common request then skips a filter over them.

    One per registry, shared by all its upstreams: a change in one makes every group look over
    its targets once more, which costs little next to how rarely availability changes."""

    changes: int = 0


@dataclass(slots=True, eq=False)
class TargetHealth:
    upstream: str
    target: str
    policy: OutlierPolicy
    clock: Clock = time.monotonic
    # True when the upstream has an active health check: probes are its job, not traffic's.
    actively_checked: bool = False
    # Told of every change of probation, active_down and rested_until (their setters).
    board: Board = field(default_factory=Board)

    consecutive_failures: int = 0
    ejections: int = 0  # the multiplier of the next ejection's length
    ejected_until: float = 0.0  # clock() time
    # ``probation``: out until proven; set by an ejection, cleared by a successful probe.
    _probation: bool = field(default=False, init=False)
    probe_in_flight: bool = False
    # The ejection came from another replica (Redis): cleared when that replica's key goes.
    adopted: bool = False
    _rested_until: float = field(default=0.0, init=False)  # ``rested_until``
    _active_down: bool = field(default=False, init=False)  # ``active_down``
    outstanding: int = 0  # requests in flight (least_outstanding)
    healthy_since: float = field(default=0.0)

    # Counters for the admin API and metrics. ``ejected_total`` counts this process's own
    # ejections (never adopted ones), ``recoveries`` the probations this process ended itself (a
    # probe or a check passed; not another replica's release): the Redis sync
    # (``upstream/health_sync.py``) shares an ejection, or withdraws it, when they move.
    ejected_total: int = 0
    failures_total: int = 0
    recoveries: int = 0

    # The three fields that decide availability change through these, which tell the board.
    # Methods here read the fields (the hot path: no property call) and write through these.

    @property
    def probation(self) -> bool:
        return self._probation

    @probation.setter
    def probation(self, value: bool) -> None:
        if value != self._probation:
            self._probation = value
            self.board.changes += 1

    @property
    def rested_until(self) -> float:
        return self._rested_until

    @rested_until.setter
    def rested_until(self, value: float) -> None:
        if value != self._rested_until:
            self._rested_until = value
            self.board.changes += 1

    @property
    def active_down(self) -> bool:
        return self._active_down

    @active_down.setter
    def active_down(self, value: bool) -> None:
        if value != self._active_down:
            self._active_down = value
            self.board.changes += 1

    def plainly_available(self, now: float) -> bool:
        """Usable now, and stays so as time passes until one of the three fields changes:
        neither ejected nor down, and any rest over."""
        return not self._probation and not self._active_down and now >= self._rested_until

    def usable(self, now: float) -> bool:
        """May a request be sent here now (as a probe, when it is on probation)?"""
        if self._active_down or now < self._rested_until:
            return False
        if not self._probation:
            return True
        if now < self.ejected_until or self.actively_checked:
            return False
        return not self.probe_in_flight

    def in_service(self) -> bool:
        """Neither ejected nor marked down: counted as a usable target by readiness."""
        return not self._active_down and not self._probation

    def returns_at(self, now: float) -> float | None:
        """When a target that is out now may be tried again by traffic, if it is only
        waiting on time (rested, or ejected without active checks)."""
        if self._active_down:
            return None
        at = self._rested_until
        if self._probation:
            if self.actively_checked:
                return None
            at = max(at, self.ejected_until)
        return at if at > now else None

    def started(self, now: float) -> bool:
        """A request goes to the target; True if it is the target's probe."""
        self.outstanding += 1
        if self._probation and now >= self.ejected_until and not self.actively_checked:
            self.probe_in_flight = True
            return True
        return False

    def finished(self) -> None:
        self.outstanding -= 1

    def succeeded(self, probe: bool) -> bool:
        """An attempt got an answer that is not a failure; True if that ended a probation."""
        self.consecutive_failures = 0
        if not probe and not self.ejections:
            return False  # the common case: a healthy target that was never ejected
        now = self.clock()
        if probe:
            self.probe_in_flight = False
        if self._probation and probe:
            self.recoveries += 1
            self._back_in(now)
            return True
        if (
            self.ejections
            and not self._probation
            and now - self.healthy_since >= (self.policy.max_ejection)
        ):
            # Healthy for a whole max_ejection: the next ejection is one step shorter.
            self.ejections -= 1
            self.healthy_since = now
        return False

    def failed(self, probe: bool, may_eject: Callable[[], bool]) -> float | None:
        """An attempt failed; returns the ejection's length if this ejected the target.

        ``may_eject`` asks the group whether one more of its targets may be out."""
        self.failures_total += 1
        if probe:
            self.probe_in_flight = False
            if self._probation:
                # A failed probe: straight back out, for longer.
                return self._eject(self.clock())
        if not self.policy.enabled or self._probation:
            return None
        self.consecutive_failures += 1
        if self.consecutive_failures < self.policy.consecutive_failures or not may_eject():
            return None
        return self._eject(self.clock())

    def rest(self, seconds: float) -> None:
        """The target said 429 with Retry-After: keep traffic away that long."""
        now = self.clock()
        self.rested_until = max(self._rested_until, now + min(seconds, MAX_REST_SECONDS))

    def checked(self, healthy: bool) -> bool:
        """An active check's verdict (after its thresholds); True if it ended a probation."""
        self.active_down = not healthy
        if healthy and self._probation and self.clock() >= self.ejected_until:
            self.recoveries += 1
            self._back_in(self.clock())
            return True
        return False

    def unchecked(self) -> None:
        """The upstream's active check was removed (a reload): its last verdict no longer
        holds, and nothing would ever lift it."""
        self.active_down = False

    def adopt(self, remaining: float, ejections: int) -> None:
        """Another replica ejected this target for ``remaining`` more seconds."""
        now = self.clock()
        until = now + remaining
        if until > self.ejected_until:
            self.ejected_until = until
            self.probation = True
            self.adopted = True
        self.ejections = max(self.ejections, ejections)

    def released(self) -> None:
        """The replica whose ejection this was saw the target recover (its key is gone)."""
        if self.adopted:
            self._back_in(self.clock())

    def _eject(self, now: float) -> float:
        self.ejections += 1
        self.ejected_total += 1
        seconds = min(self.policy.base_ejection * self.ejections, self.policy.max_ejection)
        self.ejected_until = now + seconds
        self.probation = True
        self.adopted = False
        self.consecutive_failures = 0
        return seconds

    def _back_in(self, now: float) -> None:
        self.probation = False
        self.adopted = False
        self.probe_in_flight = False
        self.ejected_until = 0.0
        self.consecutive_failures = 0
        self.healthy_since = now


@dataclass(slots=True)
class HealthRegistry:
    """Every target's health, by (upstream, target, base URL): reused by the next config
    snapshot for a target that kept its name and URL. Owned by the app's lifespan."""

    clock: Clock = time.monotonic
    _targets: dict[tuple[str, str, str], TargetHealth] = field(default_factory=dict)
    board: Board = field(default_factory=Board)

    def health(
        self, upstream: str, target: str, base_url: str, policy: OutlierPolicy, checked: bool
    ) -> TargetHealth:
        key = (upstream, target, base_url)
        found = self._targets.get(key)
        if found is None:
            found = TargetHealth(upstream, target, policy, self.clock, checked, self.board)
            self._targets[key] = found
        else:
            found.policy = policy
            found.actively_checked = checked
        return found

    def keep_only(self, keys: set[tuple[str, str, str]]) -> None:
        """Forget targets the current config no longer has."""
        for key in [k for k in self._targets if k not in keys]:
            del self._targets[key]

    def all(self) -> list[TargetHealth]:
        return list(self._targets.values())
