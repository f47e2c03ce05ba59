"""The configuration's types: what an admin may write, parsed once into frozen objects.

These classes are the single source of truth for the YAML format: the loader validates against
them, ``gateway schema`` derives the JSON Schema editors use from them, and nothing below the
loader ever sees a YAML dict (docs/design.md §2). Each field documents its default (after
Caddy's config style).

``GatewayConfig``, the whole file, is defined here; each section's types live in the module for
that section and are importable from here too:

- ``routes``: ``gateway.config.routes`` (``Route``, ``Alias``);
- ``request_rules`` and a route's ``validate``: ``gateway.config.request_rules``
  (``RequestRules``);
- ``upstreams`` and ``models``: ``gateway.config.upstreams`` (``Upstream``, ``Timeouts``,
  ``ModelAlias``...);
- ``keys`` and ``limits``: ``gateway.config.keys`` (``ApiKey``, ``Limits``, ``LimitsSection``);
- ``prices``, ``usage`` and a limit's ``budget``: ``gateway.config.spend`` (``PricesSection``,
  ``ModelPrice``, ``UsageSettings``, ``Budget``);
- ``jobs``: ``gateway.config.jobs`` (``JobsSettings``, ``WebhookSettings``);
- ``admin`` and ``metrics``: ``gateway.config.operations`` (``AdminSettings``, ``AdminKey``,
  ``MetricsSettings``);
- ``server`` and ``redis``: ``gateway.config.settings`` (``ServerSettings``,
  ``ConnectionSettings``, ``RedisSettings``).
"""

from __future__ import annotations

from pydantic import ConfigDict, Field

from gateway.config.fields import Model, Name
from gateway.config.jobs import JobsSettings, WebhookSettings
from gateway.config.keys import ApiKey, Limits, LimitsSection
from gateway.config.operations import AdminKey, AdminSettings, MetricsSettings
from gateway.config.request_rules import RequestRules
from gateway.config.routes import Alias, Route
from gateway.config.settings import ConnectionSettings, RedisSettings, ServerSettings
from gateway.config.spend import Budget, ModelPrice, PricesSection, UsageSettings
from gateway.config.upstreams import ModelAlias, Timeouts, Upstream, UpstreamAuth

__all__ = [
    "AdminKey",
    "AdminSettings",
    "Alias",
    "ApiKey",
    "Budget",
    "ConnectionSettings",
    "GatewayConfig",
    "JobsSettings",
    "Limits",
    "LimitsSection",
    "MetricsSettings",
    "ModelAlias",
    "ModelPrice",
    "PricesSection",
    "RedisSettings",
    "RequestRules",
    "Route",
    "ServerSettings",
    "Timeouts",
    "Upstream",
    "UpstreamAuth",
    "UsageSettings",
    "WebhookSettings",
]


class GatewayConfig(Model):
    """A whole gateway configuration: the merged result of a file and its includes."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        json_schema_extra={"title": "LLM gateway configuration"},
    )

    include: tuple[str, ...] = Field(
        (), description="More YAML files (relative to this one) whose lists and tables are merged."
    )
    include_outside: bool = Field(
        False,
        description="Allow includes outside the main config file's directory (by default they "
        "must resolve inside it, symlinks followed). Only the main file may set it. Default "
        "false.",
    )
    server: ServerSettings = Field(default_factory=lambda: ServerSettings())
    redis: RedisSettings = Field(default_factory=lambda: RedisSettings())
    upstreams: dict[Name, Upstream] = Field(default_factory=dict)
    routes: tuple[Route, ...] = Field(
        (),
        description="The public routes. A config read from files must name 'routes' (write "
        "'routes: []' to serve none on purpose): a file without it may be one caught mid-write.",
    )
    request_rules: dict[Name, RequestRules] = Field(
        default_factory=dict,
        description="Named request rule sets that routes share: a route's 'validate' may name "
        "one instead of writing its rules out.",
    )
    models: dict[str, ModelAlias] = Field(
        default_factory=dict, description="Public model name -> upstream and its model name."
    )
    allow_unlisted_models: bool = Field(
        False,
        description="Send models not in 'models' to the route's upstream unchanged instead of "
        "answering 404 model_not_found. Default false.",
    )
    keys: tuple[ApiKey, ...] = ()
    limits: LimitsSection = Field(default_factory=lambda: LimitsSection())
    prices: PricesSection = Field(
        default_factory=lambda: PricesSection(),
        description="USD per million tokens per model: the cost GET /admin/usage shows and "
        "budgets (limits.*.budget) are charged. Default: none, every model unpriced.",
    )
    usage: UsageSettings = Field(default_factory=lambda: UsageSettings())
    admin: AdminSettings = Field(default_factory=lambda: AdminSettings())
    metrics: MetricsSettings = Field(default_factory=lambda: MetricsSettings())
    jobs: JobsSettings = Field(default_factory=lambda: JobsSettings())
