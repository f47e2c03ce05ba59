"""What a request costs, in whole micro-dollars (``config/spend.py`` says why integers).

A price per million tokens in dollars is a price per token in micro-dollars, so a cost is a sum
of tokens times prices, rounded up once: a budget is never undercounted by rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.config.spend import ModelPrice, PricesSection
from gateway.openai.usage import Usage


@dataclass(frozen=True, slots=True)
class Price:
    """Micro-dollars per token."""

    input: float
    cached_input: float
    output: float

    @classmethod
    def of(cls, price: ModelPrice) -> Price:
        cached = price.cached_input if price.cached_input is not None else price.input
        return cls(price.input, cached, price.output)

    def cost(self, usage: Usage) -> int:
        """The micro-dollars ``usage`` costs. ``usage.input_tokens`` counts cached tokens too
        (``openai/usage.py``); those read from the cache are charged at the cached price."""
        cached = min(usage.cache_read_tokens, usage.input_tokens)
        fresh = usage.input_tokens - cached
        return math.ceil(
            fresh * self.input + cached * self.cached_input + usage.output_tokens * self.output
        )

    def estimate(self, input_tokens: int, output_tokens: int) -> int:
        """The most a request may cost before its answer says: its estimated input at the full
        input price and its output ceiling at the output price (what a reservation holds)."""
        return math.ceil(input_tokens * self.input + output_tokens * self.output)


@dataclass(frozen=True, slots=True)
class PriceTable:
    models: Mapping[str, Price]
    default: Price | None

    @classmethod
    def from_config(cls, prices: PricesSection) -> PriceTable:
        return cls(
            {name: Price.of(price) for name, price in prices.models.items()},
            Price.of(prices.default) if prices.default is not None else None,
        )

    def price(self, answered: str | None, public: str | None = None) -> Price | None:
        """The price of the model that answered (an alias's target), else of the public name
        the client asked for, else the default; None when the model is unpriced."""
        models = self.models
        found = models.get(answered) if answered is not None else None
        if found is None and public is not None:
            found = models.get(public)
        return found if found is not None else self.default
