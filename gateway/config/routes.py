"""The ``routes`` section: public path patterns and methods, each served by an upstream.

A route's paths use the path-template syntax of ``gateway.config.templates``; its aliases serve
the same route under other paths, optionally deprecated (RFC 9745) with a sunset date (RFC 8594).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from pydantic import BeforeValidator, Field, field_validator, model_validator

from gateway.config.fields import Model, Name
from gateway.config.request_rules import RequestRules, rules_or_name
from gateway.config.templates import check_path_pattern, pattern_params, placeholder_names
from gateway.config.upstreams import Timeouts

__all__ = ["Alias", "Route"]

_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


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
    # 'validate' in YAML; 'rules' in Python, since pydantic's BaseModel has a validate().
    rules: Annotated[RequestRules | Name | None, BeforeValidator(rules_or_name)] = Field(
        None,
        alias="validate",
        description="Request rules checked on JSON bodies (POST, PUT, PATCH) before the model "
        "rules and the limits: a rule set, or the name of one in 'request_rules'. For routes "
        "whose upstream or public path ends in chat/completions, completions, embeddings or "
        "responses. Default none: bodies pass unchecked.",
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
            # Every placeholder, inside a segment too ('/files/{id}.json'): the router fills
            # them all, and one the path does not define would fail every request.
            missing = placeholder_names(self.upstream_path) - params
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
