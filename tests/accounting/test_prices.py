"""What a request costs (``gateway/accounting/prices.py``), in whole micro-dollars, and the
periods it is counted in (``gateway/accounting/periods.py``)."""

from __future__ import annotations

import datetime as dt

from gateway.accounting.periods import Periods, period_range
from gateway.accounting.prices import Price, PriceTable
from gateway.config.spend import ModelPrice, PricesSection
from gateway.openai.usage import Usage

GPT_4O = ModelPrice(input=2.5, cached_input=1.25, output=10.0)


def test_a_price_per_million_tokens_is_micro_dollars_per_token() -> None:
    price = Price.of(GPT_4O)
    # 1,000 fresh input tokens at $2.50/M = $0.0025 = 2,500 micro-dollars; 100 output at $10/M.
    assert price.cost(Usage(1000, 100, 1100)) == 2500 + 1000


def test_cached_input_tokens_are_charged_at_the_cached_price() -> None:
    price = Price.of(GPT_4O)
    usage = Usage(input_tokens=1000, output_tokens=0, total_tokens=1000, cache_read_tokens=400)
    assert price.cost(usage) == 600 * 2.5 + 400 * 1.25


def test_without_a_cached_price_cached_tokens_cost_the_input_price() -> None:
    price = Price.of(ModelPrice(input=3.0, output=15.0))
    usage = Usage(input_tokens=10, output_tokens=0, total_tokens=10, cache_read_tokens=10)
    assert price.cost(usage) == 30


def test_a_cost_is_rounded_up_once_never_down() -> None:
    price = Price.of(ModelPrice(input=0.15, output=0.6))
    assert price.cost(Usage(1, 1, 2)) == 1  # 0.75 micro-dollars
    assert price.estimate(3, 1) == 2  # 1.05


def test_the_model_that_answered_is_priced_first_then_the_public_name_then_the_default() -> None:
    table = PriceTable.from_config(
        PricesSection(
            models={"gpt-4o": GPT_4O, "fast": ModelPrice(input=1, output=1)},
            default=ModelPrice(input=9, output=9),
        )
    )
    assert table.price("gpt-4o", "fast") == Price.of(GPT_4O)
    assert table.price(None, "fast") == Price(1, 1, 1)
    assert table.price("unknown", None) == Price(9, 9, 9)
    assert PriceTable.from_config(PricesSection()).price("unknown") is None


def unix(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC).timestamp()


def test_periods_are_utc_hour_day_and_calendar_month_with_their_ends() -> None:
    periods = Periods.at(unix(2026, 12, 31, 23, 59, 59))
    assert (periods.hour, periods.day, periods.month) == ("2026123123", "20261231", "202612")
    assert periods.day_ends == unix(2027, 1, 1)
    assert periods.month_ends == unix(2027, 1, 1)
    assert Periods.at(unix(2027, 2, 10)).month_ends == unix(2027, 3, 1)


def test_a_range_lists_every_period_touched_oldest_first() -> None:
    assert period_range("day", unix(2026, 12, 30, 12), unix(2027, 1, 1, 1)) == [
        "20261230",
        "20261231",
        "20270101",
    ]
    assert period_range("month", unix(2026, 11, 30), unix(2027, 1, 1)) == [
        "202611",
        "202612",
        "202701",
    ]
    assert period_range("hour", unix(2026, 1, 1, 0, 30), unix(2026, 1, 1, 2)) == [
        "2026010100",
        "2026010101",
        "2026010102",
    ]
