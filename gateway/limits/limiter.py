"""What every limiter offers the proxy, and the counters it keeps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from gateway.accounting.budgets import SpendDecision, SpendPlan
from gateway.accounting.ledger import Entry
from gateway.limits.buckets import Bucket, Decision, Plan

# closed: Redis decides; open: Redis is skipped (on_failure decides) until a probe is due;
# half-open: one request is probing Redis, the others still fall back.
BreakerState = Literal["closed", "open", "half-open"]


@dataclass(slots=True)
class LimiterStats:
    """Counters a metrics endpoint can read. ``degraded`` counts decisions made without Redis
    (breaker open, Redis failing): non-zero growth means the limits are per process.
    ``last_error`` is the class name of Redis's last failure (``ConnectionError``,
    ``TimeoutError``...), never its text, which may name hosts; ``last_error_at`` its Unix time.
    ``usage_pending``: settled requests whose usage and spend wait for Redis to answer again;
    ``usage_dropped``: those dropped because too many waited."""

    admitted: int = 0
    refused: int = 0
    degraded: int = 0
    redis_errors: int = 0
    breaker_trips: int = 0
    breaker: BreakerState = "closed"
    last_error: str | None = None
    last_error_at: float | None = None
    usage_pending: int = 0
    usage_dropped: int = 0


class Limiter(Protocol):
    stats: LimiterStats

    async def admit(self, plan: Plan) -> Decision:
        """Debit every bucket of the plan, or none, and say which. A plan that may wait
        (``max_wait_ms``) and is short may be admitted for a slot ``wait_ms`` away; the request
        then holds a place in the key's waiting room until ``waited``."""
        ...

    def waited(self, decision: Decision) -> None:
        """The wait of a decision admitted with ``wait_ms`` is over (its slot came, or it left):
        its place in the waiting room is free."""
        ...

    async def give_back(self, decision: Decision) -> None:
        """A request admitted with ``wait_ms`` left before its slot: return its debits on every
        bucket where no later request was scheduled behind it. Never raises."""
        ...

    async def settle(
        self, decision: Decision | None, actual_tokens: int | None, entry: Entry | None = None
    ) -> None:
        """Correct an admitted request's token buckets by ``actual - reserved`` tokens (``None``:
        no usage was found, the reservation stands; no ``decision``: no buckets), and add
        ``entry`` (its usage counters and budget correction), all in one store call. Never
        raises."""
        ...

    async def reserve(self, plan: SpendPlan) -> SpendDecision:
        """Reserve ``plan.reserve`` on every budget counter of the plan, or on none (a refusal);
        the same ``redis.on_failure`` rules as ``admit`` when Redis fails."""
        ...

    async def release(self, decision: SpendDecision) -> None:
        """Give back an allowed reservation whose request will not be settled (the limits
        refused it, or its client left while it waited). Never raises."""
        ...

    async def read_hashes(self, keys: Sequence[str]) -> list[dict[str, int]]:
        """The usage hashes of ``keys`` (the admin API). Raises when the store fails."""
        ...

    async def read_counters(self, keys: Sequence[str]) -> list[int]:
        """The spend counters of ``keys`` (the admin API). Raises when the store fails."""
        ...

    async def peek(self, buckets: Sequence[Bucket]) -> list[float | None]:
        """Each bucket's level now, debiting nothing (the admin API); None where it cannot be
        read (Redis failing)."""
        ...

    async def aclose(self) -> None: ...
