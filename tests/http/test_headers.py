"""Which headers cross the gateway (RFC 9110 §7.6.1, docs/design.md §3)."""

from __future__ import annotations

import pytest

from gateway.http.headers import (
    MASK,
    downstream_response_headers,
    mask_secrets,
    upstream_request_headers,
)


def test_hop_by_hop_and_connection_named_headers_are_not_forwarded_upstream() -> None:
    inbound = [
        (b"connection", b"keep-alive, x-secret-hop"),
        (b"keep-alive", b"timeout=5"),
        (b"te", b"trailers"),
        (b"upgrade", b"h2c"),
        (b"proxy-authorization", b"Basic abc"),
        (b"x-secret-hop", b"1"),
        (b"x-stainless-lang", b"python"),
    ]
    out = upstream_request_headers(inbound, [], None)
    assert out == [("x-stainless-lang", "python"), ("accept-encoding", "identity")]


def test_client_credentials_and_host_never_reach_the_upstream() -> None:
    inbound = [
        (b"host", b"gateway.example"),
        (b"authorization", b"Bearer sk-gw-client"),
        (b"x-api-key", b"sk-gw-client"),
        (b"api-key", b"sk-gw-client"),
        (b"content-type", b"application/json"),
    ]
    out = upstream_request_headers(inbound, [("authorization", "Bearer sk-upstream")], None)
    assert out == [
        ("content-type", "application/json"),
        ("accept-encoding", "identity"),
        ("authorization", "Bearer sk-upstream"),
    ]


def test_connection_header_cannot_remove_headers_the_gateway_adds() -> None:
    inbound = [(b"connection", b"x-forwarded-for, authorization")]
    out = upstream_request_headers(inbound, [("authorization", "Bearer up")], "203.0.113.7")
    assert ("x-forwarded-for", "203.0.113.7") in out
    assert ("authorization", "Bearer up") in out


@pytest.mark.parametrize(
    ("offered", "asked"),
    [
        (b"gzip, deflate", "gzip, deflate"),
        (b"gzip, br", "gzip"),
        (b"gzip, deflate, br, zstd", "gzip, deflate"),
        (b"br;q=1.0, gzip;q=0.8, *;q=0.1", "gzip;q=0.8"),
        (b"x-gzip, identity;q=0.5", "x-gzip, identity;q=0.5"),
        (b"GZip ;q=0.5", "GZip ;q=0.5"),
        (b"br", "identity"),
        (b"*", "identity"),
        (b"", "identity"),
    ],
)
def test_accept_encoding_is_narrowed_to_the_codings_the_gateway_can_inflate(
    offered: bytes, asked: str
) -> None:
    # RFC 9110 §12.5.3; the gateway must be able to read a copy of every body (usage, secrets).
    out = upstream_request_headers([(b"accept-encoding", offered)], [], None)
    assert out == [("accept-encoding", asked)]


def test_accept_encoding_is_identity_when_the_client_sends_none() -> None:
    assert upstream_request_headers([], [], None) == [("accept-encoding", "identity")]


def test_accept_encoding_in_several_lines_is_one_list() -> None:
    inbound = [(b"accept-encoding", b"br"), (b"accept-encoding", b"gzip")]
    assert upstream_request_headers(inbound, [], None) == [("accept-encoding", "gzip")]


def test_inbound_forwarded_headers_are_never_forwarded_verbatim() -> None:
    inbound = [(b"x-forwarded-for", b"6.6.6.6"), (b"forwarded", b"for=6.6.6.6")]
    assert upstream_request_headers(inbound, [], None) == [("accept-encoding", "identity")]


def test_response_framing_and_hop_by_hop_headers_are_dropped_encoding_kept() -> None:
    upstream = [
        (b"Content-Type", b"application/json"),
        (b"Content-Length", b"10"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Connection", b"keep-alive, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Content-Encoding", b"gzip"),
        (b"x-request-id", b"req_1"),
    ]
    headers, event_stream = downstream_response_headers(upstream, [(b"deprecation", b"@0")])
    assert headers == [
        (b"content-type", b"application/json"),
        (b"content-encoding", b"gzip"),
        (b"x-request-id", b"req_1"),
        (b"deprecation", b"@0"),
    ]
    assert not event_stream


def test_event_streams_get_no_buffering_and_no_cache() -> None:
    headers, event_stream = downstream_response_headers(
        [(b"content-type", b"text/event-stream; charset=utf-8")], []
    )
    assert event_stream
    assert (b"x-accel-buffering", b"no") in headers
    assert (b"cache-control", b"no-cache") in headers


def test_upstream_cache_control_on_event_stream_is_kept_not_duplicated() -> None:
    headers, _ = downstream_response_headers(
        [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-store")], []
    )
    assert [v for n, v in headers if n == b"cache-control"] == [b"no-store"]


# The upstream's secrets never reach a client in a header.

KEY = b"sk-upstream-0123456789"
ORG = b"org-token-42"


def test_upstream_key_echoed_in_any_response_header_is_masked() -> None:
    upstream = [
        (
            b"WWW-Authenticate",
            b'Bearer error="invalid_token", error_description="Bearer ' + KEY + b'"',
        ),
        (b"x-debug", KEY + b"," + ORG + b"," + KEY),
        (b"x-request-id", b"req_1"),
    ]
    headers, _ = downstream_response_headers(upstream, [(b"x-added", KEY)], secrets=(KEY, ORG))
    assert headers == [
        (b"www-authenticate", b'Bearer error="invalid_token", error_description="Bearer ***"'),
        (b"x-debug", b"***,***,***"),
        (b"x-request-id", b"req_1"),
        # The gateway's own headers are not the upstream's to leak: they pass as given.
        (b"x-added", KEY),
    ]


def test_response_headers_without_a_secret_pass_unchanged() -> None:
    upstream = [(b"content-type", b"application/json"), (b"x-request-id", b"req_1")]
    headers, _ = downstream_response_headers(upstream, [], secrets=(KEY,))
    assert headers == upstream
    assert all(a[1] is b[1] for a, b in zip(headers, upstream, strict=True))


def test_a_secret_is_replaced_by_a_fixed_mask_revealing_neither_length_nor_prefix() -> None:
    assert mask_secrets(b"a " + KEY + b" b " + ORG, (KEY, ORG)) == b"a " + MASK + b" b " + MASK
    assert MASK == b"***"


def test_masking_returns_the_same_object_when_there_is_nothing_to_mask() -> None:
    data = b'{"error": {"message": "nothing secret"}}'
    assert mask_secrets(data, (KEY, ORG)) is data
