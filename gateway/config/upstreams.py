"""The ``upstreams`` and ``models`` sections: where requests go, and which model name they carry.

An upstream's key, headers and query go on the wire as written, so they are checked here
against HTTP's field syntax: a config value (or an environment variable with a trailing newline)
must not be able to add headers of its own.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from gateway.config.fields import Model, Name, PositiveSeconds

__all__ = ["ModelAlias", "Timeouts", "Upstream", "UpstreamAuth", "check_header"]

# RFC 9110 §5.1 (field names are tokens) and §5.5 (values: visible latin-1 and spaces/tabs).
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_FIELD_VALUE = re.compile(r"^[\t\x20-\x7e\x80-\xff]*$")


def check_header(name: str, value: str) -> None:
    """A header the gateway writes on the wire: a CR or LF here would let a config value (or an
    environment variable, such as a secret with a trailing newline) add headers of its own."""
    if not _TOKEN.match(name):
        raise ValueError(f"header name {name!r} is not a valid HTTP field name")
    if not _FIELD_VALUE.match(value):
        # The value may be a secret: name the header, never echo the value.
        raise ValueError(
            f"the value of header {name!r} contains a control character (CR, LF, ...) or a "
            "character outside latin-1; check for a trailing newline"
        )


class Timeouts(Model):
    """Upstream timeouts in seconds. ``read`` is the longest silence between two chunks, not a
    total: an LLM may think for minutes before its first token (docs/design.md §3)."""

    connect: PositiveSeconds = Field(5.0, description="TCP+TLS connect timeout. Default 5.")
    read: PositiveSeconds = Field(
        600.0, description="Longest wait for the next chunk of the response. Default 600."
    )


class UpstreamAuth(Model):
    style: Literal["bearer", "api-key", "x-api-key", "none"] = Field(
        "bearer",
        description="How the upstream takes its key: Authorization: Bearer (OpenAI, vLLM), "
        "api-key (Azure OpenAI), x-api-key (Anthropic), or none. Default bearer.",
    )
    key: SecretStr | None = Field(
        None, description="The upstream key; write ${ENV_VAR}, never the key itself."
    )

    @field_validator("key")
    @classmethod
    def _key_on_the_wire(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _FIELD_VALUE.match(value.get_secret_value()):
            raise ValueError(
                "the key contains a control character (CR, LF, ...) or a character outside "
                "latin-1; check for a trailing newline"
            )
        return value


class Upstream(Model):
    base_url: str = Field(
        description="Base URL, usually ending in /v1, e.g. ${OPENAI_BASE_URL:-https://api.openai.com/v1}."
    )
    auth: UpstreamAuth = Field(default_factory=lambda: UpstreamAuth())
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra headers sent to the upstream, e.g. anthropic-version.",
    )
    query: dict[str, str] = Field(
        default_factory=dict, description="Query parameters added to every request (api-version)."
    )
    timeouts: Timeouts = Field(default_factory=lambda: Timeouts())
    max_connections: int = Field(1000, ge=1, description="Connection pool size. Default 1000.")
    forwarded_for: Literal["append", "strip"] | None = Field(
        None,
        description="X-Forwarded-For to the upstream: 'append' the client address (internal "
        "upstreams) or 'strip' it (third-party APIs). Default: strip for https, append otherwise.",
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/?#\s@]+(/[^?#\s]*)?$", value) or not value.isascii():
            raise ValueError(
                "must be an http:// or https:// URL in ASCII, without credentials, query or "
                "fragment (credentials go in 'auth')"
            )
        return value.rstrip("/")

    @field_validator("headers")
    @classmethod
    def _headers_on_the_wire(cls, value: dict[str, str]) -> dict[str, str]:
        for name, header in value.items():
            check_header(name, header)
        return value

    @field_validator("query")
    @classmethod
    def _query_ascii(cls, value: dict[str, str]) -> dict[str, str]:
        for name, item in value.items():
            if not (name + item).isprintable():
                raise ValueError(f"query parameter {name!r} contains a control character")
        return value


class ModelAlias(Model):
    upstream: Name = Field(description="Upstream that serves this model.")
    model: str | None = Field(
        None, description="The upstream's name for the model. Default: the public name."
    )
