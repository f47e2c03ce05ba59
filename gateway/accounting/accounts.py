"""Per config snapshot: which keys are accounted and budgeted, and what a finished request adds.

Built once per config (with the planner, off the event loop on reload). A key needs a
``KeyAccount`` when usage is counted (``usage.enabled``, the default) or a budget applies to it
(its own ``limits.budget``, ``limits.default.budget`` when it has no limits of its own, or its
team's ``limits.teams.<team>.budget``); a config with neither gives none, and a request then
pays nothing for accounting (``Accounts.of`` returns None).

Where a key's counters are: under its prefix (``gateway/limits/plan.py``: its team's hash tag in
a team, else its own), and its team's under the team's tag, so that one script settles the
request's buckets, usage and spend on Redis Cluster too. A key is found by its hash, not its
name: a key given a new secret starts new counters (its team's carry on).

What a finished request adds (``entry``), however it ended:

- one request, and the tokens its response reported (input, cached input, output); none when
  it reported no usage (then ``nousage``, unless the upstream failed or refused, which means it
  generated nothing);
- its cost, from ``prices``: the model the upstream was asked for (an alias's target) is
  priced first, then the public name, then ``prices.default``; a model with no price costs 0
  and its reported tokens count as ``unpriced``;
- on its budgets, the reservation corrected to that cost, as tokens are settled
  (``gateway/pipeline/relay.py``): to the reported cost; to 0 when the upstream never answered
  or refused with no usage; and when a response reported nothing (a stream without usage, a
  client that left, a stream cut short) the reservation stands as its cost, since the upstream
  generated until it stopped and nothing says how much.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from gateway.accounting.budgets import BudgetLine, SpendDecision, SpendPlan
from gateway.accounting.ledger import USAGE_TTLS, WHAT, Entry, model_name, usage_keys
from gateway.accounting.periods import PeriodClock, Periods
from gateway.accounting.prices import PriceTable
from gateway.config.model import ApiKey, Budget, GatewayConfig
from gateway.limits.plan import key_prefix, team_tag
from gateway.openai.usage import Usage

# Model names whose field names are kept; models may be client-chosen, so bound it.
_MAX_MODELS = 1024


def budget_lines(
    budget: Budget | None, owner: Literal["key", "team"], name: str, base: str
) -> tuple[BudgetLine, ...]:
    """A budget's lines (its day and its month), its amounts in whole micro-dollars."""
    if budget is None:
        return ()
    scope = f"{owner} '{name}'"
    lines: list[BudgetLine] = []
    if budget.usd_per_day is not None:
        lines.append(BudgetLine(scope, owner, name, base, "day", _micro(budget.usd_per_day)))
    if budget.usd_per_month is not None:
        lines.append(BudgetLine(scope, owner, name, base, "month", _micro(budget.usd_per_month)))
    return tuple(lines)


def _micro(usd: float) -> int:
    return round(usd * 1_000_000)


class KeyAccount:
    """One key's accounting: where its usage is counted, and the budgets it is charged."""

    __slots__ = ("_hour", "_keys", "budgets", "name", "scopes", "team", "usage_ttls")

    def __init__(
        self, name: str, team: str | None, scopes: tuple[str, ...], budgets: tuple[BudgetLine, ...]
    ) -> None:
        self.name = name
        self.team = team
        self.scopes = scopes  # the key's prefix, then its team's tag
        self.budgets = budgets
        self._hour = ""
        self._keys: tuple[str, ...] = ()
        self.usage_ttls = USAGE_TTLS * len(scopes)

    def usage_keys(self, periods: Periods) -> tuple[str, ...]:
        """The usage hashes of this hour, day and month, the key's then its team's (made once
        an hour); ``usage_ttls`` are their lifetimes (ms)."""
        if periods.hour != self._hour:
            self._keys = tuple(key for scope in self.scopes for key in usage_keys(scope, periods))
            self._hour = periods.hour
        return self._keys

    def spend_plan(self, reserve: int, periods: Periods) -> SpendPlan:
        return SpendPlan.of(self.name, self.budgets, reserve, periods)


