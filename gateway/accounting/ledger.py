"""Where usage and spend are counted: the store's keys, their fields and lifetimes, and what one
finished request adds to them (``Entry``).

The store is Redis (``redis.url``) or the process (``local_ledger.py``); both hold the same
keys with the same meaning, so the admin API reads either alike.

- **Usage**: one hash per scope and period, ``<scope>:u:<h|d|m>:<period id>``, where the scope is
  a key's prefix (``rl:{k:<id>}``, or ``rl:{t:<team>}:k:<id>`` in a team) or a team's tag
  (``rl:{t:<team>}``), the same hash tag as the key's buckets (``gateway/limits/plan.py``), so
  that the call settling a request's buckets can count its usage too, on Redis Cluster as
  well. Fields are ``<model>|<what>``: ``req`` (requests), ``in`` (input tokens, cached ones
  included), ``cached`` (of those, read from a prompt cache), ``out`` (output tokens), ``usd``
  (cost in micro-dollars), ``unpriced`` (requests whose reported tokens had no price),
  ``nousage`` (requests whose response reported no usage: a stream that did not ask for it, a
  response cut short). Only non-zero increments are written. Hours are kept 8 days, days 400,
  months 5 years: each write sets the hash's expiry afresh.
- **Spend** (budgets): one counter per scope and period, ``<scope>:b:<d|m>:<period id>``, in
  micro-dollars: the settled cost of the period's requests plus the reservations of those in
  flight. A day's counter is kept 3 days, a month's 63, from its last write.

A model is named in fields as the client named it (its public name) when that is a plain name
(letters, digits, ``._:/@+-``, at most 64); another is counted as ``other`` and a request that
names no model (a model list) as ``-``. Fields are bounded by what a key's clients send, and a
key's requests are bounded by its limits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.accounting.periods import Periods

DAY_MS = 86_400_000
USAGE_TTL_MS = {"hour": 8 * DAY_MS, "day": 400 * DAY_MS, "month": 5 * 366 * DAY_MS}
SPEND_TTL_MS = {"day": 3 * DAY_MS, "month": 63 * DAY_MS}
# What a usage hash counts per model, in the order the admin API shows them.
WHAT = ("req", "in", "cached", "out", "usd", "unpriced", "nousage")
NO_MODEL = "-"
OTHER_MODEL = "other"
_PLAIN_MODEL = re.compile(r"[A-Za-z0-9._:/@+-]{1,64}")


def usage_key(scope: str, kind: str, period: str) -> str:
    return f"{scope}:u:{kind[0]}:{period}"


def spend_key(scope: str, kind: str, period: str) -> str:
    return f"{scope}:b:{kind[0]}:{period}"


def usage_keys(scope: str, periods: Periods) -> tuple[str, str, str]:
    return (
        usage_key(scope, "hour", periods.hour),
        usage_key(scope, "day", periods.day),
        usage_key(scope, "month", periods.month),
    )


USAGE_TTLS = tuple(str(USAGE_TTL_MS[kind]) for kind in ("hour", "day", "month"))


def model_name(model: str | None) -> str:
    """How a request's model is named in usage fields."""
    if model is None:
        return NO_MODEL
    return model if _PLAIN_MODEL.fullmatch(model) else OTHER_MODEL


def split_field(field: str) -> tuple[str, str] | None:
    """``gpt-4o|in`` -> ``("gpt-4o", "in")``; None for a field this module did not write."""
    model, sep, what = field.rpartition("|")
    return (model, what) if sep and what in WHAT else None


@dataclass(slots=True)  # made per request: not frozen, which costs 5x as much to make
class Entry:
    """What one finished request adds to the store, in one call with its buckets' settlement.

    ``fields`` are added to every hash of ``usage_keys`` (the key's and its team's, for the
    hour, the day and the month; parallel ``usage_ttls`` in ms). ``spend_keys`` are the budget
    counters its reservation went on (parallel ``spend_ttls``): they end up holding ``cost``
    for it, so they are corrected by ``cost - reserved``. ``reserved_locally``: the reservation
    was made in this process while Redis was failing, so Redis never saw it and gets the whole
    ``cost``."""

    usage_keys: tuple[str, ...] = ()
    usage_ttls: tuple[str, ...] = ()
    fields: tuple[tuple[str, int], ...] = ()
    spend_keys: tuple[str, ...] = ()
    spend_ttls: tuple[str, ...] = ()
    cost: int = 0
    reserved: int = 0
    reserved_locally: bool = False

    @property
    def spend_correction(self) -> int:
        """What the counters holding the reservation need added (negative: a refund)."""
        return self.cost - self.reserved

    @property
    def shared_spend_correction(self) -> int:
        """What Redis' counters need added: the correction, or the whole cost when Redis never
        saw the reservation."""
        return self.cost if self.reserved_locally else self.cost - self.reserved

    def spend_only(self) -> Entry:
        """The same spend counters, without the usage counters."""
        return Entry(spend_keys=self.spend_keys, spend_ttls=self.spend_ttls)
