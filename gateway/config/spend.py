"""The ``prices`` and ``usage`` sections and budgets: what a model costs, whether usage is
counted, and how much a key or team may spend.

Prices are in US dollars per million tokens, the unit every provider publishes, which is also
micro-dollars per token: the gateway counts money in whole micro-dollars, so that Redis can add
it exactly (``INCRBY``) and a month of requests never drifts by float rounding.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from gateway.config.fields import Model

__all__ = ["Budget", "ModelPrice", "PricesSection", "UsageSettings"]


class ModelPrice(Model):
    input: float = Field(ge=0, description="USD per million input (prompt) tokens.")
    cached_input: float | None = Field(
        None,
        ge=0,
        description="USD per million input tokens read from the provider's prompt cache. "
        "Default: the input price.",
    )
    output: float = Field(ge=0, description="USD per million output (completion) tokens.")


class PricesSection(Model):
    models: dict[str, ModelPrice] = Field(
        default_factory=dict,
        description="Per model name: the name the upstream answered as (an alias's target "
        "model), else the public name the client asked for.",
    )
    default: ModelPrice | None = Field(
        None,
        description="The price of models not listed. Default: none; an unlisted model costs "
        "nothing and is counted as unpriced, so budgets do not stop it.",
    )


class Budget(Model):
    """Money a key or team may spend per UTC day and per UTC calendar month."""

    usd_per_day: float | None = Field(None, gt=0, description="USD per UTC day.")
    usd_per_month: float | None = Field(None, gt=0, description="USD per UTC calendar month.")

    @model_validator(mode="after")
    def _something(self) -> Budget:
        if self.usd_per_day is None and self.usd_per_month is None:
            raise ValueError("give usd_per_day, usd_per_month or both")
        return self


class UsageSettings(Model):
    enabled: bool = Field(
        True,
        description="Count every request's tokens and cost per key, team and model, per UTC "
        "hour, day and month (GET /admin/usage), in the call that settles its limits (Redis, "
        "or this process without Redis). Default true.",
    )
