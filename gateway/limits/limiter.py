"""What every limiter offers the proxy, and the counters it keeps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gateway.limits.buckets import Decision, Plan


@dataclass(slots=True)
class LimiterStats:
    """Counters a metrics endpoint can read. ``degraded`` counts decisions made without Redis
    (breaker open, Redis failing): non-zero growth means the limits are per process."""

    admitted: int = 0
    refused: int = 0
    degraded: int = 0
    redis_errors: int = 0
    breaker_trips: int = 0
    last_error: str | None = None


class Limiter(Protocol):
    stats: LimiterStats

    async def admit(self, plan: Plan) -> Decision:
        """Debit every bucket of the plan, or none, and say which."""
        ...

    async def settle(self, decision: Decision, actual_tokens: int | None) -> None:
        """Correct an admitted request's token buckets by ``actual - reserved`` tokens. ``None``
        (no usage was found) keeps the reservation. Never raises."""
        ...

    async def aclose(self) -> None: ...
