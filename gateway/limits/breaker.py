"""The Redis limiter's circuit breaker, and the deadline of a call through redis-py.

**The breaker** opens after ``breaker_failures`` failures in a row, not on one, and then skips
Redis for ``breaker_seconds``; then one request probes it (half-open) while the others keep
falling back, and an answer closes it. The pattern and its three states are Nygard's "Circuit
Breaker" (Release It!, 2007), as in https://martinfowler.com/bliki/CircuitBreaker.html.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from gateway.limits.limiter import BreakerState, LimiterStats
from gateway.limits.resp import RECHECK_SECONDS

# Loop turns a redis-py call may run past its deadline: enough for a reply already in the socket
# to be read (one turn), handed to the waiting task and parsed (the next).
GRACE_TURNS = 3


class Breaker:
    """Whether to ask Redis: closed until ``failures`` calls in a row fail, then open for
    ``cooldown`` seconds, then half-open: the first caller probes, and its answer closes the
    breaker (its failure opens it again). A probe that never reports (its request cancelled)
    frees the slot after another ``cooldown``. The state is mirrored into ``stats.breaker``."""

    def __init__(
        self,
        stats: LimiterStats,
        *,
        failures: int = 3,
        cooldown: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stats = stats
        self._threshold = failures
        self._cooldown = cooldown
        self._clock = clock
        self._failures = 0  # in a row
        self._retry_at = 0.0  # open or half-open: no (other) call before this time
        self.state: BreakerState = "closed"
        stats.breaker = "closed"

    def allow(self) -> bool:
        """Whether this call may go to Redis (when not closed: whether it is the probe)."""
        if self.state == "closed":
            return True
        now = self._clock()
        if now < self._retry_at:
            return False
        self._retry_at = now + self._cooldown
        self._set("half-open")
        return True

    def retry_in(self) -> float:
        """Seconds until Redis is asked again (0 when closed)."""
        return max(0.0, self._retry_at - self._clock()) if self.state != "closed" else 0.0

    def succeeded(self) -> None:
        self._failures = 0
        if self.state != "closed":
            self._set("closed")

    def failed(self) -> bool:
        """Count a failure; True when it opened a closed breaker."""
        self._failures += 1
        if self.state == "closed" and self._failures < self._threshold:
            return False
        tripped = self.state == "closed"
        self._retry_at = self._clock() + self._cooldown
        self._set("open")
        return tripped

    def _set(self, state: BreakerState) -> None:
        self.state = state
        self._stats.breaker = state


class GraceTimeout:
    """Cancel ``task`` once ``seconds`` have passed and then ``GRACE_TURNS`` more turns of the
    loop, each after a socket poll; ``fired`` says it did. For redis-py's clients, whose sockets
    are out of sight: a reply that came while the loop was busy is read and parsed in those turns
    and the call succeeds. Best effort: it cannot tell a request redis-py sent late (a starved
    loop) from one Redis answered late."""

    __slots__ = ("_handle", "_loop", "_task", "_turns", "fired")

    def __init__(self, task: asyncio.Task[Any], seconds: float) -> None:
        self._loop = task.get_loop()
        self._task = task
        self._turns = GRACE_TURNS
        self.fired = False
        self._handle = self._loop.call_later(seconds, self._tick)

    def _tick(self) -> None:
        if self._turns:
            self._turns -= 1
            self._handle = self._loop.call_later(RECHECK_SECONDS, self._tick)
            return
        self.fired = True
        self._task.cancel()

    def cancel(self) -> None:
        self._handle.cancel()
