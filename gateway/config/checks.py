"""Checks that need the whole configuration: names, references and the route table.

Pydantic validates each object on its own; what it cannot see is whether a route's upstream exists,
whether two routes serve the same path, or whether a limit names a team nobody is in. These checks
run on a validated ``GatewayConfig`` and return ``(key path, message)`` pairs; the loader turns the
key paths back into file and line. The module is pure: no I/O, no logging.

A key path reads like ``routes[3].aliases[0].path`` or ``models["gpt-4.1"].upstream``:
``format_path`` writes one and ``parse_path`` reads it back.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from gateway.config.model import GatewayConfig
from gateway.config.request_rules import RequestRules, shape_of
from gateway.config.routes import Route
from gateway.config.templates import segment_param
from gateway.upstream.egress import proxy_for
from gateway.upstream.tls import tls_problem

KeyPath = tuple[str | int, ...]
Problem = tuple[str, str]
Locate = Callable[[str], str | None]

# The gateway's own endpoints; no route or alias may take them (a pattern that merely could match
# one, such as /{name}, is fine: literal paths are more specific and win).
# The gateway's own endpoints (gateway/app.py): no route may take them.
RESERVED_PATHS = frozenset(
    {
        *("/healthz", "/health", "/live", "/readyz", "/ready"),
        *("/openapi.json", "/metrics", "/admin"),
    }
)
RESERVED_PREFIX = "/admin/"

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")
_PATH_PART = re.compile(r'\[(\d+)\]|\[("(?:[^"\\]|\\.)*")\]|(?:^|\.)([A-Za-z0-9_-]+)')
_GLOB_CHARS = frozenset("*?[")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def format_path(path: Iterable[str | int]) -> str:
    """``("routes", 3, "path")`` -> ``routes[3].path``; keys that are not plain names are quoted."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part, ensure_ascii=False)}]"
    return text


def parse_path(text: str) -> KeyPath:
    """The inverse of ``format_path``."""
    parts: list[str | int] = []
    position = 0
    while position < len(text):
        match = _PATH_PART.match(text, position)
        if match is None:
            raise ValueError(f"not a key path: {text!r}")
        index, quoted, plain = match.groups()
        if index is not None:
            parts.append(int(index))
        elif quoted is not None:
            parts.append(str(json.loads(quoted)))
        else:
            parts.append(plain)
        position = match.end()
    return tuple(parts)


@dataclass(frozen=True)
class Unverified:
    """Names of entries that failed validation and are missing from the config checked.

    A reference to one is not reported: the entry's own error is, and the reference may well be
    right. ``None`` stands for a whole section that failed, where no name can be judged (for
    ``models``, also a failed ``allow_unlisted_models``; ``teams`` are those of failed keys).
    """

    routes: frozenset[str] | None = frozenset()
    upstreams: frozenset[str] | None = frozenset()
    models: frozenset[str] | None = frozenset()
    teams: frozenset[str] | None = frozenset()
    request_rules: frozenset[str] | None = frozenset()

    @staticmethod
    def covers(names: frozenset[str] | None, name: str) -> bool:
        return names is None or name in names


def check_config(
    config: GatewayConfig, locate: Locate | None = None, unverified: Unverified | None = None
) -> list[Problem]:
    """Every cross-reference problem in ``config``, in the order of the sections.

    ``locate`` turns a key path into a place such as ``gateway.yaml:12``; messages that point at
    another entry (the first route with the same name, say) then say where it is. ``unverified``
    names the entries left out of ``config`` because they are invalid.
    """
    cite = _Cite(locate)
    skip = Unverified() if unverified is None else unverified
    return [
        *_unique_names(config, cite),
        *_references(config, skip),
        *_limits(config, skip),
        *_route_table(config, cite, skip),
        *_request_rules(config, skip),
        *_egress(config),
        *_jobs(config),
    ]


# The jobs API's paths (gateway/endpoints/jobs.py), served before any route when jobs are on.
JOBS_PREFIX = "/v1/jobs"


