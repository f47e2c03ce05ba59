"""Who is the client? Believe forwarded headers only from trusted proxies (docs/design.md §3).

``ForwardedMiddleware`` is the one place that decides trust (uvicorn's ``--proxy-headers`` stays
off). For ``http`` and ``websocket`` scopes it sets:

- ``scope["client"]``: ``(address, 0)`` when a trusted proxy named the client, else unchanged;
- ``scope["scheme"]``, the ``host`` header, ``scope["root_path"]`` and ``scope["path"]``;
- on the request's context (``gateway/context.py``), when it has one: the client's address and
  ``forwarded_for``, the chain the relay may send on as ``X-Forwarded-For``.

Every forwarded header is removed from ``scope["headers"]``, trusted or not, so that the proxy never
relays one verbatim; it builds its own. Bad values are ignored and counted, never raised.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import Literal

from gateway.context import context_of
from gateway.types import ASGIApp, RawHeaders, Receive, Scope, Send

MAX_HEADER_BYTES = 4096
MAX_HOPS = 64

Reason = Literal["for", "forwarded", "too_long", "too_many_hops", "proto", "host", "prefix"]
REASONS: tuple[Reason, ...] = (
    "for",  # the X-Forwarded-For hop that decides the client is not an address
    "forwarded",  # the Forwarded element that decides the client is not valid RFC 7239
    "too_long",  # X-Forwarded-For or Forwarded over MAX_HEADER_BYTES
    "too_many_hops",  # ... or with more than MAX_HOPS entries
    "proto",  # X-Forwarded-Proto / proto= is not http(s) (ws(s) on websockets)
    "host",  # X-Forwarded-Host / host= does not look like host[:port]
    "prefix",  # X-Forwarded-Prefix is not a clean absolute path
)

_XFF = b"x-forwarded-for"
_PROTO = b"x-forwarded-proto"
_HOST = b"x-forwarded-host"
_PREFIX = b"x-forwarded-prefix"
_FORWARDED = b"forwarded"
# Read and always removed (the relay never sends a client's copy upstream, http/headers.py).
# X-Forwarded-Port and X-Real-IP are only removed: the port travels in
# X-Forwarded-Host when it is not the default, and X-Real-IP cannot express a chain of hops.
FORWARDED_HEADERS = frozenset(
    {
        _XFF,
        _PROTO,
        _HOST,
        _PREFIX,
        _FORWARDED,
        b"x-forwarded-port",
        b"x-forwarded-server",  # Traefik's own host name: nothing an upstream should learn
        b"x-real-ip",
    }
)

_SCHEMES = {
    "http": {"http": "http", "https": "https"},
    # Traefik sends ws/wss for upgrades, Nginx's $scheme sends http/https.
    "websocket": {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"},
}
_PORT = r"(?::(?:[0-9]{1,5}|_[A-Za-z0-9._-]+))?"  # RFC 7239 §6: node-port, maybe obfuscated
_OBFUSCATED = re.compile(r"_[A-Za-z0-9._-]+")  # RFC 7239 §6.3
# RFC 3986 §3.2.2 reg-name (without pct-encoding and sub-delims), IPv4 or [IPv6], optional port.
_HOST_PORT = re.compile(r"(?:[A-Za-z0-9._~-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::([0-9]{1,5}))?")
_PREFIX_PATH = re.compile(r"(?:/[A-Za-z0-9._~!$&'()*+,;=:@-]*)+")  # no "%", controls or spaces
# RFC 7239 §4: pair = token "=" (token / quoted-string). Unquoted values may also hold ":[]",
# which the RFC requires quoting but which costs nothing to accept.
_NAME = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_BARE = r"[!#$%&'*+.^_`|~0-9A-Za-z:\[\]-]+"
_QUOTED = r'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_PAIR = re.compile(rf"[ \t]*({_NAME})=({_BARE}|{_QUOTED})[ \t]*(?:;|\Z)")
_ESCAPE = re.compile(r"\\(.)")


class ForwardedStats:
    """Counters of forwarded values that were ignored, for metrics. One per middleware."""

    __slots__ = ("malformed", "untrusted")

    def __init__(self) -> None:
        self.malformed: dict[Reason, int] = dict.fromkeys(REASONS, 0)
        # Requests that carried forwarded headers from a peer outside the trusted networks: a
        # spoofing attempt, or a proxy missing from `trusted_proxies`.
        self.untrusted = 0


class TrustedProxies:
    """The networks whose forwarded headers we believe; ``host in trusted`` tests an address."""

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self.networks = tuple(networks)
        # Parsing an address costs microseconds; the same few peers and clients recur.
        self._cache: dict[str, tuple[str, bool] | None] = {}

    def __contains__(self, host: object) -> bool:
        found = self.lookup(host) if isinstance(host, str) else None
        return found is not None and found[1]

    def lookup(self, node: str) -> tuple[str, bool] | None:
        """``(address, trusted)`` for an address, with an optional port and IPv6 brackets as in
        X-Forwarded-For and RFC 7239 ``for=``; ``None`` when ``node`` is not an address. The
        address is normalised: no port, IPv6 compressed, IPv4-mapped IPv6 as IPv4."""
        try:
            return self._cache[node]
        except KeyError:
            if len(node) > 100:  # longer than any address with port and scope id
                return None
            found = self._parse(node)
            if len(self._cache) >= 4096:
                self._cache.clear()
            self._cache[node] = found
        return found

    def _parse(self, node: str) -> tuple[str, bool] | None:
        host = node
        if node.startswith("["):  # [v6] or [v6]:port
            end = node.find("]")
            if end < 0 or not re.fullmatch(_PORT, node[end + 1 :]):
                return None
            host = node[1:end]
        elif node.count(":") == 1:  # v4:port (a bare IPv6 address has several colons)
            host, _, port = node.partition(":")
            if not re.fullmatch(_PORT, ":" + port):
                return None
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return None
        # An IPv4 client on a dual-stack socket appears as ::ffff:a.b.c.d.
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        # An IPv6 scope id ("fe80::1%eth0") is kept in the text and ignored by `in network`.
        return str(address), any(address in network for network in self.networks)


class ForwardedMiddleware:
    """Pure ASGI middleware: take client, scheme, host and prefix from a trusted proxy.

    X-Forwarded-For or Forwarded? A request carrying ``X-Forwarded-For`` is read from the
    ``X-Forwarded-*`` headers alone; one without it but with ``Forwarded`` (RFC 7239) takes
    for/proto/host from ``Forwarded`` alone (X-Forwarded-Prefix has no counterpart there).
    Nginx and Traefik set X-Forwarded-For and pass a client's ``Forwarded`` through untouched
    (traefik/traefik#4099), so preferring Forwarded would let any client choose its address. A
    proxy that sets only ``Forwarded`` must drop inbound ``X-Forwarded-For``.

    A peer without an IP address (a Unix socket, where ``scope["client"]`` is None) is not
    trusted, as in uvicorn unless it is told to trust "*": the trusted networks cannot name it.
    """

    def __init__(
        self,
        app: ASGIApp,
        trusted: TrustedProxies,
        root_path: str = "",
        stats: ForwardedStats | None = None,
    ) -> None:
        root_path = root_path.rstrip("/")
        if root_path and not root_path.startswith("/"):
            raise ValueError(f"root_path must start with '/': {root_path!r}")
        self.app = app
        self.trusted = trusted
        self.root_path = root_path
        self.stats = ForwardedStats() if stats is None else stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" or scope["type"] == "websocket":
            self._rewrite(scope)
        await self.app(scope, receive, send)

    def _rewrite(self, scope: Scope) -> None:
        # One pass: collect the forwarded headers, keep the rest. Repeated lines are joined in
        # order, as one comma-separated list (RFC 9110 §5.3).
        found: dict[bytes, list[bytes]] = {}
        kept: RawHeaders = []
        host_index = -1
        for name, value in scope["headers"]:
            lower = name.lower()
            if lower in FORWARDED_HEADERS:
                found.setdefault(lower, []).append(value)
            else:
                if lower == b"host" and host_index < 0:
                    host_index = len(kept)
                kept.append((name, value))
        if found:
            scope["headers"] = kept

        client = scope.get("client")
        peer = client[0] if client else None
        if not isinstance(peer, str) or peer not in self.trusted:
            if found:
                self.stats.untrusted += 1
            _record(scope, (peer,) if isinstance(peer, str) else ())
            self._set_root(scope, None)
            return

        chain: tuple[str, ...] = ()
        proto = host = None
        if _XFF in found or _FORWARDED not in found:
            if _XFF in found:
                hops, complete = self._entries(found[_XFF])
                chain, _ = self._walk(hops, complete, _xff_node, "for")
            proto = _last(found.get(_PROTO))
            host = _last(found.get(_HOST))
        else:
            hops, complete = self._entries(found[_FORWARDED])
            chain, index = self._walk(hops, complete, _forwarded_node, "forwarded")
            if chain:
                # The element that named the client was written by a trusted proxy; its proto and
                # host describe the request as the client sent it.
                element = _element(hops[index].strip()) or {}
                proto, host = element.get("proto"), element.get("host")

        if chain:
            scope["client"] = (chain[0], 0)
        _record(scope, (*chain, peer))

        if proto is not None:
            scheme = _SCHEMES[scope["type"]].get(proto.strip().lower())
            if scheme is None:
                self.stats.malformed["proto"] += 1
            else:
                scope["scheme"] = scheme
        if host is not None:
            host = host.strip()
            match = _HOST_PORT.fullmatch(host)
            if match and (match[1] is None or int(match[1]) <= 65535):
                header = (b"host", host.encode("latin-1"))
                if host_index < 0:
                    kept.append(header)
                else:
                    kept[host_index] = header
            else:
                self.stats.malformed["host"] += 1
        prefix = None
        if _PREFIX in found:
            prefix = _prefix(found[_PREFIX][-1].decode("latin-1"))
            if prefix is None:
                self.stats.malformed["prefix"] += 1
        self._set_root(scope, prefix)

    def _entries(self, values: list[bytes]) -> tuple[list[str], bool]:
        """The rightmost entries of a comma-separated list, at most MAX_HOPS of them from at most
        MAX_HEADER_BYTES, and whether that is all of it. Entries further left were written by the
        client: the walk only gets there if every hop to their right is trusted."""
        text = (values[0] if len(values) == 1 else b",".join(values)).decode("latin-1")
        complete = True
        if len(text) > MAX_HEADER_BYTES:
            self.stats.malformed["too_long"] += 1
            text = text[-MAX_HEADER_BYTES:]
            complete = False
        entries = text.rsplit(",", MAX_HOPS)
        if len(entries) > MAX_HOPS and complete:
            self.stats.malformed["too_many_hops"] += 1
            complete = False
        if not complete:
            del entries[0]  # cut in the middle, or the unsplit rest
        return entries, complete

    def _walk(
        self, hops: list[str], complete: bool, node_of: Callable[[str], str | None], reason: Reason
    ) -> tuple[tuple[str, ...], int]:
        """Walk the hops from the right and stop at the first untrusted one: that is the client,
        as every hop to its right is a proxy we trust to have appended honestly, while anything
        to its left is the client's to invent (MDN, X-Forwarded-For, "Security and privacy").

        Returns the client followed by the trusted hops to its right, and the client's index in
        ``hops``; an empty chain when the hop that decides is malformed or beyond the limits.
        """
        chain: list[str] = []
        client = -1
        for index in range(len(hops) - 1, -1, -1):
            entry = hops[index].strip()
            if not entry:
                continue  # RFC 9110 §5.6.1: empty list elements do not count
            node = node_of(entry)
            found = None if node is None else self.trusted.lookup(node)
            if found is None:
                name = None if node is None else _identifier(node)
                if name is None:
                    self.stats.malformed[reason] += 1
                    return (), -1
                # RFC 7239 §6.2, §6.3: a proxy that hides or does not know the address still
                # names a hop, one we cannot trust, so the walk ends there.
                chain.append(name)
                return tuple(reversed(chain)), index
            chain.append(found[0])
            client = index
            if not found[1]:
                return tuple(reversed(chain)), index
        if not complete:
            return (), -1  # all trusted, and the client lies beyond the limits
        # Every hop is trusted: the leftmost one is the client, a proxy itself (encode/uvicorn
        # #1068).
        return tuple(reversed(chain)), client

    def _set_root(self, scope: Scope, prefix: str | None) -> None:
        """Make ``root_path`` the configured root path plus any X-Forwarded-Prefix, and ``path``
        begin with it (ASGI: ``path`` includes ``root_path``, as uvicorn sends it since 0.26;
        Starlette routes on ``path`` minus ``root_path``).

        Whenever the prefix is prepended to ``path``, the same bytes are prepended to
        ``raw_path`` (the prefix is validated to hold no ``%``), so both carry it exactly when
        the client's URL did: the relay routes on the raw path minus ``root_path``, and a
        doubled prefix (``/llm/llm/v1/...``) must stay a 404 rather than be stripped twice.
        """
        path: str = scope["path"]
        # uvicorn --root-path already put its prefix in front of path; take it off again to see
        # the path as the peer sent it, so that it is never added twice. The configured root
        # path, when there is one, replaces the server's.
        server_root: str = scope.get("root_path") or ""
        if server_root and _under(path, server_root):
            path = path[len(server_root) :]
        root = self.root_path or server_root
        prepend = False
        if prefix:
            # X-Forwarded-Prefix names what the proxy stripped, below the configured root path
            # (which a proxy further out, invisible to us, stripped): prepend both.
            root += prefix
            prepend = True
        elif root and not _under(path, root):
            # The proxy stripped or replaced the prefix (Nginx `proxy_pass http://gw/;`). A path
            # that already starts with it was kept (`proxy_pass http://gw;`): leave it.
            prepend = True
        if prepend:
            path = root + path
            raw_path = scope.get("raw_path")
            if raw_path is not None:
                scope["raw_path"] = root.encode("utf-8") + raw_path
        scope["root_path"] = root
        scope["path"] = path
        context = context_of(scope)
        if context is not None:
            context.path = path  # the path the client asked for, prefix included


def _record(scope: Scope, chain: tuple[str, ...]) -> None:
    context = context_of(scope)
    if context is not None:
        client = scope.get("client")
        context.client = client[0] if client else None
        context.forwarded_for = chain


def _xff_node(entry: str) -> str | None:
    return entry


def _forwarded_node(entry: str) -> str | None:
    """The ``for=`` of an RFC 7239 element: ``None`` if malformed, ``unknown`` if absent."""
    element = _element(entry)
    if element is None:
        return None
    return element.get("for", "unknown")


def _identifier(node: str) -> str | None:
    """``unknown`` or an obfuscated identifier, without its port (RFC 7239 §6); else ``None``."""
    name, colon, port = node.partition(":")
    if colon and not re.fullmatch(_PORT, colon + port):
        return None
    if name.lower() == "unknown":
        return "unknown"
    return name if _OBFUSCATED.fullmatch(name) else None


def _element(entry: str) -> dict[str, str] | None:
    """Parse one forwarded-element (RFC 7239 §4); ``None`` if malformed.

    Elements are split on commas before parsing (in ``_entries``), which no value we read can
    contain: an unbalanced quote in a client's element then cannot swallow the elements that
    trusted proxies appended after it.
    """
    pairs: dict[str, str] = {}
    position = 0
    while position < len(entry):
        match = _PAIR.match(entry, position)
        if match is None:
            return None
        name, value = match[1].lower(), match[2]
        if name in pairs:
            return None  # RFC 7239 §4: a parameter MUST NOT occur more than once
        if value.startswith('"'):
            value = _ESCAPE.sub(r"\1", value[1:-1])
        pairs[name] = value
        position = match.end()
    return pairs


def _last(values: list[bytes] | None) -> str | None:
    """The last value of a single-valued header: a proxy that appends puts its own last."""
    if values is None:
        return None
    return values[-1].decode("latin-1").rpartition(",")[2]


def _prefix(value: str) -> str | None:
    """A clean X-Forwarded-Prefix without its trailing slash ("" for "/"); ``None`` if it could
    climb out of the root or smuggle a second path: "..", "//", "/./", controls, percent-encoding
    (which would have to be decoded to compare with ``path``)."""
    value = value.strip()
    if len(value) > 1024 or not _PREFIX_PATH.fullmatch(value):
        return None
    if ".." in value or "//" in value or "/./" in value + "/":
        return None
    return value.rstrip("/")


def _under(path: str, prefix: str) -> bool:
    """``path`` is ``prefix`` or below it, segment-wise: "/llm" is under "/llm", not "/llmx"."""
    return path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/")
