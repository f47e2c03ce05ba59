"""Usage counters and budget spend kept in this process, with the Redis scripts' semantics.

The store when no Redis is configured (then counts are per process: with N workers each counts
its own requests, and ``GET /admin/usage`` shows the answering worker's), and the fallback while
Redis fails (``redis.on_failure``). The keys and fields are those of ``ledger.py``, so the admin
API reads this store as it reads Redis.

As a fallback for budgets it starts from what Redis last reported for each counter
(``observe``), as the local limiter does for buckets: a key Redis had seen spend its budget is
not handed a fresh one by every process.

Memory is bounded: keys expire as in Redis (hours after 8 days, days after 400...), and past
``max_keys`` the least recently written are dropped (hour hashes first in practice: they are
the most numerous and the oldest).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from gateway.accounting.budgets import SpendDecision, SpendPlan
from gateway.accounting.ledger import Entry


class LocalLedger:
    __slots__ = ("_clock", "_counters", "_expires", "_hashes", "_max")

    def __init__(self, *, max_keys: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self._hashes: dict[str, dict[str, int]] = {}
        self._counters: dict[str, int] = {}
        # Per key, when it expires (Unix seconds); dict order is write order (LRU).
        self._expires: dict[str, float] = {}
        self._max = max_keys
        self._clock = clock

    def __len__(self) -> int:
        return len(self._expires)

    def reserve(
        self, plan: SpendPlan, *, force: bool = False, degraded: bool = False
    ) -> SpendDecision:
        """The ``SPEND`` script: reserve ``plan.reserve`` on every counter, or on none.
        ``force`` reserves even on a spent budget (the counting behind ``on_failure: open``)."""
        now = self._clock()
        spent = [self.get(key, now) for key in plan.keys]
        allowed = force or not any(
            plan.refuses(value, line) for value, line in zip(spent, plan.lines, strict=True)
        )
        if allowed and plan.reserve:
            spent = [
                self._add(key, plan.reserve, int(ttl), now)
                for key, ttl in zip(plan.keys, plan.ttls, strict=True)
            ]
        return SpendDecision(plan, allowed, tuple(spent), degraded=degraded)

    def apply(self, entry: Entry, spend: int) -> None:
        """The ``SETTLE`` script's usage and spend part: ``entry``'s fields added to its usage
        hashes, ``spend`` to its spend counters."""
        now = self._clock()
        hashes, expires = self._hashes, self._expires
        fields = entry.fields
        for key, ttl in zip(entry.usage_keys, entry.usage_ttls, strict=True):
            found = hashes.get(key)
            if found is None or expires[key] <= now:
                found = hashes[key] = {}
                expires.pop(key, None)  # a new key goes last: dict order is write order
            for name, amount in fields:
                found[name] = found.get(name, 0) + amount
            # A hash written again keeps its place: keys are written in the order of their
            # periods, so dropping the first ones drops the oldest.
            expires[key] = now + int(ttl) / 1000
        if spend:
            for key, ttl in zip(entry.spend_keys, entry.spend_ttls, strict=True):
                self._add(key, spend, int(ttl), now)
        self._bound(now)

    def observe(self, keys: Sequence[str], values: Sequence[int], ttls: Sequence[str]) -> None:
        """Set counters to what Redis just reported for them."""
        now = self._clock()
        for key, value, ttl in zip(keys, values, ttls, strict=True):
            self._counters[key] = value
            self._touch(key, int(ttl), now)
        self._bound(now)

    def get(self, key: str, now: float | None = None) -> int:
        if now is None:
            now = self._clock()
        if self._expires.get(key, 0.0) <= now:
            return 0
        return self._counters.get(key, 0)

    def hgetall(self, key: str) -> dict[str, int]:
        if self._expires.get(key, 0.0) <= self._clock():
            return {}
        return dict(self._hashes.get(key, {}))

    def _add(self, key: str, amount: int, ttl_ms: int, now: float) -> int:
        value = self.get(key, now) + amount
        self._counters[key] = value
        self._touch(key, ttl_ms, now)
        return value

    def _touch(self, key: str, ttl_ms: int, now: float) -> None:
        self._expires.pop(key, None)  # re-insert: dict order is write order
        self._expires[key] = now + ttl_ms / 1000

    def _bound(self, now: float) -> None:
        if len(self._expires) <= self._max:
            return
        for key, expires in list(self._expires.items()):
            if expires <= now:
                self._drop(key)
        target = self._max * 9 // 10
        if len(self._expires) > target:
            for key in list(self._expires)[: len(self._expires) - target]:
                self._drop(key)

    def _drop(self, key: str) -> None:
        del self._expires[key]
        self._hashes.pop(key, None)
        self._counters.pop(key, None)
