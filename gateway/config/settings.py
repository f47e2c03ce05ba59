"""The ``server`` and ``redis`` sections: how the process listens, holds client connections, and
shares its limits.

A reload does not apply changes to these two sections: the gateway logs a warning and keeps
the settings it started with until it is restarted.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, field_validator, model_validator

from gateway.config.fields import Model, PositiveSeconds

__all__ = ["ConnectionSettings", "RedisSettings", "ServerSettings"]


class RedisSettings(Model):
    url: str | None = Field(
        None, description="redis:// URL. Default none: limits are kept per process."
    )
    cluster: bool = Field(False, description="Connect as a Redis Cluster client.")
    timeout_ms: int = Field(
        50,
        ge=1,
        description="A call fails when Redis's reply has not reached the gateway's socket this "
        "long after it was sent (a gateway too busy to read it in time waits on). Default 50 ms.",
    )
    on_failure: Literal["open", "closed", "local"] = Field(
        "local",
        description="Redis down: 'open' admits (counting locally), 'closed' refuses with 503, "
        "'local' enforces per-process buckets, starting from the levels Redis last reported. "
        "Default local.",
    )
    breaker_failures: int = Field(
        3,
        ge=1,
        description="Open the breaker (skip Redis) after this many failed calls in a row. "
        "Default 3.",
    )
    breaker_seconds: float = Field(
        1.0,
        gt=0,
        description="While open, skip Redis for this long; then one request probes it and an "
        "answer closes the breaker. Default 1.",
    )


def _loopback() -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


class ConnectionSettings(Model):
    """How much a client may send, how slowly, and how many connections one process holds.

    Over a size cap the client gets 431 (414 for the request line) in OpenAI's error shape and
    the connection is closed; a head or body that stalls gets 408. The defaults are in the range
    real servers use (Nginx: 8 KiB lines, 60 s header and body timeouts; Apache
    ``mod_reqtimeout``: a body deadline extended by its minimum rate)."""

    max_open: int = Field(
        10_000,
        ge=1,
        description="Open client connections per process; beyond it a new connection gets 503 "
        "and is closed at once. Keep it under the process's file limit (ulimit -n), which "
        "upstream connections share. Default 10000.",
    )
    max_request_line_bytes: int = Field(
        8192,
        ge=64,
        description="Longest request target (path and query): 414 beyond. Default 8 KiB.",
    )
    max_header_line_bytes: int = Field(
        8192,
        ge=64,
        description="Longest header field (name and value): 431 beyond. Default 8 KiB.",
    )
    max_head_bytes: int = Field(
        65_536,
        ge=256,
        description="Largest request head (request line and all header fields): 431 beyond. "
        "Default 64 KiB.",
    )
    max_header_fields: int = Field(
        100, ge=1, description="Most header fields in one request: 431 beyond. Default 100."
    )
    header_timeout: PositiveSeconds = Field(
        10.0,
        description="Seconds to receive a whole request head, from the connection's start or "
        "from the head's first byte on a kept-alive connection: 408 beyond. Default 10.",
    )
    keep_alive_timeout: int = Field(
        75,
        ge=1,
        description="Seconds an idle kept-alive connection stays open between requests. Longer "
        "than the proxies in front keep theirs (Nginx 60 s), so the gateway is never the one to "
        "close a connection a proxy is about to reuse. Default 75.",
    )
    body_idle_timeout: PositiveSeconds = Field(
        30.0, description="Longest silence inside a request body: 408 beyond. Default 30."
    )
    body_timeout: PositiveSeconds = Field(
        60.0,
        description="Seconds a request body may take, extended by one second for every "
        "'body_min_rate' bytes received: a body slower than that rate gets 408. Default 60.",
    )
    body_min_rate: int = Field(
        1024, ge=1, description="Bytes per second that extend 'body_timeout'. Default 1024."
    )
    body_max_timeout: PositiveSeconds = Field(
        600.0,
        description="The longest a request body may take however fast it began (the extensions "
        "earned by 'body_min_rate' stop here): 408 beyond. Default 600.",
    )
    write_stall_timeout: PositiveSeconds = Field(
        60.0,
        description="Seconds a client may leave the gateway's responses unread once its socket "
        "buffer is full; then the connection is dropped and the upstream request cancelled. "
        "Default 60.",
    )

    @model_validator(mode="after")
    def _max_after_base(self) -> ConnectionSettings:
        if self.body_max_timeout < self.body_timeout:
            raise ValueError("'body_max_timeout' must be at least 'body_timeout'")
        return self


class ServerSettings(Model):
    host: str = Field("127.0.0.1", description="Listen address. Default 127.0.0.1.")
    port: int = Field(8080, ge=0, le=65535, description="Listen port. Default 8080.")
    root_path: str = Field(
        "", description="Public path prefix the gateway is served under, e.g. /llm. Default none."
    )
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = Field(
        default_factory=_loopback,
        description="CIDRs whose forwarded headers are believed. Default loopback only.",
    )
    max_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1, description="Largest request body. Default 32 MiB."
    )
    max_buffered_body_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1,
        description="Request body bytes held in memory across all requests of a process at "
        "once. A body that does not fit waits for room ('body_buffer_wait'), then gets 503. "
        "Default 256 MiB.",
    )
    body_buffer_wait: float = Field(
        10.0,
        ge=0,
        description="Seconds a body waits for room under 'max_buffered_body_bytes' before the "
        "request gets 503. Default 10.",
    )
    connections: ConnectionSettings = Field(
        default_factory=lambda: ConnectionSettings(),
        description="Caps on request heads, slow clients and open connections.",
    )
    access_log: bool = Field(True, description="One JSON line per request on stderr.")
    unready_without_targets: bool = Field(
        False,
        description="/readyz answers 503 no_usable_target while an upstream that routes, "
        "models or fallbacks reach has no usable target (all ejected or down by their health "
        "checks). Off by default: an upstream down for every replica would take every replica "
        "out of its load balancer at once, routes to healthy upstreams too. Turn it on where "
        "replicas differ in what they reach (an egress per zone). Default false.",
    )
    target_header: bool = Field(
        True,
        description="Name the upstream target that served each response in X-Gateway-Target "
        "(its configured name, never its URL or key). Default true.",
    )
    upstream_client: Literal["http1", "aiohttp"] = Field(
        "http1",
        description="The HTTP client the relay uses towards upstreams: the built-in HTTP/1.1 "
        "client (fastest, measured) or aiohttp. Default http1.",
    )
    reload_interval: float = Field(
        2.0,
        ge=0,
        description="Seconds between checks of the config files for changes (0: only SIGHUP). "
        "Changes to 'server' itself need a restart. Default 2.",
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info",
        description="The level of the gateway's own log lines (not the access log). "
        "'gateway serve --log-level' overrides it. Default info.",
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="The gateway's own log lines as text, or one JSON object per line (ts, "
        "level, logger, message, exc), like the access log. Default text.",
    )
    drain_delay: float = Field(
        5.0,
        ge=0,
        allow_inf_nan=False,
        description="Seconds the gateway keeps accepting and serving after SIGTERM (or SIGINT) "
        "while /readyz answers 503, so load balancers stop sending to it before its listening "
        "socket closes. A second signal ends the delay early. 'gateway serve --drain-delay' "
        "overrides it. Default 5.",
    )
    graceful_timeout: float = Field(
        20.0,
        ge=0,
        allow_inf_nan=False,
        description="Seconds open requests and streams get to finish once the listening socket "
        "is closed; those still open are then cut (their clients see an incomplete response). "
        "'gateway serve --graceful-timeout' overrides it. Default 20: with the default "
        "drain_delay, 25 s in all, inside Kubernetes' default 30 s grace period.",
    )

    @model_validator(mode="after")
    def _largest_body_fits(self) -> ServerSettings:
        if self.max_buffered_body_bytes < self.max_body_bytes:
            raise ValueError(
                "'max_buffered_body_bytes' must be at least 'max_body_bytes', or the largest "
                "allowed body could never be read"
            )
        return self

    @field_validator("root_path")
    @classmethod
    def _root_path(cls, value: str) -> str:
        if value and (not value.startswith("/") or value.endswith("/")):
            raise ValueError("must start with '/' and not end with '/', e.g. /llm")
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        if isinstance(value, list | tuple):
            return tuple(ipaddress.ip_network(str(v), strict=False) for v in value)
        return value
