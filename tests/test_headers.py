"""Which headers cross the gateway (RFC 9110 §7.6.1, DESIGN §3)."""

from __future__ import annotations

from gateway.headers import downstream_response_headers, upstream_request_headers


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


def test_accept_encoding_passes_through_or_is_identity() -> None:
    assert ("accept-encoding", "gzip, br") in upstream_request_headers(
        [(b"accept-encoding", b"gzip, br")], [], None
    )
    assert ("accept-encoding", "identity") in upstream_request_headers([], [], None)


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
