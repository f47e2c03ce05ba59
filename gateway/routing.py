"""The route table: public method + path -> the route, the alias it came through, the upstream path.

Matching works on the *raw* (still percent-encoded) path relative to the root path, so what the
gateway sends upstream is byte for byte what the client sent: a ``%2F`` inside a file id stays
``%2F``. Literal paths are one dict lookup; patterns are tried most specific first (fewer
catch-alls, longer literal prefix). A path that exists for other methods is a 405 with ``Allow``,
never a redirect: the OpenAI SDK follows redirects and a redirected POST loses its body
(docs/design.md §3).
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.utils import format_datetime
from urllib.parse import unquote_to_bytes

from gateway.config.routes import Alias, Route
from gateway.config.templates import split_template


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One public path pattern of a route: the route's own path or one of its aliases."""

    route: Route
    public_path: str
    alias: Alias | None
    # Deprecation and Sunset headers, computed once (RFC 9745 §2, RFC 8594 §3).
    deprecation_headers: tuple[tuple[bytes, bytes], ...]
    target: _Template

    @property
    def deprecated(self) -> bool:
        return self.alias is not None and self.alias.deprecated is not False

    def successor_link(self, root_path: str) -> tuple[bytes, bytes] | None:
        """``Link`` to the successor, carrying the public prefix the client used (RFC 8288)."""
        if self.alias is None or self.alias.successor is None:
            return None
        value = f'<{root_path}{self.alias.successor}>; rel="successor-version"'
        return (b"link", value.encode("latin-1"))


@dataclass(frozen=True, slots=True)
class Match:
    endpoint: Endpoint
    upstream_path: str
    params: dict[str, str] = field(default_factory=dict)  # raw, as matched

    def encoded_slashes_confined(self, raw_path: str) -> bool:
        """Whether every encoded ``/`` of ``raw_path`` lies in the one parameter the route lets
        hold them (``encoded_slashes``), e.g. a model id such as ``org%2Fmodel``."""
        name = self.endpoint.route.encoded_slashes
        if name is None or name not in self.params:
            return False
        inside = len(_ENCODED_SLASH.findall(self.params[name]))
        return inside == len(_ENCODED_SLASH.findall(raw_path))


@dataclass(frozen=True, slots=True)
class MethodMismatch:
    allowed: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Template:
    """An upstream path with ``{name}`` holes, filled with the raw matched values."""

    parts: tuple[str, ...]  # literal, name, literal, name, ..., literal

    @classmethod
    def parse(cls, path: str) -> _Template:
        pieces = split_template(path)
        return cls(tuple(piece if isinstance(piece, str) else piece.name for piece in pieces))

    def fill(self, params: dict[str, str]) -> str:
        if len(self.parts) == 1:
            return self.parts[0]
        return "".join(params[part] if i % 2 else part for i, part in enumerate(self.parts))


@dataclass(slots=True)
class _Pattern:
    regex: re.Pattern[str]
    by_method: dict[str, Endpoint] = field(default_factory=dict)


def _deprecation_headers(alias: Alias | None) -> tuple[tuple[bytes, bytes], ...]:
    if alias is None or alias.deprecated is False:
        return ()
    headers: list[tuple[bytes, bytes]] = []
    if alias.deprecated is True:
        # RFC 9745 requires a date; an alias deprecated "now" says so with the epoch.
        headers.append((b"deprecation", b"@0"))
    else:
        when = dt.datetime.combine(alias.deprecated, dt.time(), dt.UTC)
        headers.append((b"deprecation", f"@{int(when.timestamp())}".encode()))
    if alias.sunset is not None:
        when = dt.datetime.combine(alias.sunset, dt.time(), dt.UTC)
        headers.append((b"sunset", format_datetime(when, usegmt=True).encode()))
    return tuple(headers)


def _compile(path: str) -> re.Pattern[str]:
    out = ["^"]
    for piece in split_template(path):
        if isinstance(piece, str):
            out.append(re.escape(piece))
        else:
            name = piece.name
            out.append(f"(?P<{name}>.*)" if piece.catch_all else f"(?P<{name}>[^/]+)")
    out.append("$")
    return re.compile("".join(out))


def _specificity(path: str) -> tuple[int, int, int]:
    """Sort key: patterns without a catch-all first, then longer literal prefixes first."""
    catch_all = 1 if ":path}" in path else 0
    literal_prefix = len(path.split("{", 1)[0])
    return (catch_all, -literal_prefix, -path.count("/"))