def _jobs(config: GatewayConfig) -> Iterator[Problem]:
    if config.jobs.store == "redis" and config.redis.url is None:
        yield "jobs.store", "'redis' needs redis.url (or 'auto' or 'memory')"


def _egress(config: GatewayConfig) -> Iterator[Problem]:
    """The files a TLS setting names, and each target's egress proxy (from the environment
    too): found at load, with their place, rather than as a 502 on the first request."""
    for name, upstream in config.upstreams.items():
        problem = tls_problem(upstream.tls)
        if problem is not None:
            yield format_path(("upstreams", name, "tls")), problem
        for target in upstream.target_list():
            try:
                proxy_for(target.base_url, upstream.proxy, os.environ)
            except ValueError as exc:
                yield format_path(("upstreams", name, "proxy")), str(exc)
                break


@dataclass(frozen=True)
class _Cite:
    locate: Locate | None

    def __call__(self, path: KeyPath, text: str | None = None) -> str:
        """``text`` (default: the key path) followed by where it is, when that is known."""
        key_path = format_path(path)
        where = self.locate(key_path) if self.locate else None
        text = key_path if text is None else text
        return f"{text} ({where})" if where else text


def _unique_names(config: GatewayConfig, cite: _Cite) -> Iterator[Problem]:
    routes: dict[str, int] = {}
    for i, route in enumerate(config.routes):
        if route.name in routes:
            yield (
                format_path(("routes", i, "name")),
                f"route name {route.name!r} is already used by "
                + cite(("routes", routes[route.name])),
            )
        routes.setdefault(route.name, i)
    names: dict[str, int] = {}
    hashes: dict[str, int] = {}
    for i, key in enumerate(config.keys):
        if key.name in names:
            yield (
                format_path(("keys", i, "name")),
                f"key name {key.name!r} is already used by " + cite(("keys", names[key.name])),
            )
        if key.hash in hashes:
            other = hashes[key.hash]
            yield (
                format_path(("keys", i, "hash")),
                "the same hash is already used by "
                + cite(("keys", other), f"key {config.keys[other].name!r}"),
            )
        names.setdefault(key.name, i)
        hashes.setdefault(key.hash, i)
    admin_names: dict[str, int] = {}
    admin_hashes: dict[str, int] = {}
    for i, admin in enumerate(config.admin.keys):
        if admin.name in admin_names:
            yield (
                format_path(("admin", "keys", i, "name")),
                f"admin key name {admin.name!r} is already used by "
                + cite(("admin", "keys", admin_names[admin.name])),
            )
        if admin.hash in hashes:
            # A client key that opens the admin API would let every holder of it read and
            # reload the gateway's config.
            other = hashes[admin.hash]
            yield (
                format_path(("admin", "keys", i, "hash")),
                "a client key cannot be an admin key: the same hash is used by "
                + cite(("keys", other), f"key {config.keys[other].name!r}"),
            )
        elif admin.hash in admin_hashes:
            yield (
                format_path(("admin", "keys", i, "hash")),
                "the same hash is already used by "
                + cite(("admin", "keys", admin_hashes[admin.hash])),
            )
        admin_names.setdefault(admin.name, i)
        admin_hashes.setdefault(admin.hash, i)


def _references(config: GatewayConfig, skip: Unverified) -> Iterator[Problem]:
    upstreams = set(config.upstreams)
    routes = {route.name for route in config.routes}
    for i, route in enumerate(config.routes):
        if route.upstream not in upstreams and not skip.covers(skip.upstreams, route.upstream):
            yield (
                format_path(("routes", i, "upstream")),
                _unknown("upstream", route.upstream, upstreams),
            )
    for name, alias in config.models.items():
        if alias.upstream not in upstreams and not skip.covers(skip.upstreams, alias.upstream):
            yield (
                format_path(("models", name, "upstream")),
                _unknown("upstream", alias.upstream, upstreams),
            )
        for j, step in enumerate(alias.fallbacks):
            if step.upstream not in upstreams and not skip.covers(skip.upstreams, step.upstream):
                yield (
                    format_path(("models", name, "fallbacks", j, "upstream")),
                    _unknown("upstream", step.upstream, upstreams),
                )
        if alias.fallback_on and not alias.fallbacks:
            yield (
                format_path(("models", name, "fallback_on")),
                "there is nowhere to fall back to: add 'fallbacks'",
            )
    for i, key in enumerate(config.keys):
        for j, route_name in enumerate(key.routes):
            if (
                route_name != "*"
                and route_name not in routes
                and not skip.covers(skip.routes, route_name)
            ):
                yield format_path(("keys", i, "routes", j)), _unknown("route", route_name, routes)
        for j, model in enumerate(key.models):
            if _unknown_model(config, model, skip):
                yield (
                    format_path(("keys", i, "models", j)),
                    f"unknown model {model!r}: not in 'models' and not a pattern, and "
                    "allow_unlisted_models is false",
                )


