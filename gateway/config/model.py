"""The configuration's types: what an admin may write, parsed once into frozen objects.

These classes are the single source of truth for the YAML format: the loader validates against
them, ``gateway schema`` derives the JSON Schema editors use from them, and nothing below the
loader ever sees a YAML dict. Each field documents its default (after Caddy's config style).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
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


_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)(:path)?\}$")
_KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


PositiveSeconds = Annotated[float, Field(gt=0)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$", max_length=128)]


class Timeouts(Model):
    """Upstream timeouts in seconds. ``read`` is the longest silence between two chunks, not a
    total: an LLM may think for minutes before its first token (docs/design.md §3)."""

    connect: PositiveSeconds = Field(5.0, description="TCP+TLS connect timeout. Default 5.")
    read: PositiveSeconds = Field(
        600.0, description="Longest wait for the next chunk of the response. Default 600."
    )


def check_path_pattern(path: str) -> str:
    """A public path pattern: literal segments, ``{name}`` segments, and at most one trailing
    ``{name:path}`` segment that matches the rest of the path."""
    if not path.startswith("/"):
        raise ValueError("must start with '/'")
    if "?" in path or "#" in path:
        raise ValueError("must not contain a query string or fragment")
    segments = path.split("/")[1:]
    names: set[str] = set()
    for i, segment in enumerate(segments):
        if "{" not in segment and "}" not in segment:
            continue
        match = _PARAM.match(segment)
        if match is None:
            raise ValueError(f"segment {segment!r} must be literal, '{{name}}' or '{{name:path}}'")
        if match.group(2) and i != len(segments) - 1:
            raise ValueError("a '{name:path}' segment must be the last one")
        if match.group(1) in names:
            raise ValueError(f"parameter {{{match.group(1)}}} appears twice")
        names.add(match.group(1))
    return path


def pattern_params(path: str) -> set[str]:
    return {m.group(1) for s in path.split("/") if (m := _PARAM.match(s))}


class Alias(Model):
    """Another public path serving the same route, optionally deprecated (RFC 9745, RFC 8594)."""

    path: str = Field(description="Public path pattern; same parameters as the route's path.")
    deprecated: bool | dt.date = Field(
        False,
        description="true, or the date the alias became deprecated. Adds a Deprecation header.",
    )
    sunset: dt.date | None = Field(
        None, description="When the alias stops working. Adds a Sunset header (RFC 8594)."
    )
    successor: str | None = Field(
        None,
        description='Public path to use instead. Adds Link: <...>; rel="successor-version".',
    )

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        return check_path_pattern(value)

    @model_validator(mode="after")
    def _sunset_needs_deprecation(self) -> Alias:
        if (self.sunset or self.successor) and self.deprecated is False:
            raise ValueError("'sunset' and 'successor' need 'deprecated' to be set")
        return self


class Route(Model):
    """Public path pattern and methods -> an upstream and a path on it."""

    name: Name = Field(description="Unique route name; keys allow routes by name.")
    path: str = Field(
        description="Public path pattern, e.g. /v1/chat/completions or /v1/{rest:path}."
    )
    methods: tuple[str, ...] = Field(("POST",), description="HTTP methods served. Default [POST].")
    upstream: Name = Field(
        description="Upstream that serves the route (a model alias may override)."
    )
    upstream_path: str | None = Field(
        None,
        description="Path on the upstream, relative to its base_url, using the same parameters. "
        "Default: the public path with any leading /v1 removed (base URLs end in /v1).",
    )
    aliases: tuple[Alias, ...] = Field((), description="More public paths for this route.")
    model_in_body: bool = Field(
        True,
        description="Read the JSON body's 'model' to apply model aliases and key model rules. "
        "Only JSON bodies of POST/PUT/PATCH requests are read. Default true.",
    )
    timeouts: Timeouts | None = Field(None, description="Overrides the upstream's timeouts.")
    encoded_slashes: str | None = Field(
        None,
        description="The one path parameter that may hold an encoded '/' (%2F), such as a "
        "model id 'org/model' in /v1/models/{model}. Elsewhere an encoded '/' is refused with "
        "400, as are dot segments, backslashes and control characters. Default none.",
    )
    stream_usage: bool = Field(
        False,
        description="Ask the upstream for usage on streams (stream_options.include_usage) so token "
        "limits settle exactly. This re-serialises the request body of streams that did not ask "
        "themselves, and the client then receives the upstream's final usage chunk. Default "
        "false.",
    )
    models_list: bool = Field(
        False,
        description="This route lists models (GET /v1/models): the upstream's list is rewritten "
        "for the caller, keeping only the models its key may call (and, when "
        "allow_unlisted_models is false, only those in 'models') and adding the model aliases it "
        "may call. Error responses pass unchanged. Default false.",
    )
    model_in_path: str | None = Field(
        None,
        description="The path parameter that names a model, such as {model} in "
        "/v1/models/{model} (GET, DELETE): the key's model list and the model aliases apply to "
        "it as to a body's 'model' (a model the key may not use is 404 model_not_found), and an "
        "alias is fetched under the upstream's name and answered with the alias as its 'id'. "
        "Default none.",
    )

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        return check_path_pattern(value)

    @field_validator("methods", mode="before")
    @classmethod
    def _upper_methods(cls, value: object) -> object:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple):
            return tuple(str(m).upper() for m in value)
        return value

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one method is needed")
        for method in value:
            if method not in _METHODS:
                raise ValueError(f"unknown method {method!r}; use one of {', '.join(_METHODS)}")
        return value

    @model_validator(mode="after")
    def _same_parameters(self) -> Route:
        params = pattern_params(self.path)
        for alias in self.aliases:
            if pattern_params(alias.path) != params:
                raise ValueError(
                    f"alias {alias.path!r} must use the same parameters as {self.path!r}"
                )
        if self.encoded_slashes is not None and self.encoded_slashes not in params:
            raise ValueError(
                f"'encoded_slashes' names {{{self.encoded_slashes}}}, which the path does not "
                "define"
            )
        if self.upstream_path is not None:
            if not self.upstream_path.startswith("/"):
                raise ValueError("'upstream_path' must start with '/'")
            missing = pattern_params(self.upstream_path) - params
            if missing:
                raise ValueError(
                    f"'upstream_path' uses {sorted(missing)} that the path does not define"
                )
        if self.model_in_path is not None:
            if self.model_in_path not in params:
                raise ValueError(
                    f"'model_in_path' names {{{self.model_in_path}}}, which the path does not "
                    "define"
                )
            if self.model_in_path not in pattern_params(self.target_path()):
                # An alias is fetched under the upstream's name: the name must be in the path.
                raise ValueError(
                    f"'model_in_path' needs {{{self.model_in_path}}} in the upstream path"
                )
            with_body = sorted(set(self.methods) & {"POST", "PUT", "PATCH"})
            if with_body:
                # A body's 'model' would be a second model name: one of the two unchecked.
                raise ValueError(f"'model_in_path' is for GET and DELETE, not {with_body}")
            if self.models_list:
                raise ValueError("a route either lists models or names one in its path")
        if self.models_list and "GET" not in self.methods:
            raise ValueError("'models_list' rewrites a GET response: add GET to 'methods'")
        return self

    def target_path(self) -> str:
        if self.upstream_path is not None:
            return self.upstream_path
        if self.path == "/v1" or self.path.startswith("/v1/"):
            return self.path[3:] or "/"
        return self.path


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

    @field_validator("hash", mode="before")
    @classmethod
    def _hash_says_how_to_make_one(cls, value: object) -> object:
        # Runs before the pattern (kept for the JSON Schema) so that a placeholder, such as the
        # one the deploy files ship, is refused with what to do instead of a regex. The value
        # is never echoed: an admin may have pasted the key itself here.
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
