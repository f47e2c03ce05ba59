"""An in-process limiter with the Redis script's semantics, line for line.

The embedded default when no Redis is configured, and the fallback when Redis fails
(``on_failure: local``, and the counting behind ``open``). Its buckets hold per process: with N
workers a key gets up to N times its limits. As a fallback it starts from the levels Redis last
reported for the buckets (``observe``), not from full ones: a key Redis had drained stays
drained, rather than getting a fresh burst in every process on top of what Redis admitted.

Memory is bounded: past ``max_buckets`` the full buckets are dropped (a missing bucket is a full
one, so this changes nothing), then the least recently written ones (which forgives their debt:
acceptable for a per-process fallback).

Waiting for capacity (``limits.max_wait``) works as in the script: a short request whose wait
fits is debited now, into debt, and admitted after the wait. A give-back recognises "nothing was
written since" by the identity of the state it wrote: every write stores a new list.

Usage counters and budgets are kept beside the buckets, in a ``LocalLedger``
(``gateway/accounting/local_ledger.py``), with the same scripts' semantics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from gateway.accounting.budgets import SpendDecision, SpendPlan
from gateway.accounting.ledger import Entry
from gateway.accounting.local_ledger import LocalLedger
from gateway.limits.buckets import Bucket, BucketSet, Decision, Plan, Scheduled
from gateway.limits.limiter import LimiterStats
from gateway.limits.lua import NEVER_TTL_MS
from gateway.limits.waiting import WaitingRoom

# Per bucket key: [level, time of level (ms), capacity, refill per ms]
_State = list[float]


class LocalLimiter:
    def __init__(
        self,
        *,
        max_buckets: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        stats: LimiterStats | None = None,
    ) -> None:
        self._buckets: dict[str, _State] = {}
        self._max = max_buckets
        self._clock = clock
        self.stats = stats if stats is not None else LimiterStats()
        # Requests of each key sleeping until their slot; the Redis limiter shares it.
        self.room = WaitingRoom()
        # Usage counters and budget spend (the Redis limiter's fallback for them too).
        self.ledger = LocalLedger()

    def __len__(self) -> int:
        return len(self._buckets)

    async def admit(self, plan: Plan) -> Decision:
        return self.admit_now(plan)

    async def peek(self, buckets: Sequence[Bucket]) -> list[float | None]:
        return list(self.levels(buckets))

    def levels(self, buckets: Sequence[Bucket]) -> list[float]:
        now = self._clock() * 1000.0
        out: list[float] = []
        for b in buckets:
            state = self._buckets.get(b.key)
            cap = float(b.capacity)
            out.append(cap if state is None else _refill(state, now, cap, b.per_second / 1000.0))
        return out

    def admit_now(self, plan: Plan, *, force: bool = False, degraded: bool = False) -> Decision:
        """Admit, admit after a wait, or refuse, synchronously. ``force`` debits and admits even
        when short (the counting behind ``on_failure: open``)."""
        buckets = plan.buckets.buckets
        if not buckets:
            self.stats.admitted += 1
            return Decision(plan, True, degraded=degraded)
        now = self._clock() * 1000.0
        tokens = plan.tokens
        states = self._buckets
        levels: list[float] = []
        retry = 0.0
        limiting = -1
        for i, b in enumerate(buckets):
            cap = b.capacity
            rate = b.per_second / 1000.0
            cost = tokens if b.kind == "tokens" else 1
            state = states.get(b.key)
            v = float(cap) if state is None else _refill(state, now, cap, rate)
            levels.append(v)
            if cost > 0 and v < cost:
                if cost > cap or rate <= 0:
                    retry, limiting = -1.0, i
                elif retry >= 0:
                    wait = (cost - v) / rate
                    if wait > retry:
                        retry, limiting = wait, i
        allowed = limiting < 0 or force
        # The lists this admission writes, when it waits: its ticket for a give-back.
        written: list[_State | None] | None = None
        if (
            not allowed
            and 0 < retry <= plan.buckets.max_wait_ms
            and self.room.enter(plan.key_name, plan.buckets.max_waiting)
        ):
            # Debit now, serve later: the slot is when the deepest debt is paid back (GCRA).
            allowed, written = True, []
        remaining: list[int] = []
        reset: list[int] = []
        for i, b in enumerate(buckets):
            cap = b.capacity
            rate = b.per_second / 1000.0
            v = levels[i]
            cost = tokens if b.kind == "tokens" else 1
            if allowed and cost > 0:
                v -= cost
                states.pop(b.key, None)  # re-insert: dict order is write order (LRU)
                states[b.key] = state = [v, now, cap, rate]
                if written is not None:
                    written.append(state)
            elif written is not None:
                written.append(None)
            remaining.append(math.floor(v))
            reset.append(_reset_ms(v, cap, rate))
        if len(states) > self._max:
            self._shrink(now)
        if allowed:
            self.stats.admitted += 1
            if written is not None:
                return Scheduled(
                    plan,
                    True,
                    0,
                    tuple(remaining),
                    tuple(reset),
                    degraded=degraded,
                    wait_ms=math.ceil(retry),
                    ticket=tuple(written),
                )
            return Decision(plan, True, 0, tuple(remaining), tuple(reset), degraded=degraded)
        self.stats.refused += 1
        retry_ms = math.ceil(retry) if retry > 0 else int(retry)
        return Decision(
            plan, False, retry_ms, tuple(remaining), tuple(reset), limiting, degraded=degraded
        )

    async def settle(
        self, decision: Decision | None, actual_tokens: int | None, entry: Entry | None = None
    ) -> None:
        if decision is not None and actual_tokens is not None and decision.allowed:
            self.settle_now(decision.plan, actual_tokens - decision.plan.tokens)
        if entry is not None:
            self.ledger.apply(entry, entry.spend_correction)

    async def reserve(self, plan: SpendPlan) -> SpendDecision:
        return self.ledger.reserve(plan)

    async def release(self, decision: SpendDecision) -> None:
        if decision.allowed:
            self.ledger.apply(decision.release(), -decision.plan.reserve)

    async def read_hashes(self, keys: Sequence[str]) -> list[dict[str, int]]:
        return [self.ledger.hgetall(key) for key in keys]

    async def read_counters(self, keys: Sequence[str]) -> list[int]:
        return [self.ledger.get(key) for key in keys]

    def waited(self, decision: Decision) -> None:
        self.room.leave(decision.plan.key_name)

    async def give_back(self, decision: Decision) -> None:
        self.give_back_now(decision)

    def give_back_now(self, decision: Decision) -> list[bool]:
        """The script's ``GIVE_BACK``: per bucket, whether the request's debit was returned
        (nothing written since it, or nobody scheduled on the bucket)."""
        ticket = decision.ticket
        if not isinstance(ticket, tuple):
            return []
        plan = decision.plan
        now = self._clock() * 1000.0
        states = self._buckets
        out: list[bool] = []
        for b, written in zip(plan.buckets.buckets, ticket, strict=False):
            cost = plan.cost(b)
            state = states.get(b.key)
            cap = b.capacity
            rate = b.per_second / 1000.0
            v = float(cap) if state is None else _refill(state, now, cap, rate)
            if cost <= 0 or written is None or not (v >= 0 or state is written):
                out.append(False)
                continue
            v = min(float(cap), v + cost)
            states.pop(b.key, None)
            if v < cap:
                states[b.key] = [v, now, cap, rate]
            out.append(True)
        return out

    def settle_now(self, plan: Plan, delta: int) -> None:
        """Debit ``delta`` more tokens (refund when negative) from the plan's token buckets."""
        if delta == 0:
            return
        now = self._clock() * 1000.0
        states = self._buckets
        for b in plan.buckets.buckets:
            if b.kind != "tokens":
                continue
            cap = b.capacity
            rate = b.per_second / 1000.0
            state = states.pop(b.key, None)
            v = float(cap) if state is None else _refill(state, now, cap, rate)
            v = min(float(cap), v - delta)
            if v < cap:
                states[b.key] = [v, now, cap, rate]
        if len(states) > self._max:
            self._shrink(now)

    def observe(self, bucket_set: BucketSet, levels: Sequence[int]) -> None:
        """Set the buckets to the levels the shared store just reported for them (its
        ``remaining``, floored: this side of exact), refilling from now on."""
        now = self._clock() * 1000.0
        states = self._buckets
        for b, level in zip(bucket_set.buckets, levels, strict=False):
            states.pop(b.key, None)  # re-insert: dict order is write order (LRU)
            if level < b.capacity:  # a missing bucket is a full one
                states[b.key] = [float(level), now, b.capacity, b.per_second / 1000.0]
        if len(states) > self._max:
            self._shrink(now)

    async def aclose(self) -> None:
        self._buckets.clear()

    def _shrink(self, now: float) -> None:
        states = self._buckets
        for key, state in list(states.items()):
            if _refill(state, now, state[2], state[3]) >= state[2] or _expired(state, now):
                del states[key]
        target = self._max * 9 // 10
        if len(states) > target:
            for key in list(states)[: len(states) - target]:
                del states[key]


def _refill(state: _State, now: float, cap: float, rate: float) -> float:
    elapsed = now - state[1]
    return min(cap, state[0] + (elapsed if elapsed > 0 else 0.0) * rate)


def _expired(state: _State, now: float) -> bool:
    # Mirrors the Redis key's expiry for buckets that never refill.
    return state[3] <= 0 and now - state[1] >= NEVER_TTL_MS


def _reset_ms(v: float, cap: float, rate: float) -> int:
    if v >= cap:
        return 0
    if rate > 0:
        return math.ceil((cap - v) / rate)
    return -1
