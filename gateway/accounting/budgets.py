"""Spend budgets: what a request reserves against its key's and team's budgets, and the answer.

A budget (``limits.*.budget``: ``usd_per_day``, ``usd_per_month``) is charged like a token
bucket: at admission the request's most expensive outcome is reserved on every budget that
applies (``SpendPlan``: its estimated input at the input price plus its output ceiling at the
output price, ``Price.estimate``), atomically, all or none; when the response ends the
reservation is corrected to the real cost (``Entry`` in ``ledger.py``). So a budget is
exceeded only by what requests cost beyond their reservations (an input estimate that fell
short), never by how many run at once.

A counter refuses when it is spent (at or past its limit) or the reservation would take it past
its limit: the refusal is 429 with ``code: "budget_exceeded"`` and ``type:
"insufficient_quota"``, OpenAI's type for a spent quota, so that code handling OpenAI's own
billing refusal handles this one; ``retry-after`` says when the budget starts again (UTC
midnight, or the first of the month). The OpenAI SDKs retry a 429 at once or after
``retry-after`` when that is at most a minute; a reset further away adds ``x-should-retry:
false`` so they do not retry in vain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from gateway import errors
from gateway.accounting.ledger import SPEND_TTL_MS, Entry, spend_key
from gateway.accounting.periods import Periods, iso
from gateway.errors import GatewayError
from gateway.types import RawHeaders

BudgetKind = Literal["day", "month"]
# The smallest remaining budget among those that apply, in dollars, after this request's
# reservation.
SPEND_REMAINING_HEADER = b"x-gateway-spend-remaining-usd"
_ADJECTIVE = {"day": "daily", "month": "monthly"}
# The OpenAI SDKs honour retry-after up to this many seconds.
_SDK_RETRY_SECONDS = 60


def usd(micro: int) -> str:
    """Micro-dollars as dollars, at most 6 decimals, no trailing zeros: ``12.5``, ``0.000123``."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), 1_000_000)
    text = f"{whole}.{frac:06d}".rstrip("0").rstrip(".")
    return sign + text


def money(micro: int) -> str:
    """For messages: ``$12.50``, ``$0.000123``."""
    text = usd(micro)
    if "." not in text:
        return f"${text}.00"
    whole, frac = text.split(".")
    return f"${whole}.{frac.ljust(2, '0')}"


@dataclass(frozen=True, slots=True)
class BudgetLine:
    """One budget of one scope: a key's or a team's money per day or per month."""

    scope: str  # for messages: "key 'demo'", "team 'ml'"
    owner: Literal["key", "team"]
    name: str
    base: str  # the scope's prefix in the store (gateway/accounting/ledger.py)
    kind: BudgetKind
    limit: int  # micro-dollars

    def key(self, periods: Periods) -> str:
        return spend_key(self.base, self.kind, periods.day if self.kind == "day" else periods.month)


@dataclass(frozen=True, slots=True)
class SpendPlan:
    """What one request reserves: ``reserve`` micro-dollars on each counter of ``keys`` (one per
    line of ``lines``, for the periods of ``periods``)."""

    key_name: str
    lines: tuple[BudgetLine, ...]
    keys: tuple[str, ...]
    reserve: int
    periods: Periods

    @classmethod
    def of(
        cls, key_name: str, lines: tuple[BudgetLine, ...], reserve: int, periods: Periods
    ) -> SpendPlan:
        return cls(key_name, lines, tuple(line.key(periods) for line in lines), reserve, periods)

    @property
    def ttls(self) -> tuple[str, ...]:
        return tuple(str(SPEND_TTL_MS[line.kind]) for line in self.lines)

    @property
    def limits(self) -> tuple[int, ...]:
        return tuple(line.limit for line in self.lines)

    def refuses(self, spent: int, line: BudgetLine) -> bool:
        """Whether a counter holding ``spent`` refuses this reservation (the script's rule)."""
        return spent >= line.limit or spent + self.reserve > line.limit


@dataclass(frozen=True, slots=True)
class SpendDecision:
    """A store's answer to a ``SpendPlan``. ``spent`` runs parallel to the plan's lines: what
    each counter holds, after the reservation when it was taken. ``degraded``: decided in this
    process while Redis was failing; ``unavailable``: nobody could decide (``on_failure:
    closed``), a 503."""

    plan: SpendPlan
    allowed: bool
    spent: tuple[int, ...] = ()
    degraded: bool = False
    unavailable: bool = False
    retry_after_ms: int = 0  # unavailable: when to try again

    def remaining(self, given_back: bool = False) -> int:
        """The smallest remaining budget, after the reservation (before it, once given back)."""
        plan = self.plan
        if not self.spent:
            return 0
        back = plan.reserve if given_back and self.allowed else 0
        return max(
            0,
            min(
                line.limit - spent + back
                for line, spent in zip(plan.lines, self.spent, strict=True)
            ),
        )

    def headers(self, given_back: bool = False) -> RawHeaders:
        if not self.spent:
            return []
        return [(SPEND_REMAINING_HEADER, usd(self.remaining(given_back)).encode())]

    def limiting(self) -> BudgetLine | None:
        """The budget that refused; of several, the one that starts again last (until then the
        request cannot pass)."""
        plan = self.plan
        found: BudgetLine | None = None
        for line, spent in zip(plan.lines, self.spent, strict=True):
            if plan.refuses(spent, line) and (
                found is None or plan.periods.ends(line.kind) > plan.periods.ends(found.kind)
            ):
                found = line
        return found

    def error(self, now: float) -> GatewayError:
        """The refusal: 429 ``budget_exceeded``, or 503 when budgets could not be checked."""
        if self.unavailable:
            seconds = max(1, -(-self.retry_after_ms // 1000))
            return errors.limits_unavailable(
                "Budgets cannot be checked right now. Please try again shortly.",
                [(b"retry-after", str(seconds).encode())],
            )
        line = self.limiting()
        assert line is not None, "an allowed decision is not an error"
        plan = self.plan
        spent = self.spent[plan.lines.index(line)]
        resets = plan.periods.ends(line.kind)
        what = f"{line.scope}'s {money(line.limit)} {_ADJECTIVE[line.kind]} budget"
        if spent >= line.limit:
            reason = f"Budget exceeded: {line.scope} has spent {money(spent)} of its "
            reason += f"{money(line.limit)} {_ADJECTIVE[line.kind]} budget."
        elif plan.reserve > line.limit:
            reason = (
                f"Request too large for {what}: it may cost up to {money(plan.reserve)}. "
                "Lower max_tokens (or max_completion_tokens) to run it."
            )
        else:
            reason = (
                f"Budget exceeded: {line.scope} has spent {money(spent)} of its "
                f"{money(line.limit)} {_ADJECTIVE[line.kind]} budget, and this request may "
                f"cost up to {money(plan.reserve)}."
            )
        seconds = max(1, math.ceil(resets - now))
        headers: RawHeaders = [(b"retry-after", str(seconds).encode()), *self.headers()]
        if seconds > _SDK_RETRY_SECONDS or plan.reserve > line.limit:
            headers.append((b"x-should-retry", b"false"))
        message = f"{reason} It resets at {iso(resets)}."
        return errors.budget_exceeded(message, headers)

    def release(self) -> Entry:
        """What gives the reservation back: a correction of ``-reserve`` on its counters."""
        plan = self.plan
        return Entry(
            spend_keys=plan.keys,
            spend_ttls=plan.ttls,
            cost=0,
            reserved=plan.reserve,
            reserved_locally=self.degraded,
        )