class Accounts:
    def __init__(
        self, config: GatewayConfig, *, namespace: str = "rl", clock: PeriodClock | None = None
    ) -> None:
        self.usage = config.usage.enabled
        self.prices = PriceTable.from_config(config.prices)
        self.clock = clock if clock is not None else PeriodClock()
        limits = config.limits
        # Per team with a key: its tag and its budgets.
        self.teams: dict[str, tuple[str, tuple[BudgetLine, ...]]] = {}
        for key in config.keys:
            if key.team is not None and key.team not in self.teams:
                tag = team_tag(key.team, namespace)
                team_limits = limits.teams.get(key.team)
                budget = team_limits.budget if team_limits is not None else None
                self.teams[key.team] = (tag, budget_lines(budget, "team", key.team, tag))
        self.keys: dict[str, KeyAccount] = {}
        for key in config.keys:
            self.keys[key.name] = self._account(key, config, namespace)
        self._fields: dict[str | None, tuple[str, ...]] = {}

    def _account(self, key: ApiKey, config: GatewayConfig, namespace: str) -> KeyAccount:
        own = key.limits if key.limits is not None else config.limits.default
        prefix = key_prefix(key, namespace)
        lines = budget_lines(own.budget, "key", key.name, prefix)
        scopes: tuple[str, ...] = (prefix,)
        if key.team is not None:
            tag, team_lines = self.teams[key.team]
            scopes += (tag,)
            lines += team_lines
        return KeyAccount(key.name, key.team, scopes, lines)

    def of(self, key_name: str) -> KeyAccount | None:
        """The key's account when a request of it is accounted or budgeted; None when neither
        (then nothing about accounting costs the request anything)."""
        account = self.keys.get(key_name)
        if account is None or not (self.usage or account.budgets):
            return None
        return account

    def all_budgets(self) -> Iterable[BudgetLine]:
        for account in self.keys.values():
            yield from (line for line in account.budgets if line.owner == "key")
        for _, lines in self.teams.values():
            yield from lines

    def entry(
        self,
        account: KeyAccount,
        *,
        model: str | None,
        answered_model: str | None,
        usage: Usage | None,
        failed: bool,
        spend: SpendDecision | None,
    ) -> tuple[Entry | None, int | None]:
        """What a finished request adds to the store (None: nothing, usage not being counted
        and no budget reserved), and its cost (None when it has none: no usage was reported, or
        its model has no price). ``failed``: the upstream never answered, or answered with an
        error status (it generated nothing)."""
        req, inp, cached, out, usd, unpriced, nousage = self._names(model)
        fields: list[tuple[str, int]] = [(req, 1)]
        cost: int | None = None
        if usage is not None:
            price = self.prices.price(answered_model, model)
            if usage.input_tokens:
                fields.append((inp, usage.input_tokens))
            if usage.cache_read_tokens:
                fields.append((cached, usage.cache_read_tokens))
            if usage.output_tokens:
                fields.append((out, usage.output_tokens))
            if price is not None:
                cost = price.cost(usage)
                if cost:
                    fields.append((usd, cost))
            elif usage.total_tokens:
                fields.append((unpriced, 1))
        elif not failed:
            fields.append((nousage, 1))
        periods = self.clock.now()
        keys, ttls = (account.usage_keys(periods), account.usage_ttls) if self.usage else ((), ())
        if spend is None or not spend.allowed:
            return (Entry(keys, ttls, tuple(fields)) if keys else None), cost
        plan = spend.plan
        # Reported: its cost; never answered or refused: nothing; else the reservation stands.
        charged = (cost or 0) if usage is not None else (0 if failed else plan.reserve)
        entry = Entry(
            keys,
            ttls,
            tuple(fields),
            plan.keys,
            plan.ttls,
            charged,
            plan.reserve,
            spend.degraded,
        )
        return entry, cost

    def _names(self, model: str | None) -> tuple[str, ...]:
        """The usage fields of a model: req, in, cached, out, usd, unpriced, nousage."""
        found = self._fields.get(model)
        if found is None:
            name = model_name(model)
            found = tuple(f"{name}|{what}" for what in WHAT)
            if len(self._fields) >= _MAX_MODELS:
                self._fields.clear()
            self._fields[model] = found
        return found
