"""How an upstream copes with failing targets: retries, outlier ejection, health checks, TLS.

The semantics follow Envoy's router and outlier detection, with Caddy's names where they read
better (docs/resilience.md has the rules and their sources). Every policy is per upstream; its
defaults are chosen so that an upstream with one ``base_url`` behaves as it did before targets
existed: one attempt, nothing ejected, no probes.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from gateway.config.fields import Model, PositiveSeconds

__all__ = ["DEFAULT_RETRY_STATUSES", "HealthCheck", "OutlierPolicy", "RetryPolicy", "UpstreamTLS"]

# Portkey's and Envoy's retriable statuses: rate limited, and the server-side failures that say
# nothing was done (RFC 9110 §15.6).
DEFAULT_RETRY_STATUSES = (429, 500, 502, 503, 504)


class RetryPolicy(Model):
    """Retries and failover, only before anything was sent to the client."""

    attempts: int | None = Field(
        None,
        ge=1,
        le=10,
        description="Attempts per request on this upstream, the first included. Default: one per "
        "target, at most 5 (an upstream with one base_url: 1, no retry).",
    )
    budget: PositiveSeconds = Field(
        30.0,
        description="Seconds from the first attempt after which no new attempt starts and no "
        "Retry-After is waited for. Default 30.",
    )
    on_status: tuple[int, ...] = Field(
        DEFAULT_RETRY_STATUSES,
        description="Upstream statuses that are retried (another target first). Default "
        "429, 500, 502, 503, 504.",
    )
    on_timeout: bool = Field(
        True,
        description="Retry when no response head came in time. The upstream may have started "
        "the work (and may bill it): false keeps one attempt per timeout. Default true.",
    )
    attempt_timeout: PositiveSeconds | None = Field(
        None,
        description="Seconds an attempt may wait for the response head before the next target "
        "is tried. Default: none (the upstream's read timeout). A non-streamed answer's head "
        "comes only once the whole generation is done: set it with that in mind.",
    )
    backoff_base: PositiveSeconds = Field(
        0.025,
        description="Backoff before a target is tried again: a random wait up to base * 2^n, at "
        "most backoff_max. Moving to an untried target does not wait. Default 0.025.",
    )
    backoff_max: PositiveSeconds = Field(0.25, description="Largest backoff. Default 0.25.")

    @field_validator("on_status")
    @classmethod
    def _statuses(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        for status in value:
            if not 400 <= status <= 599:
                raise ValueError(f"{status} is not an error status (400-599)")
        return value

    @model_validator(mode="after")
    def _backoff_order(self) -> RetryPolicy:
        if self.backoff_max < self.backoff_base:
            raise ValueError("backoff_max is smaller than backoff_base")
        return self


class OutlierPolicy(Model):
    """Passive health: a target that keeps failing is taken out (ejected) for a while."""

    enabled: bool = Field(True, description="Eject targets that keep failing. Default true.")
    consecutive_failures: int = Field(
        5,
        ge=1,
        description="Failures in a row that eject a target: connect errors, timeouts, resets, "
        "5xx answers and streams cut by the upstream. Default 5.",
    )
    base_ejection: PositiveSeconds = Field(
        30.0,
        description="Seconds of the first ejection; each further one lasts this times the "
        "number of ejections, up to max_ejection. Default 30.",
    )
    max_ejection: PositiveSeconds = Field(300.0, description="Longest ejection. Default 300.")
    max_ejected_percent: int = Field(
        50,
        ge=0,
        le=100,
        description="Share of the targets that may be ejected at once; at least one of two or "
        "more may always be, and never all. Default 50.",
    )

    @model_validator(mode="after")
    def _ejection_order(self) -> OutlierPolicy:
        if self.max_ejection < self.base_ejection:
            raise ValueError("max_ejection is smaller than base_ejection")
        return self


class HealthCheck(Model):
    """Active health: the gateway asks each target on its own, on a schedule."""

    path: str = Field(description="Path on the target's base URL, e.g. /models (vLLM: /health).")
    interval: PositiveSeconds = Field(10.0, description="Seconds between checks. Default 10.")
    timeout: PositiveSeconds = Field(
        2.0, description="Seconds a check may take, connecting included. Default 2."
    )
    status: tuple[int, ...] = Field((200,), description="Statuses that mean healthy. Default 200.")
    unhealthy_after: int = Field(
        2, ge=1, description="Failed checks in a row that mark a target down. Default 2."
    )
    healthy_after: int = Field(
        1, ge=1, description="Passed checks in a row that bring it back. Default 1."
    )

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or not value.isascii() or any(c in value for c in " #\r\n"):
            raise ValueError("must be a path starting with '/', in ASCII, without spaces or '#'")
        return value


class UpstreamTLS(Model):
    """How the gateway checks an https upstream, and how it proves who it is (mTLS). Relative
    file paths are relative to the gateway process's working directory (not to the config
    file); the files are read at load, and again by a reload when any of them changed."""

    ca_file: str | None = Field(
        None,
        description="PEM file of the CAs that sign the upstream's certificate (an internal CA). "
        "It replaces the system's CAs for this upstream. A relative path starts at the "
        "gateway's working directory. Default: the system's CAs.",
    )
    cert_file: str | None = Field(
        None,
        description="PEM client certificate (chain) the gateway shows the upstream (mTLS); needs "
        "key_file. A relative path starts at the gateway's working directory.",
    )
    key_file: str | None = Field(
        None,
        description="PEM private key of cert_file, not encrypted (the gateway has no passphrase "
        "to give). A relative path starts at the gateway's working directory.",
    )
    verify: bool = Field(
        True,
        description="Check the upstream's certificate and name. false is for a lab only: the "
        "gateway then sends its keys to whoever answers, and says so loudly at start.",
    )

    @model_validator(mode="after")
    def _pair(self) -> UpstreamTLS:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mTLS needs both)")
        return self