def _request_rules(config: GatewayConfig, skip: Unverified) -> Iterator[Problem]:
    """A route's ``validate`` names a known rule set, and the route carries a body whose shape
    the rules know: found at load rather than as rules that silently never apply."""
    named = set(config.request_rules)
    for i, route in enumerate(config.routes):
        rules = route.rules
        if rules is None:
            continue
        where = format_path(("routes", i, "validate"))
        if (
            not isinstance(rules, RequestRules)
            and rules not in named
            and not skip.covers(skip.request_rules, rules)
        ):
            yield where, _unknown("rule set", rules, named)
        if shape_of(route.target_path(), route.path) is None:
            yield (
                where,
                "request rules apply to OpenAI's chat/completions, completions, embeddings and "
                f"responses bodies; neither the upstream path {route.target_path()!r} nor the "
                f"path {route.path!r} ends in one of them",
            )
        elif _BODY_METHODS.isdisjoint(route.methods):
            yield where, "request rules check bodies: the route serves no POST, PUT or PATCH"


def _limits(config: GatewayConfig, skip: Unverified) -> Iterator[Problem]:
    teams = {key.team for key in config.keys if key.team is not None}
    for team in config.limits.teams:
        if team not in teams and not skip.covers(skip.teams, team):
            yield format_path(("limits", "teams", team)), f"unknown team {team!r}: no key has it"
    routes = {route.name for route in config.routes}
    for route_name in config.limits.routes:
        if route_name not in routes and not skip.covers(skip.routes, route_name):
            yield (
                format_path(("limits", "routes", route_name)),
                _unknown("route", route_name, routes),
            )
    for section in ("routes", "models"):
        for name, limits in getattr(config.limits, section).items():
            if limits.max_concurrent is not None:
                yield (
                    format_path(("limits", section, name, "max_concurrent")),
                    "max_concurrent applies to keys (keys[].limits, limits.default) and teams "
                    "(limits.teams) only",
                )
            # Money is spent by a key or a team; a budget per route or model would be a second
            # account for the same dollars (gateway/accounting/accounts.py).
            if limits.budget is not None:
                yield (
                    format_path(("limits", section, name, "budget")),
                    "budget applies to keys (keys[].limits, limits.default) and teams "
                    "(limits.teams) only",
                )
    for section in ("teams", "routes", "models"):
        for name, limits in getattr(config.limits, section).items():
            # How long a request may wait is the key's (or, on a route, the route's) to say;
            # team and model limits only add buckets, and a second bound there would be
            # ambiguous. The waiting count is per key (gateway/limits/waiting.py).
            if limits.max_wait is not None and section != "routes":
                yield (
                    format_path(("limits", section, name, "max_wait")),
                    "max_wait applies to keys (keys[].limits, limits.default) and routes "
                    "(limits.routes) only",
                )
            if limits.max_waiting is not None:
                yield (
                    format_path(("limits", section, name, "max_waiting")),
                    "max_waiting applies to keys (keys[].limits, limits.default) only",
                )
    for model in config.limits.models:
        if _unknown_model(config, model, skip):
            yield (
                format_path(("limits", "models", model)),
                f"unknown model {model!r}: not in 'models' and not a pattern, and "
                "allow_unlisted_models is false",
            )


