"""The ``keys`` and ``limits`` sections: who may call, what, and how much.

A key is stored as its SHA-256 hash only; ``gateway keys new NAME`` makes a key and prints the
hash to paste here. Limits are token buckets per key, team, route and model.
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from gateway.config.fields import Model, Name
from gateway.config.spend import Budget
from gateway.jobs.hosts import WebhookHosts

__all__ = ["KEY_HASH_PATTERN", "ApiKey", "Limits", "LimitsSection", "check_key_hash"]

_KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
KEY_HASH_PATTERN = _KEY_HASH.pattern


class Limits(Model):
    """Token-bucket limits. A bucket holds ``burst`` (default: the per-minute rate) and refills at
    the per-minute rate. ``null`` means unlimited."""

    requests_per_minute: int | None = Field(None, ge=0)
    tokens_per_minute: int | None = Field(None, ge=0)
    request_burst: int | None = Field(None, ge=1, description="Default: requests_per_minute.")
    token_burst: int | None = Field(None, ge=1, description="Default: tokens_per_minute.")
    max_concurrent: int | None = Field(
        None,
        ge=1,
        description="Requests (open streams included) at once, per gateway process; 429 "
        "beyond. Applies to keys and teams. Default unlimited.",
    )
    max_wait: float | None = Field(
        None,
        ge=0,
        le=600,
        description="Seconds a request its buckets are short for may wait for capacity, in "
        "arrival order, before it gets the 429; exact across replicas with Redis. Applies to "
        "keys (keys[].limits, limits.default) and routes (limits.routes, which wins over the "
        "key's; 0 turns waiting off on that route). Default: no waiting.",
    )
    max_waiting: int | None = Field(
        None,
        ge=1,
        description="With max_wait: the key's requests waiting at once, per gateway process "
        "(default 100); one more gets the 429 at once. Applies to keys only.",
    )
    budget: Budget | None = Field(
        None,
        description="Money the key (keys[].limits; limits.default: each key its own) or the "
        "team (limits.teams: shared) may spend per UTC day and month, at the prices of "
        "'prices'; 429 budget_exceeded beyond. Applies to keys and teams. Default: none.",
    )


class ApiKey(Model):
    name: Name = Field(description="Unique key name, shown in logs instead of the key.")
    hash: str = Field(
        pattern=_KEY_HASH.pattern,
        description="sha256:<hex> of the key; 'gateway keys new NAME' prints one.",
    )
    team: Name | None = None
    routes: tuple[str, ...] = Field(("*",), description="Route names allowed ('*' = all).")
    models: tuple[str, ...] = Field(
        ("*",), description="Public model names allowed; shell-style patterns. Default all."
    )
    limits: Limits | None = Field(None, description="This key's limits. Default: limits.default.")
    webhook_hosts: tuple[str, ...] = Field(
        ("*",),
        description="Where this key's jobs may send webhooks: host names ('hooks.example.com', "
        "'*.example.com'), IP addresses or networks ('10.0.0.0/8'), each with an optional "
        "':port'; '*' is any host whose addresses are all public. A private, loopback, "
        "link-local or otherwise internal address (the cloud metadata address included) is "
        "reached only when an entry names it or its network, never through '*' or a host "
        "name pattern; plain http only to hosts named exactly. [] turns webhooks off for the "
        "key. Default ['*'].",
    )

    @field_validator("hash", mode="before")
    @classmethod
    def _hash_says_how_to_make_one(cls, value: object) -> object:
        return check_key_hash(value)

    @field_validator("webhook_hosts")
    @classmethod
    def _webhook_hosts_parse(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # The same parser the webhook sender uses, so an entry the config accepts is one the
        # sender understands; the error names the entry and why ("entry 1 ('10.0.0.1/8') has
        # host bits set; did you mean '10.0.0.0/8'?").
        WebhookHosts.parse(value)
        return value


def check_key_hash(value: object) -> object:
    """Runs before the pattern (kept for the JSON Schema) so that a placeholder, such as the one
    the deploy files ship, is refused with what to do instead of a regex. The value is never
    echoed: an admin may have pasted the key itself here."""
    if isinstance(value, str) and not _KEY_HASH.match(value.strip()):
        raise ValueError(
            "must be the key's hash, 'sha256:' and 64 lowercase hex digits: run "
            "'gateway keys new NAME' and paste the hash it prints (for an existing key: "
            'echo "$KEY" | gateway keys hash)'
        )
    return value


class LimitsSection(Model):
    default: Limits = Field(default_factory=lambda: Limits(), description="For keys with none.")
    teams: dict[str, Limits] = Field(
        default_factory=dict, description="Shared by all keys of a team, on top of their own."
    )
    models: dict[str, Limits] = Field(
        default_factory=dict, description="Per key and public model, on top of the key's own."
    )
    routes: dict[str, Limits] = Field(
        default_factory=dict, description="Per key and route, on top of the key's own."
    )
    default_max_tokens: int = Field(
        4096, ge=0, description="Completion tokens reserved when a request names no maximum."
    )