class RouteTable:
    """Resolves a method and a raw relative path to an :class:`Endpoint`."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self._literal: dict[str, dict[str, Endpoint]] = {}
        patterns: dict[str, _Pattern] = {}
        self.endpoints: list[Endpoint] = []
        for route in routes:
            target = _Template.parse(route.target_path())
            for public_path, alias in [(route.path, None), *((a.path, a) for a in route.aliases)]:
                endpoint = Endpoint(route, public_path, alias, _deprecation_headers(alias), target)
                self.endpoints.append(endpoint)
                if "{" in public_path:
                    entry = patterns.setdefault(public_path, _Pattern(_compile(public_path)))
                    slots = entry.by_method
                else:
                    slots = self._literal.setdefault(public_path, {})
                for method in route.methods:
                    # The loader refuses overlaps; first one wins if a caller skipped it.
                    slots.setdefault(method, endpoint)
        self._patterns = sorted(patterns.items(), key=lambda item: _specificity(item[0]))

    def match(self, method: str, raw_path: str) -> Match | MethodMismatch | None:
        allowed: set[str] = set()
        by_method = self._literal.get(raw_path)
        if by_method is not None:
            endpoint = by_method.get(method)
            if endpoint is not None:
                return Match(endpoint, endpoint.target.fill({}))
            allowed.update(by_method)
        for _, pattern in self._patterns:
            found = pattern.regex.match(raw_path)
            if found is None:
                continue
            endpoint = pattern.by_method.get(method)
            if endpoint is not None:
                params = found.groupdict()
                return Match(endpoint, endpoint.target.fill(params), params)
            allowed.update(pattern.by_method)
        if allowed:
            return MethodMismatch(tuple(sorted(allowed)))
        return None


def relative_raw_path(scope_raw_path: bytes | None, path: str, root_path: str) -> str:
    """The request's raw path relative to ``root_path``.

    ``scope["path"]`` includes ``root_path`` (ASGI; uvicorn >= 0.26) but is percent-decoded;
    ``raw_path`` is what came on the wire, with the prefix when the proxy kept it and without
    when the proxy stripped it. Strip the prefix only where it is really there.
    """
    raw = scope_raw_path.decode("latin-1") if scope_raw_path else path
    if root_path and raw.startswith(root_path):
        rest = raw[len(root_path) :]
        if not rest or rest.startswith("/"):
            return rest or "/"
    return raw


# RFC 3986 §5.2.4 dot segments, as they read once percent-decoded.
_DOT_SEGMENTS = frozenset({b".", b".."})
# Bytes no path may hold once decoded: controls (NUL included) and the backslash, which some
# servers and proxies read as a path separator.
# ``?`` and ``#`` too: decoded by a server behind the gateway, they would turn part of the path
# into a query (past the configured query values) or a fragment.
_FORBIDDEN = re.compile(rb"[\x00-\x1f\x7f\\?#]")
_ENCODED_SLASH = re.compile(r"%2f", re.IGNORECASE)


class PathVerdict(enum.Enum):
    SAFE = "safe"
    ENCODED_SLASH = "encoded slash"  # safe only inside a parameter that allows it
    UNSAFE = "unsafe"


def judge_path(raw_path: str) -> PathVerdict:
    """Judge a raw path by what it means once percent-decoded, as anything behind the gateway
    may decode it before routing.

    Forwarded raw, ``/v1/models/..%2F..%2Fsecret`` leaves the upstream's base path once a
    server on the way decodes and normalises it, with the gateway's upstream credentials;
    ``/v1/./chat/completions`` or ``/v1/x/..%2Fchat%2Fcompletions`` would reach the chat
    endpoint through the catch-all route, past the chat route's key rules, limits and methods.
    So dot segments and empty segments (``//``), a backslash, NUL or any control character,
    encoded or not, are unsafe; an encoded ``/`` is unsafe unless the matched route lets one
    parameter hold it (:meth:`Match.encoded_slashes_confined`)."""
    if not ("%" in raw_path or "/." in raw_path or "//" in raw_path or "\\" in raw_path):
        return PathVerdict.SAFE  # the common case, decided without decoding
    decoded = unquote_to_bytes(raw_path)
    if _unsafe_once_decoded(decoded):
        return PathVerdict.UNSAFE
    if b"%" in decoded and _unsafe_once_decoded(unquote_to_bytes(decoded)):
        # Encoded twice (%252e%252e%252f): safe only if nothing behind the gateway decodes
        # twice, which the gateway cannot know.
        return PathVerdict.UNSAFE
    if _ENCODED_SLASH.search(raw_path):
        return PathVerdict.ENCODED_SLASH
    return PathVerdict.SAFE


def _unsafe_once_decoded(decoded: bytes) -> bool:
    if _FORBIDDEN.search(decoded):
        return True
    segments = decoded.split(b"/")[1:]
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        # ``..;x`` is a dot segment to servlet containers (Tomcat, Jetty), which strip path
        # parameters before resolving dots.
        if segment.split(b";", 1)[0] in _DOT_SEGMENTS or (not segment and i < last):
            return True
    return False