def _unknown_model(config: GatewayConfig, model: str, skip: Unverified) -> bool:
    return not (
        config.allow_unlisted_models
        or model in config.models
        or not _GLOB_CHARS.isdisjoint(model)
        or skip.covers(skip.models, model)
    )


def _unknown(kind: str, name: str, known: set[str]) -> str:
    if not known:
        return f"unknown {kind} {name!r}: none is defined"
    listed = ", ".join(sorted(known)[:10]) + (", ..." if len(known) > 10 else "")
    return f"unknown {kind} {name!r}; defined: {listed}"


@dataclass(frozen=True)
class _Served:
    """One public path pattern of the route table: a route's own path or one of its aliases."""

    where: KeyPath
    route: Route
    path: str
    is_alias: bool

    def describe(self, other_path: str, cite: _Cite) -> str:
        text = f"route {self.route.name!r}"
        if self.is_alias:
            text += " as an alias" if self.path == other_path else f" as alias {self.path!r}"
        elif self.path != other_path:
            text += f" as {self.path!r}"
        return cite(self.where, text)


def _route_table(config: GatewayConfig, cite: _Cite, skip: Unverified) -> Iterator[Problem]:
    served: list[_Served] = []
    for i, route in enumerate(config.routes):
        served.append(_Served(("routes", i, "path"), route, route.path, False))
        for j, alias in enumerate(route.aliases):
            served.append(_Served(("routes", i, "aliases", j, "path"), route, alias.path, True))
    by_shape: dict[str, list[_Served]] = {}
    for entry in served:
        if entry.path in RESERVED_PATHS or entry.path.startswith(RESERVED_PREFIX):
            yield format_path(entry.where), f"{entry.path!r} is reserved for the gateway itself"
            continue
        if config.jobs.enabled and (
            entry.path == JOBS_PREFIX or entry.path.startswith(JOBS_PREFIX + "/")
        ):
            yield (
                format_path(entry.where),
                f"{entry.path!r} is the gateway's jobs API (set jobs.enabled: false to route it)",
            )
            continue
        earlier = by_shape.setdefault(_shape(entry.path), [])
        for other in earlier:
            common = set(entry.route.methods) & set(other.route.methods)
            if common:
                message = f"{entry.path!r} is already served by "
                message += other.describe(entry.path, cite)
                if common != set(entry.route.methods):
                    message += f" for {', '.join(sorted(common))}"
                yield format_path(entry.where), message
                break
        earlier.append(entry)
    if skip.routes != frozenset():
        return  # a successor may be served by a route that failed validation
    # A successor is usually a literal path served as written: one lookup. Only patterns with
    # parameters need a scan (comparing every successor with every path was quadratic: seconds
    # for a thousand routes).
    shapes = set(by_shape)
    patterns = [e.path for e in served if "{" in e.path]
    for i, route in enumerate(config.routes):
        for j, alias in enumerate(route.aliases):
            successor = alias.successor
            if (
                successor is not None
                and _shape(successor) not in shapes
                and not any(_serves(pattern, successor) for pattern in patterns)
            ):
                yield (
                    format_path(("routes", i, "aliases", j, "successor")),
                    f"{successor!r} is not served by any route or alias",
                )


def _shape(path: str) -> str:
    """The pattern with parameter names erased: /v1/files/{id} and /v1/files/{file_id} match the
    same requests, so they have the same shape."""
    segments = []
    for segment in path.split("/"):
        param = segment_param(segment)
        segments.append(segment if param is None else "{:path}" if param.catch_all else "{}")
    return "/".join(segments)


def _serves(pattern: str, path: str) -> bool:
    """Whether ``path`` (a concrete path or a pattern) is served by ``pattern``."""
    if _shape(pattern) == _shape(path):
        return True
    wanted, given = pattern.split("/"), path.split("/")
    for i, segment in enumerate(wanted):
        param = segment_param(segment)
        if param is not None and param.catch_all:
            return len(given) > i
        if i >= len(given) or (segment != given[i] if param is None else not given[i]):
            return False
    return len(given) == len(wanted)
