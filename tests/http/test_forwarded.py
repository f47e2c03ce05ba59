"""Forwarded headers are believed only from trusted proxies (docs/design.md §3, RFC 7239)."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from typing import NamedTuple

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from gateway.context import SCOPE_KEY, RequestContext
from gateway.http.forwarded import REASONS, ForwardedMiddleware, ForwardedStats, TrustedProxies
from gateway.types import ASGIApp, Message, Scope

TRUSTED = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "fe80::/10")
FORWARDED_HEADERS = (
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-prefix",
    "x-forwarded-port",
    "x-real-ip",
    "forwarded",
)


def trusted() -> TrustedProxies:
    return TrustedProxies(ipaddress.ip_network(n) for n in TRUSTED)


def make_scope(
    peer: str | None,
    headers: Sequence[tuple[str, str]] = (),
    *,
    kind: str = "http",
    path: str = "/v1/models",
    root_path: str = "",
) -> Scope:
    return {
        "type": kind,
        # The context the lifecycle middleware puts in every request's scope.
        SCOPE_KEY: RequestContext("test", "GET", path),
        "client": None if peer is None else (peer, 5000),
        "scheme": "http" if kind == "http" else "ws",
        "root_path": root_path,
        "path": path,
        # uvicorn --root-path prepends the root to path only; raw_path is what came on the wire.
        "raw_path": (
            path[len(root_path) :] if root_path and path.startswith(root_path) else path
        ).encode(),
        "query_string": b"",
        "headers": [(b"host", b"gw.example")]
        + [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
    }


async def forward(
    scope: Scope, *, root_path: str = "", stats: ForwardedStats | None = None
) -> Scope:
    """Run the middleware in front of an app that captures the scope it is given."""
    seen: list[Scope] = []

    async def app(scope: Scope, receive: object, send: object) -> None:
        seen.append(scope)

    async def receive() -> Message:
        raise AssertionError("not called")

    async def send(message: Message) -> None:
        raise AssertionError("not called")

    await ForwardedMiddleware(app, trusted(), root_path, stats)(scope, receive, send)
    return seen[0]


def host_header(scope: Scope) -> str | None:
    hosts = [v.decode() for k, v in scope["headers"] if k.lower() == b"host"]
    assert len(hosts) <= 1
    return hosts[0] if hosts else None


class Seen(NamedTuple):
    client: tuple[str, int] | None
    scheme: str
    host: str | None
    root_path: str
    path: str
    forwarded_for: tuple[str, ...]


def forwarded_for(scope: Scope) -> tuple[str, ...]:
    context: RequestContext = scope[SCOPE_KEY]
    return context.forwarded_for


def seen(scope: Scope) -> Seen:
    return Seen(
        scope["client"],
        scope["scheme"],
        host_header(scope),
        scope["root_path"],
        scope["path"],
        forwarded_for(scope),
    )


def unchanged(peer: str) -> Seen:
    return Seen((peer, 5000), "http", "gw.example", "", "/v1/models", (peer,))


def client(ip: str, *hops: str, scheme: str = "http", host: str = "gw.example") -> Seen:
    return Seen((ip, 0), scheme, host, "", "/v1/models", (ip, *hops))


# fmt: off
TRUST_CASES = [
    # The TCP peer is not a trusted proxy: nothing it says about the client is believed.
    pytest.param("203.0.113.9", [], unchanged("203.0.113.9"), id="untrusted-peer-no-headers"),
    pytest.param("203.0.113.9", [("x-forwarded-for", "127.0.0.1")], unchanged("203.0.113.9"),
                 id="untrusted-peer-spoofed-xff"),
    pytest.param("203.0.113.9", [("forwarded", "for=127.0.0.1;proto=https;host=evil.example"),
                                 ("x-forwarded-proto", "https"),
                                 ("x-forwarded-host", "evil.example"),
                                 ("x-forwarded-prefix", "/evil"), ("x-real-ip", "127.0.0.1")],
                 unchanged("203.0.113.9"), id="untrusted-peer-every-header-spoofed"),
    pytest.param("11.0.0.1", [("x-forwarded-for", "198.51.100.7")], unchanged("11.0.0.1"),
                 id="untrusted-peer-just-outside-cidr"),
    pytest.param("127.0.0.1", [], unchanged("127.0.0.1"), id="trusted-peer-no-headers"),
    # A trusted peer: walk X-Forwarded-For from the right to the first untrusted hop.
    pytest.param("127.0.0.1", [("x-forwarded-for", "198.51.100.7")],
                 client("198.51.100.7", "127.0.0.1"), id="ipv4-one-hop"),
    pytest.param("::1", [("x-forwarded-for", "2001:db8::7")],
                 client("2001:db8::7", "::1"), id="ipv6-one-hop"),
    pytest.param("10.20.30.40", [("x-forwarded-for", "198.51.100.7")],
                 client("198.51.100.7", "10.20.30.40"), id="peer-in-trusted-cidr"),
    pytest.param("127.0.0.1", [("x-forwarded-for", "198.51.100.7, 10.0.0.2, 10.0.0.3")],
                 client("198.51.100.7", "10.0.0.2", "10.0.0.3", "127.0.0.1"), id="several-hops"),
    pytest.param("127.0.0.1", [("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.0.0.2")],
                 client("198.51.100.7", "10.0.0.2", "127.0.0.1"),
                 id="client-written-entries-are-dropped"),
    pytest.param("127.0.0.1", [("x-forwarded-for", "127.0.0.1, 198.51.100.7")],
                 client("198.51.100.7", "127.0.0.1"), id="client-cannot-claim-a-trusted-address"),
    pytest.param("127.0.0.1", [("x-forwarded-for", "10.0.0.5, 10.0.0.6")],
                 client("10.0.0.5", "10.0.0.6", "127.0.0.1"), id="all-trusted-leftmost-is-client"),
    pytest.param("127.0.0.1", [("x-forwarded-for", "garbage, 198.51.100.7")],
                 client("198.51.100.7", "127.0.0.1"), id="garbage-left-of-the-client-is-not-read"),
    pytest.param("127.0.0.1", [("x-forwarded-for", "198.51.100.7,,  ,10.0.0.2,")],
                 client("198.51.100.7", "10.0.0.2", "127.0.0.1"), id="empty-list-elements"),
    pytest.param("127.0.0.1", [("x-forwarded-for", "198.51.100.7"),
                               ("x-forwarded-for", "10.0.0.2")],
                 client("198.51.100.7", "10.0.0.2", "127.0.0.1"), id="two-lines-joined-in-order"),
    pytest.param("127.0.0.1", [("x-forwarded-for", "198.51.100.7"),
                               ("x-forwarded-for", "203.0.113.1")],
                 client("203.0.113.1", "127.0.0.1"), id="two-lines-last-line-is-nearest"),
    pytest.param("127.0.0.1", [("x-forwarded-for", "198.51.100.7:4711")],
                 client("198.51.100.7", "127.0.0.1"), id="ipv4-with-port"),
    pytest.param("127.0.0.1", [("x-forwarded-for", "[2001:DB8::7]:4711")],
                 client("2001:db8::7", "127.0.0.1"), id="bracketed-ipv6-with-port-normalised"),
    pytest.param("::ffff:127.0.0.1", [("x-forwarded-for", "::ffff:198.51.100.7")],
                 client("198.51.100.7", "::ffff:127.0.0.1"), id="ipv4-mapped-ipv6"),
    pytest.param("fe80::1%eth0", [("x-forwarded-for", "198.51.100.7, fe80::7%eth0")],
                 client("198.51.100.7", "fe80::7%eth0", "fe80::1%eth0"), id="ipv6-scope-ids"),
    pytest.param("127.0.0.1", [("x-forwarded-for", "unknown")],
                 client("unknown", "127.0.0.1"), id="xff-unknown"),
    pytest.param("127.0.0.1", [("x-real-ip", "198.51.100.7")], unchanged("127.0.0.1"),
                 id="x-real-ip-is-not-read"),
    pytest.param("127.0.0.1", [("X-Forwarded-For", "198.51.100.7"), ("X-Forwarded-Proto", "HTTPS"),
                               ("X-Forwarded-Host", "API.example")],
                 client("198.51.100.7", "127.0.0.1", scheme="https", host="API.example"),
                 id="mixed-case-names-and-values"),
    # Malformed X-Forwarded-For from a trusted peer: the peer stays the client.
    pytest.param("127.0.0.1", [("x-forwarded-for", "not-an-ip")], unchanged("127.0.0.1"),
                 id="garbage-xff"),
    pytest.param("127.0.0.1", [("x-forwarded-for", "not-an-ip, 10.0.0.2")],
                 unchanged("127.0.0.1"), id="garbage-hop-behind-trusted-hops"),
    pytest.param("127.0.0.1", [("x-forwarded-for", "")], unchanged("127.0.0.1"), id="empty-xff"),
    # Scheme and host come from the trusted proxy.
    pytest.param("127.0.0.1", [("x-forwarded-proto", "https"), ("x-forwarded-host", "api.example")],
                 Seen(("127.0.0.1", 5000), "https", "api.example", "", "/v1/models",
                      ("127.0.0.1",)), id="proto-and-host-without-xff"),
    pytest.param("127.0.0.1", [("x-forwarded-for", "198.51.100.7"),
                               ("x-forwarded-host", "[2001:db8::1]:8443")],
                 client("198.51.100.7", "127.0.0.1", host="[2001:db8::1]:8443"),
                 id="host-ipv6-with-port"),
    pytest.param("127.0.0.1", [("x-forwarded-for", "198.51.100.7"),
                               ("x-forwarded-proto", "https, http")],
                 client("198.51.100.7", "127.0.0.1"), id="proto-list-nearest-proxy-wins"),
    pytest.param("127.0.0.1", [("x-forwarded-for", "198.51.100.7"), ("x-forwarded-proto", "ftp"),
                               ("x-forwarded-host", "evil.example/x")],
                 client("198.51.100.7", "127.0.0.1"), id="bad-proto-and-host-are-ignored"),
    pytest.param("127.0.0.1", [("x-forwarded-proto", "wss")], unchanged("127.0.0.1"),
                 id="ws-scheme-on-http-scope"),
    # RFC 7239 Forwarded, read when there is no X-Forwarded-For.
    pytest.param("::1", [("forwarded", 'for="[2001:db8::1]:4711";proto=https;host=api.example')],
                 client("2001:db8::1", "::1", scheme="https", host="api.example"),
                 id="forwarded-quoted-ipv6-with-port"),
    pytest.param("127.0.0.1", [("forwarded", "for=198.51.100.7;proto=https, for=10.0.0.2")],
                 client("198.51.100.7", "10.0.0.2", "127.0.0.1", scheme="https"),
                 id="forwarded-two-elements"),
    pytest.param("127.0.0.1", [("forwarded", "for=6.6.6.6;proto=http, for=198.51.100.7;proto=https;"
                                             "host=api.example, for=10.0.0.2;proto=http")],
                 client("198.51.100.7", "10.0.0.2", "127.0.0.1",
                        scheme="https", host="api.example"),
                 id="forwarded-proto-and-host-from-the-clients-element"),
    pytest.param("127.0.0.1", [("forwarded", "for=198.51.100.7"), ("forwarded", "for=10.0.0.2")],
                 client("198.51.100.7", "10.0.0.2", "127.0.0.1"), id="forwarded-two-lines"),
    pytest.param("127.0.0.1", [("forwarded", "For=198.51.100.7;PROTO=HTTPS")],
                 client("198.51.100.7", "127.0.0.1", scheme="https"),
                 id="forwarded-case-insensitive"),
    pytest.param("127.0.0.1", [("forwarded", 'for="198.51.100.7" ; proto="https"')],
                 client("198.51.100.7", "127.0.0.1", scheme="https"), id="forwarded-quoted-values"),
    pytest.param("127.0.0.1", [("forwarded", "for=198.51.100.7, for=unknown;proto=https")],
                 client("unknown", "127.0.0.1", scheme="https"), id="forwarded-unknown-stops-walk"),
    pytest.param("127.0.0.1", [("forwarded", "for=198.51.100.7, for=_hidden, for=10.0.0.2")],
                 client("_hidden", "10.0.0.2", "127.0.0.1"), id="forwarded-obfuscated-stops-walk"),
    pytest.param("127.0.0.1", [("forwarded", 'for="_gazonk:_port"')],
                 client("_gazonk", "127.0.0.1"), id="forwarded-obfuscated-port"),
    pytest.param("127.0.0.1", [("forwarded", "proto=https;host=api.example")],
                 client("unknown", "127.0.0.1", scheme="https", host="api.example"),
                 id="forwarded-without-for-is-unknown"),
    pytest.param("127.0.0.1", [("forwarded", 'for="198.51.100.7')], unchanged("127.0.0.1"),
                 id="forwarded-unbalanced-quote"),
    pytest.param("127.0.0.1", [("forwarded", "for=198.51.100.7;for=203.0.113.1")],
                 unchanged("127.0.0.1"), id="forwarded-duplicate-parameter"),
    pytest.param("127.0.0.1", [("forwarded", 'for="6.6.6.6, for=198.51.100.7;proto="https"')],
                 client("198.51.100.7", "127.0.0.1", scheme="https"),
                 id="forwarded-broken-client-element-cannot-swallow-the-proxys"),
    pytest.param("127.0.0.1", [("forwarded", "for=6.6.6.6;proto=https;host=evil.example"),
                               ("x-forwarded-for", "198.51.100.7")],
                 client("198.51.100.7", "127.0.0.1"), id="xff-wins-over-forwarded"),
    # Prefixes (the rest of the rules are in the prefix table below).
    pytest.param("127.0.0.1", [("x-forwarded-prefix", "/llm/")],
                 Seen(("127.0.0.1", 5000), "http", "gw.example", "/llm", "/llm/v1/models",
                      ("127.0.0.1",)), id="trusted-prefix"),
    pytest.param("203.0.113.9", [("x-forwarded-prefix", "/llm")], unchanged("203.0.113.9"),
                 id="untrusted-prefix"),
]
# fmt: on


@pytest.mark.parametrize(("peer", "headers", "expected"), TRUST_CASES)
async def test_client_scheme_and_host_come_only_from_trusted_proxies(
    peer: str, headers: list[tuple[str, str]], expected: Seen
) -> None:
    assert seen(await forward(make_scope(peer, headers))) == expected


async def test_spoofed_forwarded_for_from_untrusted_peer_is_ignored() -> None:
    stats = ForwardedStats()
    scope = await forward(make_scope("203.0.113.9", [("x-forwarded-for", "10.0.0.1")]), stats=stats)
    assert scope["client"] == ("203.0.113.9", 5000)
    assert stats.untrusted == 1


@pytest.mark.parametrize("peer", ["127.0.0.1", "203.0.113.9", None])
async def test_forwarded_headers_are_always_removed(peer: str | None) -> None:
    headers = [(name.upper(), "198.51.100.7") for name in FORWARDED_HEADERS]
    headers.append(("user-agent", "openai-python"))
    scope = await forward(make_scope(peer, headers))
    assert [name for name, _ in scope["headers"]] == [b"host", b"user-agent"]


async def test_headers_are_left_alone_when_there_is_nothing_to_remove() -> None:
    scope = make_scope("203.0.113.9", [("user-agent", "openai-python")])
    headers = scope["headers"]
    assert (await forward(scope))["headers"] is headers


async def test_forwarded_host_is_added_to_a_request_without_host() -> None:
    scope = make_scope("127.0.0.1", [("x-forwarded-host", "api.example")])
    scope["headers"] = scope["headers"][1:]
    assert host_header(await forward(scope)) == "api.example"


async def test_a_missing_client_is_untrusted_and_does_not_crash() -> None:
    scope = await forward(make_scope(None, [("x-forwarded-for", "198.51.100.7")]))
    assert scope["client"] is None
    assert forwarded_for(scope) == ()


@pytest.mark.parametrize(
    ("proto", "scheme"),
    [("https", "wss"), ("http", "ws"), ("WSS", "wss"), ("ws", "ws"), ("ftp", "ws")],
)
async def test_websocket_scheme_is_ws_or_wss(proto: str, scheme: str) -> None:
    headers = [("x-forwarded-proto", proto)]
    scope = await forward(make_scope("127.0.0.1", headers, kind="websocket"))
    assert scope["scheme"] == scheme


async def test_lifespan_passes_through_untouched() -> None:
    seen: list[tuple[Scope, object, object]] = []

    async def app(scope: Scope, receive: object, send: object) -> None:
        seen.append((scope, receive, send))

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        pass

    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    await ForwardedMiddleware(app, trusted())(scope, receive, send)
    assert seen == [(scope, receive, send)]
    assert scope == {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}


# fmt: off
PREFIX_CASES = [
    # configured root_path, server's root_path, path received, X-Forwarded-Prefix -> root, path
    pytest.param("", "", "/v1/models", None, "", "/v1/models", id="no-prefix"),
    pytest.param("/llm", "", "/v1/models", None, "/llm", "/llm/v1/models",
                 id="nginx-replaced-prefix-is-prepended"),
    pytest.param("/llm", "", "/llm/v1/models", None, "/llm", "/llm/v1/models",
                 id="nginx-kept-prefix-is-not-doubled"),
    pytest.param("/llm", "", "/llm", None, "/llm", "/llm", id="kept-prefix-alone"),
    pytest.param("/llm", "", "/llmx/v1/models", None, "/llm", "/llm/llmx/v1/models",
                 id="prefix-matches-whole-segments-only"),
    pytest.param("/teams/ml/llm", "", "/v1/models", None, "/teams/ml/llm",
                 "/teams/ml/llm/v1/models", id="multi-segment-stripped"),
    pytest.param("/teams/ml/llm", "", "/teams/ml/llm/v1/models", None, "/teams/ml/llm",
                 "/teams/ml/llm/v1/models", id="multi-segment-kept"),
    pytest.param("", "", "/v1/models", "/teams/ml/llm", "/teams/ml/llm",
                 "/teams/ml/llm/v1/models", id="traefik-strip-prefix-multi-segment"),
    pytest.param("", "", "/v1/models", "/llm/", "/llm", "/llm/v1/models",
                 id="forwarded-prefix-trailing-slash"),
    pytest.param("", "", "/v1/models", "/", "", "/v1/models", id="forwarded-prefix-root"),
    pytest.param("/llm", "", "/v1/models", "/teams", "/llm/teams", "/llm/teams/v1/models",
                 id="configured-root-plus-forwarded-prefix"),
    pytest.param("", "/llm", "/llm/v1/models", None, "/llm", "/llm/v1/models",
                 id="uvicorn-root-path-alone"),
    pytest.param("/llm", "/llm", "/llm/v1/models", None, "/llm", "/llm/v1/models",
                 id="uvicorn-and-configured-root-path-not-doubled"),
    pytest.param("/llm", "/llm", "/llm/llm/v1/models", None, "/llm", "/llm/v1/models",
                 id="uvicorn-root-path-and-kept-prefix-not-doubled"),
    pytest.param("", "/llm", "/v1/models", None, "/llm", "/llm/v1/models",
                 id="server-root-path-not-in-path"),
    pytest.param("", "/llm", "/v1/models", "/teams", "/llm/teams", "/llm/teams/v1/models",
                 id="uvicorn-root-path-plus-forwarded-prefix"),
]
# fmt: on


@pytest.mark.parametrize(
    ("configured", "server_root", "path", "prefix", "root_path", "full_path"), PREFIX_CASES
)
async def test_root_path_is_the_prefix_and_path_includes_it_once(
    configured: str,
    server_root: str,
    path: str,
    prefix: str | None,
    root_path: str,
    full_path: str,
) -> None:
    headers = [] if prefix is None else [("x-forwarded-prefix", prefix)]
    scope = make_scope("127.0.0.1", headers, path=path, root_path=server_root)
    scope = await forward(scope, root_path=configured)
    assert (scope["root_path"], scope["path"]) == (root_path, full_path)
    # The raw path carries the prefix exactly when the path does (the relay routes on it).
    assert scope["raw_path"] == full_path.encode()


@pytest.mark.parametrize(
    ("configured", "server_root", "path", "prefix", "root_path", "full_path"),
    # A request for the bare prefix has an empty route path, which Starlette redirects.
    [case for case in PREFIX_CASES if case.values[4] != case.values[5]],
)
async def test_starlette_routes_the_path_below_the_prefix_and_builds_the_public_url(
    configured: str,
    server_root: str,
    path: str,
    prefix: str | None,
    root_path: str,
    full_path: str,
) -> None:
    async def echo(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"{request.path_params['rest']} {request.url}")

    app = Starlette(routes=[Route("/{rest:path}", echo)])
    headers = [("x-forwarded-proto", "https"), ("x-forwarded-host", "api.example")]
    if prefix is not None:
        headers.append(("x-forwarded-prefix", prefix))
    scope = make_scope("::1", headers, path=path, root_path=server_root)
    body = await get(ForwardedMiddleware(app, trusted(), configured), scope)
    assert body == f"{full_path[len(root_path) + 1 :]} https://api.example{full_path}"


async def get(app: ASGIApp, scope: Scope) -> str:
    scope["method"] = "GET"
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert sent[0]["status"] == 200
    return b"".join(m.get("body", b"") for m in sent[1:]).decode()


# fmt: off
MALFORMED_CASES = [
    pytest.param([("x-forwarded-for", "999.1.1.1")], "for", id="xff-bad-ip"),
    pytest.param([("x-forwarded-for", "198.51.100.7:99999999")], "for", id="xff-bad-port"),
    pytest.param([("x-forwarded-for", "[2001:db8::1")], "for", id="xff-unclosed-bracket"),
    pytest.param([("x-forwarded-for", "\x00\xff")], "for", id="xff-binary"),
    pytest.param([("x-forwarded-for", "10.0.0.1, " * 600)], "too_long", id="xff-too-long"),
    pytest.param([("x-forwarded-for", "10.0.0.1," * 65)], "too_many_hops", id="xff-too-many-hops"),
    pytest.param([("forwarded", "for")], "forwarded", id="forwarded-no-value"),
    pytest.param([("forwarded", "for=198.51.100.7 proto=https")], "forwarded",
                 id="forwarded-missing-semicolon"),
    pytest.param([("forwarded", "for=[2001:db8::1")], "forwarded", id="forwarded-bad-ipv6"),
    pytest.param([("forwarded", "for=" + "1" * 5000)], "too_long", id="forwarded-too-long"),
    pytest.param([("x-forwarded-proto", "javascript")], "proto", id="bad-proto"),
    pytest.param([("x-forwarded-proto", "")], "proto", id="empty-proto"),
    pytest.param([("x-forwarded-host", "evil.example/path")], "host", id="host-with-path"),
    pytest.param([("x-forwarded-host", "a b")], "host", id="host-with-space"),
    pytest.param([("x-forwarded-host", "api.example:70000")], "host", id="host-port-out-of-range"),
    pytest.param([("x-forwarded-host", "x" * 5000)], "host", id="host-too-long"),
    pytest.param([("x-forwarded-host", 'a"b')], "host", id="host-with-quote"),
    pytest.param([("x-forwarded-prefix", "llm")], "prefix", id="prefix-relative"),
    pytest.param([("x-forwarded-prefix", "/a/../admin")], "prefix", id="prefix-dot-dot"),
    pytest.param([("x-forwarded-prefix", "//evil.example")], "prefix", id="prefix-double-slash"),
    pytest.param([("x-forwarded-prefix", "/a/./b")], "prefix", id="prefix-dot-segment"),
    pytest.param([("x-forwarded-prefix", "/a%2fb")], "prefix", id="prefix-percent-encoded"),
    pytest.param([("x-forwarded-prefix", "/a\r\nb")], "prefix", id="prefix-control-chars"),
    pytest.param([("x-forwarded-prefix", "/" + "a" * 5000)], "prefix", id="prefix-too-long"),
]
# fmt: on


@pytest.mark.parametrize(("headers", "reason"), MALFORMED_CASES)
async def test_malformed_values_are_ignored_and_counted(
    headers: list[tuple[str, str]], reason: str
) -> None:
    stats = ForwardedStats()
    scope = await forward(make_scope("127.0.0.1", headers), stats=stats)
    assert seen(scope)[:2] == (("127.0.0.1", 5000), "http")
    assert host_header(scope) == "gw.example"
    assert (scope["root_path"], scope["path"]) == ("", "/v1/models")
    assert {r: n for r, n in stats.malformed.items() if n} == {reason: 1}


async def test_padding_forwarded_for_cannot_make_a_client_look_like_the_proxy() -> None:
    # The client pads X-Forwarded-For past both limits; its proxy appends the real address.
    stats = ForwardedStats()
    padding = "127.0.0.1, " * 1000
    scope = await forward(
        make_scope("127.0.0.1", [("x-forwarded-for", padding + "198.51.100.7")]), stats=stats
    )
    assert scope["client"] == ("198.51.100.7", 0)
    assert stats.malformed["too_long"] == 1


async def test_a_chain_of_trusted_hops_longer_than_the_limit_falls_back_to_the_peer() -> None:
    scope = await forward(
        make_scope("127.0.0.1", [("x-forwarded-for", ", ".join(["10.0.0.1"] * 65))])
    )
    assert scope["client"] == ("127.0.0.1", 5000)
    assert forwarded_for(scope) == ("127.0.0.1",)


def test_stats_start_at_zero_for_every_reason() -> None:
    stats = ForwardedStats()
    assert stats.malformed == dict.fromkeys(REASONS, 0)
    assert stats.untrusted == 0


def test_middleware_makes_its_own_stats() -> None:
    async def app(scope: Scope, receive: object, send: object) -> None:
        pass

    assert ForwardedMiddleware(app, trusted()).stats.untrusted == 0


async def test_random_input_never_raises() -> None:
    alphabet = 'abcXYZ019:.,;=[]"\\_ \t/%-\x00\x7f\xff'
    rng = random.Random(7239)
    stats = ForwardedStats()
    for _ in range(2000):
        headers = [
            (name, "".join(rng.choices(alphabet, k=rng.randrange(40))))
            for name in rng.sample(FORWARDED_HEADERS, 3)
        ]
        for peer in ("127.0.0.1", "203.0.113.9"):
            scope = await forward(make_scope(peer, headers), stats=stats)
            assert isinstance(forwarded_for(scope), tuple)
            assert scope["path"].endswith("/v1/models")
    assert sum(stats.malformed.values()) > 0


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.255.255.254", True),
        ("10.1.2.3", True),
        ("11.0.0.1", False),
        ("::1", True),
        ("::2", False),
        ("::ffff:127.0.0.1", True),
        ("::ffff:11.0.0.1", False),
        ("fe80::1%eth0", True),
        ("fe80::1%", False),
        ("[::1]", True),
        ("127.0.0.1:8000", True),
        ("localhost", False),
        ("unknown", False),
        ("", False),
        ("1" * 200, False),
        (None, False),
    ],
)
def test_trusted_proxies_membership(host: str | None, expected: bool) -> None:
    assert (host in trusted()) is expected


def test_address_cache_stays_bounded() -> None:
    proxies = trusted()
    for i in range(10_000):
        assert f"198.51.{i // 256}.{i % 256}" not in proxies
    assert len(proxies._cache) <= 4096


def test_nothing_is_trusted_without_networks() -> None:
    assert "127.0.0.1" not in TrustedProxies([])


def test_root_path_must_be_absolute() -> None:
    async def app(scope: Scope, receive: object, send: object) -> None:
        pass

    with pytest.raises(ValueError, match="must start with '/'"):
        ForwardedMiddleware(app, trusted(), "llm")
