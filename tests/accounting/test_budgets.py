"""Budget decisions as the client sees them, and the in-process ledger's bounds."""

from __future__ import annotations

import datetime as dt

import pytest

from gateway.accounting.budgets import BudgetLine, SpendDecision, SpendPlan, money, usd
from gateway.accounting.ledger import Entry, model_name, split_field
from gateway.accounting.local_ledger import LocalLedger
from gateway.accounting.periods import Periods

NOW = dt.datetime(2026, 12, 3, 23, 59, 30, tzinfo=dt.UTC).timestamp()
PERIODS = Periods.at(NOW)
DAY = BudgetLine("key 'demo'", "key", "demo", "rl:{k:x}", "day", 5_000_000)
MONTH = BudgetLine("team 'ml'", "team", "ml", "rl:{t:ml}", "month", 200_000_000)


@pytest.mark.parametrize(
    ("micro", "text", "shown"),
    [
        (0, "0", "$0.00"),
        (12_500_000, "12.5", "$12.50"),
        (123, "0.000123", "$0.000123"),
        (5_000_000, "5", "$5.00"),
    ],
)
def test_money_is_shown_to_the_micro_dollar_without_trailing_zeros(
    micro: int, text: str, shown: str
) -> None:
    assert usd(micro) == text
    assert money(micro) == shown


def decision(reserve: int, spent: tuple[int, int], allowed: bool) -> SpendDecision:
    plan = SpendPlan.of("demo", (DAY, MONTH), reserve, PERIODS)
    return SpendDecision(plan, allowed, spent)


def test_a_spent_day_says_so_and_resets_at_midnight_utc() -> None:
    error = decision(10_000, (5_000_000, 7_000_000), False).error(NOW)
    assert error.status == 429
    assert (error.type, error.code) == ("insufficient_quota", "budget_exceeded")
    assert error.message == (
        "Budget exceeded: key 'demo' has spent $5.00 of its $5.00 daily budget. "
        "It resets at 2026-12-04T00:00:00Z."
    )
    headers = dict(error.headers)
    assert headers[b"retry-after"] == b"30"  # within the SDK's minute: it may retry then
    assert b"x-should-retry" not in headers
    assert headers[b"x-gateway-spend-remaining-usd"] == b"0"


def test_of_two_spent_budgets_the_later_reset_speaks() -> None:
    error = decision(10, (5_000_000, 200_000_000), False).error(NOW)
    assert "team 'ml' has spent $200.00 of its $200.00 monthly budget" in error.message
    assert "It resets at 2027-01-01T00:00:00Z." in error.message
    headers = dict(error.headers)
    assert headers[b"x-should-retry"] == b"false"  # a month away: no point retrying


def test_a_request_that_would_pass_the_budget_says_what_it_may_cost() -> None:
    error = decision(1_500_000, (4_000_000, 0), False).error(NOW)
    assert error.message.startswith(
        "Budget exceeded: key 'demo' has spent $4.00 of its $5.00 daily budget, and this "
        "request may cost up to $1.50."
    )
    too_large = decision(6_000_000, (0, 0), False).error(NOW)
    assert too_large.message.startswith(
        "Request too large for key 'demo''s $5.00 daily budget: it may cost up to $6.00."
    )
    assert dict(too_large.headers)[b"x-should-retry"] == b"false"


def test_the_remaining_header_is_the_smallest_left_after_the_reservation() -> None:
    allowed = decision(1_000, (4_999_000, 150_000_000), True)
    assert allowed.headers() == [(b"x-gateway-spend-remaining-usd", b"0.001")]
    assert allowed.headers(given_back=True) == [(b"x-gateway-spend-remaining-usd", b"0.002")]
    assert SpendDecision(allowed.plan, False, unavailable=True).headers() == []


def test_unavailable_budgets_are_a_503_with_retry_after() -> None:
    plan = SpendPlan.of("demo", (DAY,), 10, PERIODS)
    error = SpendDecision(plan, False, unavailable=True, retry_after_ms=1500).error(NOW)
    assert (error.status, error.code) == (503, "rate_limit_unavailable")
    assert dict(error.headers)[b"retry-after"] == b"2"


def test_model_names_in_fields_are_plain_or_other() -> None:
    assert model_name("gpt-4o-2024-08-06") == "gpt-4o-2024-08-06"
    assert model_name("org/model:tag@v1") == "org/model:tag@v1"
    assert model_name("a|b") == "other"
    assert model_name("x" * 65) == "other"
    assert model_name(None) == "-"
    assert split_field("org/m|usd") == ("org/m", "usd")
    assert split_field("nonsense") is None


def test_the_local_ledger_expires_and_bounds_what_it_keeps() -> None:
    now = [1_000_000.0]
    ledger = LocalLedger(max_keys=100, clock=lambda: now[0])
    entry = Entry(("h:1",), ("1000",), (("m|req", 1),))
    ledger.apply(entry, 0)
    assert ledger.hgetall("h:1") == {"m|req": 1}
    now[0] += 1.5  # past its 1 s expiry: gone, and a new write starts afresh
    assert ledger.hgetall("h:1") == {}
    ledger.apply(entry, 0)
    assert ledger.hgetall("h:1") == {"m|req": 1}
    for i in range(500):
        ledger.apply(Entry((f"h:{i + 2}",), ("60000",), (("m|req", 1),)), 0)
    assert len(ledger) <= 100
    assert ledger.hgetall("h:501") == {"m|req": 1}  # the newest are kept


def test_the_local_ledger_continues_from_what_redis_reported() -> None:
    ledger = LocalLedger()
    plan = SpendPlan.of("demo", (DAY,), 1_000, PERIODS)
    ledger.observe(plan.keys, (4_999_500,), plan.ttls)
    assert not ledger.reserve(plan, degraded=True).allowed
    forced = ledger.reserve(plan, force=True, degraded=True)  # on_failure: open
    assert forced.allowed
    assert forced.degraded
    assert forced.spent == (5_000_500,)
