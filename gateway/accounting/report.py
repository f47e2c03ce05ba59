"""``GET /admin/usage``: the usage counters and budgets, added up for a key, a team or everyone.

Query: ``key``, ``team``, ``model`` (names as configured or as clients sent them), ``from`` and
``to`` (``2026-12-03``, ``2026-12``, ``2026-12-03T14:00:00Z`` or Unix seconds; a date or month
as ``to`` includes all of it), ``granularity`` (``hour``, ``day`` or ``month``). Default: this
UTC month by day. A value that does not parse, an unknown name or parameter, is a 400 in
OpenAI's shape naming it in ``param``.

What is added up (``gateway/accounting/ledger.py`` says where the counters are):

- a key: its own counters;
- a team: the team's counters, which every key of the team adds to, keys since removed from
  the config included; ``keys`` lists the team's keys as the config has them now;
- nobody in particular: every key the config lists (a key removed from the config drops out,
  though its team's counters keep its usage), with each team's counters under ``teams``.

A key's counters follow its hash: a key given a new secret starts new counters. Reads are one
``HGETALL`` per scope and period (pipelined; on Redis Cluster, each to its node), so a query
may read at most ``MAX_HASHES`` of them: narrow it (a key, a team, a shorter range, a coarser
granularity) beyond that.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from gateway.accounting.accounts import Accounts
from gateway.accounting.budgets import BudgetLine
from gateway.accounting.ledger import WHAT, model_name, split_field, usage_key
from gateway.accounting.periods import (
    KINDS,
    UTC,
    iso,
    period_label,
    period_range,
    period_start,
)
from gateway.errors import GatewayError
from gateway.limits import Limiter

MAX_PERIODS = 1000
MAX_HASHES = 20_000
_PARAMS = ("key", "team", "model", "from", "to", "granularity")
_MONTH = re.compile(r"\d{4}-\d{2}")
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_UNIX = re.compile(r"\d{1,12}(\.\d+)?")

Counts = dict[str, int]


def bad_value(param: str, message: str) -> GatewayError:
    return GatewayError(400, message, code="invalid_value", param=param)


@dataclass(frozen=True, slots=True)
class UsageQuery:
    key: str | None
    team: str | None
    model: str | None
    start: float
    end: float
    granularity: str
    periods: tuple[str, ...]


def parse_query(query_string: bytes, accounts: Accounts, now: float) -> UsageQuery:
    """The query of a ``GET /admin/usage``, or the 400 that names what is wrong with it."""
    values: dict[str, str] = {}
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if name not in _PARAMS:
            raise bad_value(name, f"Unknown parameter '{name}'; known: {', '.join(_PARAMS)}.")
        if name in values:
            raise bad_value(name, f"'{name}' is given more than once.")
        values[name] = value.strip()
    granularity = values.get("granularity") or "day"
    if granularity not in KINDS:
        raise bad_value("granularity", "'granularity' must be hour, day or month.")
    this_month = dt.datetime.fromtimestamp(now, UTC).replace(
        day=1, hour=0, minute=0, second=0, microsecond=0
    )
    start = _moment(values.get("from"), "from", end=False)
    end = _moment(values.get("to"), "to", end=True)
    start = this_month.timestamp() if start is None else start
    end = now if end is None else end
    if start > end:
        raise bad_value("from", "'from' is after 'to'.")
    periods = period_range(granularity, start, end, MAX_PERIODS + 1)
    if len(periods) > MAX_PERIODS:
        raise bad_value(
            "granularity",
            f"The range holds more than {MAX_PERIODS} {granularity}s; use a coarser "
            "granularity or a shorter range.",
        )
    key, team = values.get("key") or None, values.get("team") or None
    if key is not None:
        account = accounts.keys.get(key)
        if account is None:
            raise bad_value("key", f"No key is named '{key}' in the config.")
        if team is not None and account.team != team:
            raise bad_value("team", f"Key '{key}' is not in team '{team}'.")
    if team is not None and team not in accounts.teams:
        raise bad_value("team", f"No key of the config is in team '{team}'.")
    return UsageQuery(
        key, team, values.get("model") or None, start, end, granularity, tuple(periods)
    )


def _moment(text: str | None, param: str, *, end: bool) -> float | None:
    """A time parameter as Unix seconds; a day or month given as ``to`` means its last moment."""
    if not text:
        return None
    try:
        if _UNIX.fullmatch(text):
            return float(text)
        if _MONTH.fullmatch(text):
            first = dt.datetime.strptime(text, "%Y-%m").replace(tzinfo=UTC)
            if not end:
                return first.timestamp()
            following = (first + dt.timedelta(days=32)).replace(day=1)
            return following.timestamp() - 0.001
        if _DAY.fullmatch(text):
            day = dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
            return day.timestamp() + (86_400 - 0.001 if end else 0)
        moment = dt.datetime.fromisoformat(text)
    except (ValueError, OverflowError):
        moment = None
    if moment is None:
        raise bad_value(
            param,
            f"'{param}' must be a date (2026-12-03), a month (2026-12), an ISO 8601 time "
            "(2026-12-03T14:00:00Z) or Unix seconds.",
        )
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _zero() -> Counts:
    return dict.fromkeys(WHAT, 0)


def _add(into: Counts, counts: Counts) -> None:
    for what, amount in counts.items():
        into[what] += amount


def counts_view(counts: Counts) -> dict[str, Any]:
    return {
        "requests": counts["req"],
        "input_tokens": counts["in"],
        "cached_input_tokens": counts["cached"],
        "output_tokens": counts["out"],
        "cost_usd": round(counts["usd"] / 1_000_000, 6),
        "cost_micro_usd": counts["usd"],
        "unpriced_requests": counts["unpriced"],
        "requests_without_usage": counts["nousage"],
    }


def _per_model(fields: dict[str, int], model: str | None) -> dict[str, Counts]:
    """A usage hash as counts per model; only ``model``'s when one is asked for."""
    out: dict[str, Counts] = {}
    for field, amount in fields.items():
        parts = split_field(field)
        if parts is None or (model is not None and parts[0] != model):
            continue
        counts = out.get(parts[0])
        if counts is None:
            counts = out[parts[0]] = _zero()
        counts[parts[1]] += amount
    return out


