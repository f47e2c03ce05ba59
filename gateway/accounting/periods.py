"""The accounting periods: the UTC hour, day and calendar month a moment falls in.

Counters and budgets are kept per period under the period's id (``2026120314``, ``20261203``,
``202612``), so a new period starts from zero without anything being reset, and old ones expire.
The moment is the gateway's clock (``time.time()``), not Redis': period ids are part of the
keys a script is given, and Redis' Lua has no calendar. Gateways kept in step by NTP agree to
the millisecond; a request within that of midnight may be put on either day.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass

UTC = dt.UTC
KINDS = ("hour", "day", "month")
_FORMATS = {"hour": "%Y%m%d%H", "day": "%Y%m%d", "month": "%Y%m"}


@dataclass(frozen=True, slots=True)
class Periods:
    hour: str
    day: str
    month: str
    day_ends: float  # Unix seconds when the day's budget starts again
    month_ends: float
    hour_ends: float = 0.0  # when these ids stop being current (the next hour)

    @classmethod
    def at(cls, unix: float) -> Periods:
        moment = dt.datetime.fromtimestamp(unix, UTC)
        hour_start = moment.replace(minute=0, second=0, microsecond=0)
        day_start = hour_start.replace(hour=0)
        month_start = day_start.replace(day=1)
        next_month = (month_start + dt.timedelta(days=32)).replace(day=1)
        return cls(
            hour=moment.strftime("%Y%m%d%H"),
            day=moment.strftime("%Y%m%d"),
            month=moment.strftime("%Y%m"),
            day_ends=(day_start + dt.timedelta(days=1)).timestamp(),
            month_ends=next_month.timestamp(),
            hour_ends=(hour_start + dt.timedelta(hours=1)).timestamp(),
        )

    def ends(self, kind: str) -> float:
        """When the ``day`` or ``month`` period ends (its budget starts again)."""
        return self.day_ends if kind == "day" else self.month_ends


class PeriodClock:
    """``Periods.at(now)``, computed once an hour rather than per request (it is a few
    microseconds of datetime arithmetic, and every settled request needs it)."""

    __slots__ = ("_clock", "_periods", "_since")

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        now = clock()
        self._periods = Periods.at(now)
        self._since = now

    def now(self) -> Periods:
        periods = self._periods
        now = self._clock()
        if now >= periods.hour_ends or now < self._since:  # a new hour, or the clock went back
            periods = self._periods = Periods.at(now)
            self._since = now
        return periods

    def time(self) -> float:
        return self._clock()


def period_range(kind: str, start: float, end: float, limit: int = 1000) -> list[str]:
    """The ids of the periods of ``kind`` (hour, day, month) from ``start`` to ``end`` (Unix
    seconds, both included), oldest first; at most ``limit`` of them (one more tells the caller
    the range was longer)."""
    step = {"hour": dt.timedelta(hours=1), "day": dt.timedelta(days=1)}
    fmt = _FORMATS[kind]
    moment = dt.datetime.fromtimestamp(start, UTC).replace(minute=0, second=0, microsecond=0)
    if kind != "hour":
        moment = moment.replace(hour=0)
    if kind == "month":
        moment = moment.replace(day=1)
    last = dt.datetime.fromtimestamp(end, UTC)
    out: list[str] = []
    while moment <= last and len(out) < limit:
        out.append(moment.strftime(fmt))
        if kind == "month":
            moment = (moment.replace(day=1) + dt.timedelta(days=32)).replace(day=1)
        else:
            moment += step[kind]
    return out


def period_start(kind: str, period: str) -> dt.datetime:
    """When the period with this id starts (UTC)."""
    return dt.datetime.strptime(period, _FORMATS[kind]).replace(tzinfo=UTC)


def period_label(kind: str, period: str) -> str:
    """A period id as people write it: ``2026-12-03T14``, ``2026-12-03``, ``2026-12``."""
    if kind == "hour":
        return f"{period[:4]}-{period[4:6]}-{period[6:8]}T{period[8:10]}"
    if kind == "day":
        return f"{period[:4]}-{period[4:6]}-{period[6:8]}"
    return f"{period[:4]}-{period[4:6]}"


def iso(unix: float) -> str:
    """Unix seconds as ISO 8601 in UTC, to the second: ``2026-12-04T00:00:00Z``."""
    return dt.datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
