"""The ``admin`` and ``metrics`` sections: who may operate the gateway, and what it exposes.

The admin API (``/admin/``) and the status page are off unless ``admin.keys`` lists at least one
key. Admin keys are stored hashed, like client keys, and are a separate set: a client key is
never an admin key (the cross checks refuse a hash in both lists).
"""

from __future__ import annotations

from pydantic import Field, field_validator

from gateway.config.fields import Model, Name
from gateway.config.keys import KEY_HASH_PATTERN, check_key_hash

__all__ = ["AdminKey", "AdminSettings", "MetricsSettings"]


class AdminKey(Model):
    name: Name = Field(description="Unique admin key name, shown in logs instead of the key.")
    hash: str = Field(
        pattern=KEY_HASH_PATTERN,
        description="sha256:<hex> of the key; 'gateway keys new NAME' prints one.",
    )

    @field_validator("hash", mode="before")
    @classmethod
    def _hash_says_how_to_make_one(cls, value: object) -> object:
        return check_key_hash(value)


class AdminSettings(Model):
    keys: tuple[AdminKey, ...] = Field(
        (),
        description="Keys for the admin API and status page under /admin/ (Bearer, or HTTP "
        "Basic with the key as password in a browser). None (the default): /admin/ is off.",
    )


class MetricsSettings(Model):
    enabled: bool = Field(True, description="Serve Prometheus metrics at /metrics. Default true.")
    require_admin_key: bool = Field(
        False,
        description="Ask for an admin key at /metrics too. Default false: the figures carry "
        "route, upstream, key and model names (never keys or prompts), for a scraper on the "
        "internal network.",
    )
