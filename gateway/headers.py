"""Which headers cross the gateway, in each direction (RFC 9110 §7.6.1, DESIGN §3).

The order matters: hop-by-hop headers (the fixed list plus every name the ``Connection`` header
lists) are stripped first and the gateway's own headers are added afterwards, so a client's
``Connection: x-forwarded-for`` cannot delete a header the gateway sets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from gateway.types import RawHeaders

# RFC 9110 §7.6.1 and the legacy ones every proxy strips (Proxy-Connection, Keep-Alive).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

# Never forwarded upstream: the inbound authority (the upstream's own is used), the framing the
# client used (we send the body we hold), the client's credentials for the gateway (DESIGN §3),
# and forwarded headers, which the forwarded middleware consumed and the gateway rebuilds.
_NOT_UPSTREAM = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"authorization",
    b"x-api-key",
    b"api-key",
    b"accept-encoding",
    b"forwarded",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-forwarded-port",
    b"x-forwarded-prefix",
    b"x-forwarded-server",
    b"x-real-ip",
}

# The server frames the response it sends (chunked or not); the upstream's framing is its own.
_NOT_DOWNSTREAM = HOP_BY_HOP | {b"content-length"}


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def upstream_request_headers(
    inbound: RawHeaders,
    added: Sequence[tuple[str, str]],
    forwarded_for: str | None,
    replaced: frozenset[bytes] = frozenset(),
) -> list[tuple[str, str]]:
    """Headers for the outbound request: the client's end-to-end headers, then ours.

    ``Accept-Encoding`` passes through as the client sent it and becomes ``identity`` when it
    sent none, so the HTTP client adds no gzip of its own and the relay never has to decode.
    """
    # ``replaced``: the names the gateway sets itself for this upstream (its static headers),
    # which a client's own value must not shadow or duplicate.
    dropped = _NOT_UPSTREAM | _connection_tokens(inbound) | replaced
    out: list[tuple[str, str]] = []
    accept_encoding = "identity"
    for name, value in inbound:
        if name == b"accept-encoding":
            accept_encoding = value.decode("latin-1")
        elif name not in dropped:
            out.append((name.decode("latin-1"), value.decode("latin-1")))
    out.append(("accept-encoding", accept_encoding))
    if forwarded_for is not None:
        out.append(("x-forwarded-for", forwarded_for))
    out.extend(added)
    return out


def downstream_response_headers(
    upstream: Iterable[tuple[bytes, bytes]],
    added: Sequence[tuple[bytes, bytes]],
    drop: frozenset[bytes] = frozenset(),
) -> tuple[RawHeaders, bool]:
    """Headers for the client, and whether the body is an event stream.

    Names are lower-cased as ASGI requires; values pass unchanged, ``Content-Encoding``
    included: the relay forwards the bytes as the upstream encoded them.
    """
    upstream = list(upstream)
    dropped = _NOT_DOWNSTREAM | _connection_tokens(upstream) | drop
    out: RawHeaders = []
    event_stream = False
    has_cache_control = False
    for raw_name, value in upstream:
        name = raw_name.lower()
        if name in dropped:
            continue
        if name == b"content-type":
            event_stream = value[:17].lower() == b"text/event-stream"
        elif name == b"cache-control":
            has_cache_control = True
        out.append((name, value))
    if event_stream:
        # Nginx buffers proxied responses unless told otherwise; an SSE stream must not wait.
        out.append((b"x-accel-buffering", b"no"))
        if not has_cache_control:
            out.append((b"cache-control", b"no-cache"))
    out.extend(added)
    return out, event_stream
