"""The ``upstreams`` and ``models`` sections: where requests go, and which model name they carry.

An upstream's key, headers and query go on the wire as written, so they are checked here
against HTTP's field syntax: a config value (or an environment variable with a trailing newline)
must not be able to add headers of its own.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from gateway.config.fields import Model, Name, PositiveSeconds
from gateway.config.resilience import HealthCheck, OutlierPolicy, RetryPolicy, UpstreamTLS

__all__ = [
    "FallbackOn",
    "FallbackStep",
    "ModelAlias",
    "Target",
    "Timeouts",
    "Upstream",
    "UpstreamAuth",
    "check_header",
]

_BASE_URL = re.compile(r"^https?://[^/?#\s@]+(/[^?#\s]*)?$")


def check_base_url(value: str) -> str:
    if not _BASE_URL.match(value) or not value.isascii():
        raise ValueError(
            "must be an http:// or https:// URL in ASCII, without credentials, query or "
            "fragment (credentials go in 'auth')"
        )
    return value.rstrip("/")


def _check_headers(value: dict[str, str]) -> dict[str, str]:
    for name, header in value.items():
        check_header(name, header)
    return value


def _check_query(value: dict[str, str]) -> dict[str, str]:
    for name, item in value.items():
        if not (name + item).isprintable():
            raise ValueError(f"query parameter {name!r} contains a control character")
    return value


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


class Target(Model):
    """One deployment of an upstream: another key, region, or self-hosted server."""

    name: Name | None = Field(
        None,
        description="Shown in the X-Gateway-Target response header, the metrics and the access "
        "log (never the URL or key). Default: target-1, target-2, ... by position.",
    )
    base_url: str = Field(description="Base URL of this target, e.g. https://eu.example/v1.")
    auth: UpstreamAuth | None = Field(
        None, description="This target's credentials. Default: the upstream's 'auth'."
    )
    weight: float = Field(
        1.0, gt=0, description="Share of the traffic under weighted_random. Default 1."
    )
    models: dict[str, str] = Field(
        default_factory=dict,
        description="The upstream model name -> this target's name for it (an Azure deployment, "
        "a vLLM served name). Models not listed keep their name.",
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="Headers added over the upstream's for this target."
    )
    query: dict[str, str] = Field(
        default_factory=dict, description="Query parameters added over the upstream's."
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return check_base_url(value)

    @field_validator("headers")
    @classmethod
    def _headers_on_the_wire(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_headers(value)

    @field_validator("query")
    @classmethod
    def _query_ascii(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_query(value)


class Upstream(Model):
    targets: tuple[Target, ...] = Field(
        (),
        description="Several deployments of this upstream, tried in turn when one fails before "
        "its answer began. Give either this or 'base_url'.",
    )
    base_url: str | None = Field(
        None,
        validate_default=True,
        description="Base URL, usually ending in /v1, e.g. "
        "${OPENAI_BASE_URL:-https://api.openai.com/v1}. Give either this or 'targets'.",
    )
    balance: Literal["weighted_random", "round_robin", "least_outstanding"] = Field(
        "weighted_random",
        description="How a target is picked among the healthy ones: weighted_random (by "
        "weight), round_robin, or least_outstanding (fewest requests in flight). Default "
        "weighted_random.",
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
    max_connections: int = Field(
        1000, ge=1, description="Connection pool size, per target. Default 1000."
    )
    forwarded_for: Literal["append", "strip"] | None = Field(
        None,
        description="X-Forwarded-For to the upstream: 'append' the client address (internal "
        "upstreams) or 'strip' it (third-party APIs). Default: strip for https, append otherwise.",
    )
    retry: RetryPolicy = Field(default_factory=lambda: RetryPolicy())
    outlier: OutlierPolicy = Field(default_factory=lambda: OutlierPolicy())
    health_check: HealthCheck | None = Field(
        None, description="Check each target on a schedule. Default: no active checks."
    )
    tls: UpstreamTLS = Field(default_factory=lambda: UpstreamTLS())
    proxy: str = Field(
        "env",
        description="Egress proxy: 'env' (HTTPS_PROXY, HTTP_PROXY, NO_PROXY from the "
        "environment), 'none', or an http:// URL (https targets go through CONNECT). "
        "Default env.",
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        # Checked here, after 'targets' (declared first), so that the problem is reported at
        # base_url's own line, once, whatever else is wrong with it.
        if (value is None) == (not info.data.get("targets")):
            raise ValueError("give either 'base_url' or 'targets', not both or neither")
        return None if value is None else check_base_url(value)

    @field_validator("headers")
    @classmethod
    def _headers_on_the_wire(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_headers(value)

    @field_validator("query")
    @classmethod
    def _query_ascii(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_query(value)

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, value: str) -> str:
        if value in ("env", "none"):
            return value
        if not re.match(r"^http://([^/?#\s@]+@)?[^/?#\s@]+/?$", value) or not value.isascii():
            raise ValueError(
                "must be 'env', 'none' or an http:// proxy URL (host and port, optionally "
                "user:password@)"
            )
        return value.rstrip("/")

    @model_validator(mode="after")
    def _unique_target_names(self) -> Upstream:
        names = [t.name for t in self.targets if t.name is not None]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"two targets are named {name!r}")
        return self

    def target_list(self) -> tuple[Target, ...]:
        """Every target, named: a single ``base_url`` is one target named ``default``."""
        if self.base_url is not None:
            return (Target(name="default", base_url=self.base_url),)
        return tuple(
            target if target.name is not None else target.model_copy(update={"name": f"target-{i}"})
            for i, target in enumerate(self.targets, 1)
        )


class FallbackStep(Model):
    upstream: Name = Field(description="Upstream that serves this step.")
    model: str | None = Field(
        None, description="The upstream's name for the model. Default: the public name."
    )


class FallbackOn(Model):
    """An answer that moves a request to the next step of its chain, although it is not one
    that retries (a context-length 400 to a larger-context model)."""

    status: int = Field(ge=400, le=599, description="The upstream's status.")
    code: str | None = Field(
        None,
        description="The error.code in the upstream's JSON body, e.g. "
        "context_length_exceeded. Default: any body.",
    )


class ModelAlias(Model):
    upstream: Name = Field(description="Upstream that serves this model.")
    model: str | None = Field(
        None, description="The upstream's name for the model. Default: the public name."
    )
    fallbacks: tuple[FallbackStep, ...] = Field(
        (),
        description="Where the request goes next, in order, when this step has no usable "
        "target, has used up its retries, or answered as 'fallback_on' lists.",
    )
    fallback_on: tuple[FallbackOn, ...] = Field(
        (),
        description="Answers that move to the next step at once (besides exhausted retries), "
        "e.g. {status: 400, code: context_length_exceeded}.",
    )
