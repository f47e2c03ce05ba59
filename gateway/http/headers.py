"""Which headers cross the gateway, in each direction (RFC 9110 §7.6.1, docs/design.md §3).

The order matters: hop-by-hop headers (the fixed list plus every name the ``Connection`` header
lists) are stripped first and the gateway's own headers are added afterwards, so a client's
``Connection: x-forwarded-for`` cannot delete a header the gateway sets.

Two rules keep the upstream's credentials from its clients: every relayed response header value
has the upstream's configured secrets masked (an upstream may quote the ``Authorization`` it
received, in ``WWW-Authenticate`` for instance), and the upstream is asked only for content
codings the gateway can inflate, so that it can read a copy of any body it relays (error bodies
to mask, usage to count).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from gateway.http.forwarded import FORWARDED_HEADERS
from gateway.http.request_id import REQUEST_ID
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
# client used (we send the body we hold), the client's credentials for the gateway
# (docs/design.md §3), and forwarded headers, which the forwarded middleware consumed and the
# gateway rebuilds, and the client's request id (the gateway sends its own, http/request_id.py).
_NOT_UPSTREAM = (
    HOP_BY_HOP
    | {
        b"host",
        b"content-length",
        b"expect",
        b"authorization",
        b"x-api-key",
        b"api-key",
        b"accept-encoding",
        REQUEST_ID,
    }
    | FORWARDED_HEADERS
)

# The server frames the response it sends; the upstream's Content-Length is kept only when the
# relay sends the upstream's bytes unchanged (``keep_length``).
_NOT_DOWNSTREAM = HOP_BY_HOP | {b"content-length"}
_CONTENT_LENGTH = b"content-length"

# The content codings zlib inflates (RFC 9110 §8.4.1: x-gzip is gzip): the one list the usage
# tap, the error-body masking and the model-list rewrite read. The upstream is offered no
# others, whatever the client accepts.
INFLATABLE_CODINGS = frozenset({b"gzip", b"x-gzip", b"deflate"})
_INSPECTABLE_CODINGS = INFLATABLE_CODINGS | {b"identity"}
# What clients send most (httpx and so the openai SDK: "gzip, deflate"), known to need no
# narrowing: one set lookup instead of parsing the list on every request.
_INSPECTABLE_AS_SENT = frozenset(
    {b"gzip, deflate", b"gzip,deflate", b"deflate, gzip", b"gzip", b"deflate", b"identity"}
)

# What replaces a secret: fixed, so that neither its length nor any part of it shows.
MASK = b"***"


def mask_secrets(data: bytes, secrets: Sequence[bytes]) -> bytes:
    """``data`` with every occurrence of each secret replaced by ``MASK``; ``data`` itself (the
    same object) when none occurs. ``secrets`` longest first, so a secret containing another is
    masked whole."""
    for secret in secrets:
        if secret in data:
            data = data.replace(secret, MASK)
    return data


def inspectable_accept_encoding(value: bytes) -> bytes:
    """The client's ``Accept-Encoding`` (RFC 9110 §12.5.3) narrowed to the codings the gateway
    can inflate, each element (q-value included) as the client wrote it; ``identity`` when none
    remain. ``*`` is dropped too: it would let the upstream choose br or zstd."""
    if value in _INSPECTABLE_AS_SENT:
        return value
    kept = [
        element.strip()
        for element in value.split(b",")
        if element.split(b";", 1)[0].strip().lower() in _INSPECTABLE_CODINGS
    ]
    return b", ".join(kept) if kept else b"identity"


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
    request_id: str | None = None,
) -> list[tuple[str, str]]:
    """Headers for the outbound request: the client's end-to-end headers, then ours.

    ``Accept-Encoding`` is the client's, narrowed to the codings the gateway can inflate
    (``gzip``, ``x-gzip``, ``deflate``, ``identity``, with their q-values), and ``identity``
    when none remain or the client sent none. The response's bytes still reach the client as
    the upstream encoded them; the gateway only reads a copy, and the HTTP client adds no
    gzip of its own.

    ``X-Request-ID`` is the gateway's ``request_id`` (the client's own when it was valid),
    unless the upstream's configured headers set one.
    """
    # ``replaced``: the names the gateway sets itself for this upstream (its static headers),
    # which a client's own value must not shadow or duplicate.
    dropped = _NOT_UPSTREAM | _connection_tokens(inbound) | replaced
    out: list[tuple[str, str]] = []
    accept_encoding: bytes | None = None
    for name, value in inbound:
        if name == b"accept-encoding":
            # A list header may come in several lines (RFC 9110 §5.3): they are one list.
            accept_encoding = value if accept_encoding is None else accept_encoding + b"," + value
        elif name not in dropped:
            out.append((name.decode("latin-1"), value.decode("latin-1")))
    offered = (
        b"identity" if accept_encoding is None else inspectable_accept_encoding(accept_encoding)
    )
    out.append(("accept-encoding", offered.decode("latin-1")))
    if forwarded_for is not None:
        out.append(("x-forwarded-for", forwarded_for))
    if request_id is not None and REQUEST_ID not in replaced:
        out.append(("x-request-id", request_id))
    out.extend(added)
    return out


def downstream_response_headers(
    upstream: Iterable[tuple[bytes, bytes]],
    added: Sequence[tuple[bytes, bytes]],
    drop: frozenset[bytes] = frozenset(),
    secrets: Sequence[bytes] = (),
    *,
    keep_length: bool = False,
) -> tuple[RawHeaders, bool]:
    """Headers for the client, and whether the body is an event stream.

    Names are lower-cased as ASGI requires; values pass unchanged, ``Content-Encoding``
    included (the relay forwards the bytes as the upstream encoded them), except that every
    occurrence of one of the upstream's ``secrets`` is masked, whatever the status.

    With ``keep_length`` (the body goes out byte for byte as it came) the upstream's
    ``Content-Length`` is kept (RFC 9110 §8.6), so a client sees a body cut short as an error,
    as it would directly; the server then frames the response by it instead of chunking. A
    length that does not frame the message alone (several, or beside ``Transfer-Encoding``,
    RFC 9112 §6.3) is dropped; the upstream's parser refuses those in any case.
    """
    upstream = list(upstream)
    dropped = _NOT_DOWNSTREAM | _connection_tokens(upstream) | drop
    out: RawHeaders = []
    event_stream = False
    has_cache_control = False
    length: bytes | None = None
    lengths = 0
    chunked = False
    for raw_name, value in upstream:
        name = raw_name.lower()
        if name in dropped:
            if name == _CONTENT_LENGTH:
                length = value
                lengths += 1
            elif name == b"transfer-encoding":
                chunked = True
            continue
        if name == b"content-type":
            event_stream = value[:17].lower() == b"text/event-stream"
        elif name == b"cache-control":
            has_cache_control = True
        out.append((name, value))
    if secrets:
        # The common path costs one join and one substring search per secret (about 1 µs for
        # 20 headers); only an upstream that quotes a credential pays for masking.
        values = b"\n".join([value for _, value in out])
        for secret in secrets:
            if secret in values:
                out = [(name, mask_secrets(value, secrets)) for name, value in out]
                break
    if keep_length and lengths == 1 and not chunked and length is not None and length.isdigit():
        out.append((_CONTENT_LENGTH, length))
    if event_stream:
        # Nginx buffers proxied responses unless told otherwise; an SSE stream must not wait.
        out.append((b"x-accel-buffering", b"no"))
        if not has_cache_control:
            out.append((b"cache-control", b"no-cache"))
    out.extend(added)
    return out, event_stream