async def usage_report(
    query: UsageQuery, accounts: Accounts, limiter: Limiter, now: float | None = None
) -> dict[str, Any]:
    """The document ``GET /admin/usage`` answers. Raises what the store raises."""
    now = time.time() if now is None else now
    kind = query.granularity
    keys = {
        name: account.scopes[0]
        for name, account in accounts.keys.items()
        if (query.key is None or name == query.key)
        and (query.team is None or account.team == query.team)
    }
    teams = {
        team: tag
        for team, (tag, _) in accounts.teams.items()
        if query.key is None and (query.team is None or team == query.team)
    }
    scopes = [("key", name, scope) for name, scope in keys.items()]
    scopes += [("team", name, tag) for name, tag in teams.items()]
    if len(scopes) * len(query.periods) > MAX_HASHES:
        raise bad_value(
            "granularity",
            f"This query would read {len(scopes) * len(query.periods)} counters (at most "
            f"{MAX_HASHES}); ask for a key or a team, a shorter range or a coarser granularity.",
        )
    names = [usage_key(scope, kind, period) for _, _, scope in scopes for period in query.periods]
    hashes = await limiter.read_hashes(names)
    model = model_name(query.model) if query.model is not None else None
    # What the totals, periods and models add up: the team's counters for a team, else keys'.
    counted = "team" if query.team is not None and query.key is None else "key"
    totals = _zero()
    rows = {period: _zero() for period in query.periods}
    models: dict[str, Counts] = {}
    by_scope: dict[tuple[str, str], Counts] = {(owner, name): _zero() for owner, name, _ in scopes}
    found = iter(hashes)
    for owner, name, _ in scopes:
        for period in query.periods:
            per_model = _per_model(next(found), model)
            for model_seen, counts in per_model.items():
                _add(by_scope[(owner, name)], counts)
                if owner != counted:
                    continue
                _add(totals, counts)
                _add(rows[period], counts)
                _add(models.setdefault(model_seen, _zero()), counts)
    budgets = list(_budget_lines(query, accounts))
    spent = await limiter.read_counters([line.key(accounts.clock.now()) for line in budgets])
    periods_now = accounts.clock.now()
    return {
        "from": iso(query.start),
        "to": iso(query.end),
        "granularity": kind,
        "key": query.key,
        "team": query.team,
        "model": query.model,
        "usage_enabled": accounts.usage,
        "totals": counts_view(totals),
        "periods": [
            {
                "period": period_label(kind, period),
                "start": iso(period_start(kind, period).timestamp()),
                **counts_view(counts),
            }
            for period, counts in rows.items()
        ],
        "models": {name: counts_view(counts) for name, counts in sorted(models.items())},
        "keys": {
            name: counts_view(counts)
            for (owner, name), counts in by_scope.items()
            if owner == "key"
        },
        "teams": {
            name: counts_view(counts)
            for (owner, name), counts in by_scope.items()
            if owner == "team"
        },
        "budgets": [
            budget_view(line, value, periods_now.ends(line.kind))
            for line, value in zip(budgets, spent, strict=True)
        ],
    }


def _budget_lines(query: UsageQuery, accounts: Accounts) -> Iterable[BudgetLine]:
    if query.key is not None:
        yield from accounts.keys[query.key].budgets
    elif query.team is not None:
        yield from accounts.teams[query.team][1]
    else:
        yield from accounts.all_budgets()


def budget_view(line: BudgetLine, spent: int, resets: float) -> dict[str, Any]:
    """A budget as the admin API shows it: ``spent_usd`` is the period's settled cost plus the
    reservations of requests in flight."""
    return {
        "owner": line.owner,
        "name": line.name,
        "period": line.kind,
        "limit_usd": line.limit / 1_000_000,
        "spent_usd": round(spent / 1_000_000, 6),
        "spent_micro_usd": spent,
        "remaining_usd": round(max(0, line.limit - spent) / 1_000_000, 6),
        "resets_at": iso(resets),
    }
