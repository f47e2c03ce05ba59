"""The relay, end to end: a real gateway process in front of a real fake upstream.

Bytes are compared with what the upstream sends directly; timing tests read the stream the way
a client does and check events are not held back.
"""

from __future__ import annotations

import gzip
import itertools
import socket
import statistics
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import DEMO_KEY, NARROW_KEY, UPSTREAM_KEY, gateway_config
from tests.support.fakeupstream import FakeUpstream, standard_chat_request
from tests.support.gatewayproc import GatewayProcess

AUTH = {"authorization": f"Bearer {DEMO_KEY}"}


def post(url: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        url,
        content=orjson.dumps(body),
        headers={"content-type": "application/json", **AUTH, **(headers or {})},
        timeout=10,
    )


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


def test_non_stream_body_and_headers_equal_direct(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    request = standard_chat_request()
    direct = post(f"{upstream.base_url}/chat/completions", request)
    via = post(f"{gateway.url}/v1/chat/completions", request)
    assert via.status_code == direct.status_code == 200
    assert via.content == direct.content
    for name in ("content-type", "openai-organization", "openai-version", "openai-processing-ms"):
        assert via.headers[name] == direct.headers[name]
    assert via.headers["x-request-id"].startswith("req_fake_")
    assert "x-gateway-request-id" in via.headers


def test_stream_bytes_equal_direct(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    request = standard_chat_request(stream=True, include_usage=True)
    direct = post(f"{upstream.base_url}/chat/completions", request)
    via = post(f"{gateway.url}/v1/chat/completions", request)
    assert via.content == direct.content
    assert via.headers["content-type"].startswith("text/event-stream")
    assert via.headers["x-accel-buffering"] == "no"
    assert via.headers["cache-control"] == "no-cache"


def test_sse_events_flushed_as_they_arrive(gateway: GatewayProcess) -> None:
    """Each event reaches the client when the upstream emits it (100 ms apart), not batched."""
    arrivals: list[float] = []
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        content=orjson.dumps(standard_chat_request(stream=True)),
        headers={
            **AUTH,
            "content-type": "application/json",
            "x-fake-chunks": "5",
            "x-fake-interval-ms": "100",
        },
        timeout=10,
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(arrivals) == 7  # 5 pieces, the finish chunk, [DONE]
    # The upstream waits 100 ms between events; a gateway that batched would show ~0 gaps. One
    # event delivered late on a loaded machine shortens the gap after it, not the typical one.
    assert min(gaps) > 0.03, gaps
    assert statistics.median(gaps) > 0.07, gaps


def test_gzip_body_relayed_still_encoded(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    request = standard_chat_request()
    headers = {"accept-encoding": "gzip", "x-fake-gzip": "1"}
    direct = post(f"{upstream.base_url}/chat/completions", request, headers)
    with httpx.Client(timeout=10) as client:
        via = client.send(
            client.build_request(
                "POST",
                f"{gateway.url}/v1/chat/completions",
                content=orjson.dumps(request),
                headers={**AUTH, "content-type": "application/json", **headers},
            ),
            stream=True,
        )
        raw = b"".join(via.iter_raw())
        via.close()
    assert via.headers["content-encoding"] == "gzip"
    assert gzip.decompress(raw) == direct.content
    assert upstream.last().header("accept-encoding") == "gzip"


def test_accept_encoding_identity_when_client_sends_none(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    with httpx.Client(timeout=10) as client:
        request = client.build_request("GET", f"{gateway.url}/v1/models", headers=AUTH)
        del request.headers["accept-encoding"]
        assert client.send(request).status_code == 200
    assert upstream.last().header("accept-encoding") == "identity"


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503])
def test_upstream_errors_pass_through_unchanged(
    gateway: GatewayProcess, upstream: FakeUpstream, status: int
) -> None:
    request = standard_chat_request()
    headers = {"x-fake-status": str(status)}
    direct = post(f"{upstream.base_url}/chat/completions", request, headers)
    via = post(f"{gateway.url}/v1/chat/completions", request, headers)
    assert via.status_code == direct.status_code == status
    assert via.content == direct.content
    if status == 429:
        assert via.headers["retry-after"] == "0"


def test_client_credentials_never_reach_upstream_and_upstream_key_never_reaches_client(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    via = post(
        f"{gateway.url}/v1/echo",
        {"x": 1},
        {"x-api-key": DEMO_KEY, "api-key": DEMO_KEY},
    )
    assert via.status_code == 200
    seen = upstream.last()
    assert seen.header("authorization") == f"Bearer {UPSTREAM_KEY}"
    assert seen.header("x-api-key") is None
    assert seen.header("api-key") is None
    assert DEMO_KEY not in str(seen.headers)
    assert UPSTREAM_KEY not in str(dict(via.headers))
    # The upstream's own authority, not the gateway's.
    assert seen.header("host") == upstream.url.removeprefix("http://")
    assert UPSTREAM_KEY not in gateway.logs()
    assert DEMO_KEY not in gateway.logs()


def test_hop_by_hop_headers_removed_before_gateway_adds_its_own(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    post(
        f"{gateway.url}/v1/echo",
        {},
        {
            "connection": "x-custom-hop, authorization",
            "x-custom-hop": "1",
            "te": "trailers",
            "x-end-to-end": "kept",
        },
    )
    seen = upstream.last()
    assert seen.header("x-custom-hop") is None
    assert seen.header("te") is None
    assert seen.header("x-end-to-end") == "kept"
    assert seen.header("authorization") == f"Bearer {UPSTREAM_KEY}"


def test_unaliased_request_bytes_reach_upstream_untouched(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    raw = b'{ "model" : "gpt-fake",\n  "messages": [{"role": "user", "content": "h\\u00e9"}] }'
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        content=raw,
        headers={**AUTH, "content-type": "application/json"},
    )
    assert response.status_code == 200
    assert upstream.last().body == raw


def test_model_alias_rewrites_only_the_model(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    request = {"model": "fast", "messages": [{"role": "user", "content": "hi"}], "n": 1}
    response = post(f"{gateway.url}/v1/chat/completions", request)
    assert response.status_code == 200
    assert upstream.last().json() == {**request, "model": "gpt-4o-mini"}
    assert response.json()["model"] == "gpt-4o-mini"


def test_query_string_forwarded_unchanged(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    response = httpx.get(f"{gateway.url}/v1/echo?a=1&b=%2F&a=2", headers=AUTH)
    assert response.status_code == 200
    assert upstream.last().query_string == "a=1&b=%2F&a=2"
    assert upstream.last().path == "/v1/echo"


def test_deprecated_alias_adds_deprecation_sunset_and_successor(gateway: GatewayProcess) -> None:
    response = post(f"{gateway.url}/openai/v1/chat/completions", standard_chat_request())
    assert response.status_code == 200
    assert response.headers["deprecation"] == "@1767225600"
    assert response.headers["sunset"] == "Wed, 30 Jun 2027 00:00:00 GMT"
    assert response.headers["link"] == '</v1/chat/completions>; rel="successor-version"'
    current = post(f"{gateway.url}/chat/completions", standard_chat_request())
    assert current.status_code == 200
    assert "deprecation" not in current.headers


# Errors the gateway makes itself, in OpenAI's shape.


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "code"),
    [
        ("POST", "/v1/chat/completions", b"{not json", AUTH, 400, "invalid_json"),
        ("POST", "/v1/chat/completions", b"x" * 70000, AUTH, 413, "request_too_large"),
        ("POST", "/nowhere", b"{}", AUTH, 404, "unknown_url"),
        ("PUT", "/v1/chat/completions", b"{}", AUTH, 405, "method_not_allowed"),
        ("POST", "/v1/chat/completions", b"{}", {}, 401, "missing_api_key"),
        (
            "POST",
            "/v1/chat/completions",
            b"{}",
            {"authorization": "Bearer sk-gw-nope"},
            401,
            "invalid_api_key",
        ),
        (
            "POST",
            "/v1/embeddings",
            b'{"model":"fast","input":"x"}',
            {"authorization": f"Bearer {NARROW_KEY}"},
            403,
            "route_not_allowed",
        ),
        (
            "POST",
            "/v1/chat/completions",
            b'{"model":"gpt-fake","messages":[]}',
            {"authorization": f"Bearer {NARROW_KEY}"},
            403,
            "model_not_allowed",
        ),
        ("POST", "/down/chat/completions", b'{"model":"x"}', AUTH, 502, "upstream_unreachable"),
    ],
)
def test_gateway_errors_use_openai_shape_and_status(
    gateway: GatewayProcess,
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    response = httpx.request(
        method,
        f"{gateway.url}{path}",
        content=body,
        headers={"content-type": "application/json", **headers},
        timeout=10,
    )
    assert response.status_code == status
    assert error_of(response)["code"] == code


def test_method_not_allowed_lists_allowed_methods(gateway: GatewayProcess) -> None:
    response = httpx.put(f"{gateway.url}/v1/chat/completions", headers=AUTH)
    assert response.status_code == 405
    assert response.headers["allow"] == "DELETE, GET, POST"


def test_unknown_model_is_404_when_unlisted_models_are_refused(
    strict_gateway: GatewayProcess,
) -> None:
    response = post(f"{strict_gateway.url}/v1/chat/completions", standard_chat_request("nope"))
    assert response.status_code == 404
    error = error_of(response)
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    listed = post(f"{strict_gateway.url}/v1/chat/completions", standard_chat_request("fast"))
    assert listed.status_code == 200


def test_upstream_timeout_before_headers_is_504(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    started = time.monotonic()
    response = post(
        f"{gateway.url}/slow/chat/completions", standard_chat_request(), {"x-fake-hang": "1"}
    )
    assert response.status_code == 504
    assert error_of(response)["code"] == "upstream_timeout"
    assert time.monotonic() - started < 3
    # The gateway hung up on the upstream.
    upstream.wait_for_disconnect(timeout=3)


def test_upstream_failure_mid_stream_is_not_a_clean_end(gateway: GatewayProcess) -> None:
    with (  # noqa: PT012 (the error comes while reading, after the head)
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream(
            "POST",
            f"{gateway.url}/v1/chat/completions",
            content=orjson.dumps(standard_chat_request(stream=True)),
            headers={**AUTH, "content-type": "application/json", "x-fake-fail-after": "2"},
            timeout=10,
        ) as response,
    ):
        assert response.status_code == 200
        for _ in response.iter_raw():
            pass


def test_client_disconnect_closes_upstream_within_a_second(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    upstream.clear()
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        content=orjson.dumps(standard_chat_request(stream=True)),
        headers={**AUTH, "content-type": "application/json", "x-fake-hang-after": "1"},
        timeout=10,
    ) as response:
        next(response.iter_raw())
        closed_at = time.monotonic()
    record = upstream.wait_for_disconnect(timeout=3)
    assert record.disconnected_at is not None
    assert record.disconnected_at - closed_at < 1.0


def test_client_disconnect_before_upstream_headers_cancels_upstream(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    upstream.clear()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{gateway.url}/v1/chat/completions",
            content=orjson.dumps(standard_chat_request()),
            headers={**AUTH, "content-type": "application/json", "x-fake-hang": "1"},
            timeout=0.5,
        )
    # httpx gave up after its timeout and closed the connection; the upstream saw it go.
    upstream.wait_for_disconnect(timeout=3)


def test_large_body_relayed_intact(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    request = standard_chat_request()
    headers = {"x-fake-bytes": "3000000"}
    direct = post(f"{upstream.base_url}/chat/completions", request, headers)
    via = post(f"{gateway.url}/v1/chat/completions", request, headers)
    assert len(via.content) >= 3_000_000
    assert via.content == direct.content


def test_access_log_names_key_route_and_status_without_secrets(gateway: GatewayProcess) -> None:
    post(f"{gateway.url}/v1/chat/completions?secret=q", standard_chat_request())
    time.sleep(0.1)
    lines = [orjson.loads(line) for line in gateway.logs().splitlines() if line.startswith("{")]
    record = lines[-1]
    assert record["route"] == "chat"
    assert record["key"] == "demo"
    assert record["status"] == 200
    assert record["upstream"] == "fake"
    assert "secret=q" not in gateway.logs()


# The other client behind the seam (server.upstream_client: aiohttp) relays the same bytes.


@pytest.fixture(scope="module")
def aiohttp_gateway(upstream: FakeUpstream) -> Iterator[GatewayProcess]:
    config = gateway_config(upstream.base_url).replace(
        "server:\n", "server:\n  upstream_client: aiohttp\n", 1
    )
    with GatewayProcess(config, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as process:
        yield process


@pytest.mark.parametrize("stream", [False, True])
def test_aiohttp_client_relays_the_same_bytes(
    aiohttp_gateway: GatewayProcess, upstream: FakeUpstream, stream: bool
) -> None:
    request = standard_chat_request(stream=stream, include_usage=stream)
    direct = post(f"{upstream.base_url}/chat/completions", request)
    via = post(f"{aiohttp_gateway.url}/v1/chat/completions", request)
    assert via.status_code == 200
    assert via.content == direct.content


def test_aiohttp_client_cuts_a_failed_stream(aiohttp_gateway: GatewayProcess) -> None:
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream(
            "POST",
            f"{aiohttp_gateway.url}/v1/chat/completions",
            content=orjson.dumps(standard_chat_request(stream=True)),
            headers={**AUTH, "content-type": "application/json", "x-fake-fail-after": "2"},
            timeout=10,
        ) as response,
    ):
        for _ in response.iter_raw():
            pass


# Model rules cannot be skipped by how a body is labelled (review: a missing Content-Type).


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/json; charset=utf-8"])
def test_model_rules_apply_whatever_the_body_is_labelled(
    gateway: GatewayProcess, content_type: str | None
) -> None:
    headers = {"authorization": f"Bearer {NARROW_KEY}"}
    if content_type is not None:
        headers["content-type"] = content_type
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        content=orjson.dumps(standard_chat_request("gpt-fake")),
        headers=headers,
    )
    assert response.status_code == 403
    assert error_of(response)["code"] == "model_not_allowed"


def test_a_forms_model_is_checked_like_a_json_bodys(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    upstream.clear()
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        files={"model": (None, "gpt-fake")},
        headers={"authorization": f"Bearer {NARROW_KEY}"},
    )
    assert response.status_code == 403
    assert error_of(response)["code"] == "model_not_allowed"
    assert upstream.requests == []


def test_a_binary_body_is_refused_when_a_model_rule_cannot_read_it(gateway: GatewayProcess) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        content=b'{"model": "gpt-fake"}',
        headers={"authorization": f"Bearer {NARROW_KEY}", "content-type": "audio/wav"},
    )
    assert response.status_code == 415
    assert error_of(response)["code"] == "unsupported_media_type"


FORM_BOUNDARY = "gw-proxy-test"


def form_body(*fields: tuple[str, bytes]) -> bytes:
    parts = [
        f'--{FORM_BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"'.encode()
        + (b'; filename="a.wav"\r\nContent-Type: audio/wav' if name == "file" else b"")
        + b"\r\n\r\n"
        + value
        + b"\r\n"
        for name, value in fields
    ]
    return b"".join(parts) + f"--{FORM_BOUNDARY}--\r\n".encode()


def post_form(url: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        url,
        content=body,
        headers={
            "content-type": f"multipart/form-data; boundary={FORM_BOUNDARY}",
            **AUTH,
            **(headers or {}),
        },
        timeout=10,
    )


AUDIO = b"RIFF" + bytes(range(256)) * 64 + b"\r\n--almost-a-boundary\r\n"


def test_a_renaming_alias_rewrites_only_the_forms_model_bytes(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    body = form_body(("file", AUDIO), ("model", b"fast"), ("language", b"en"))
    response = post_form(f"{gateway.url}/v1/echo", body)
    assert response.status_code == 200
    seen = upstream.last()
    assert seen.body == body.replace(b"\r\n\r\nfast\r\n", b"\r\n\r\ngpt-4o-mini\r\n")
    assert seen.header("content-type") == f"multipart/form-data; boundary={FORM_BOUNDARY}"
    assert seen.header("content-length") == str(len(seen.body))


def test_a_form_whose_model_is_not_renamed_goes_upstream_untouched(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    body = form_body(("model", b"gpt-fake"), ("file", AUDIO))
    assert post_form(f"{gateway.url}/v1/echo", body).status_code == 200
    assert upstream.last().body == body


def test_a_forms_unknown_model_is_404_when_unlisted_models_are_refused(
    strict_gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    refused = post_form(f"{strict_gateway.url}/v1/echo", form_body(("model", b"whisper-1")))
    assert refused.status_code == 404
    assert (error_of(refused)["code"], error_of(refused)["param"]) == ("model_not_found", "model")
    without_model = form_body(("file", AUDIO), ("purpose", b"assistants"))
    assert post_form(f"{strict_gateway.url}/v1/echo", without_model).status_code == 200
    assert upstream.last().body == without_model


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"--elsewhere\r\nnot a part\r\n", None),
        (form_body(("model", b"fast"), ("file", AUDIO))[:-40], None),
        (form_body(("model", b"fast"), ("model", b"gpt-fake")), None),
        (form_body(("model", b"fast")), "multipart/form-data"),
    ],
    ids=["garbage", "cut", "two-models", "no-boundary"],
)
def test_a_malformed_form_is_400_in_openais_shape(
    gateway: GatewayProcess, upstream: FakeUpstream, body: bytes, content_type: str | None
) -> None:
    upstream.clear()
    headers = {"content-type": content_type} if content_type else {}
    response = post_form(f"{gateway.url}/v1/echo", body, headers)
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_multipart"
    assert upstream.requests == []


# The model list: the one response the gateway rewrites, for the caller.


def models_of(response: httpx.Response) -> list[str]:
    assert response.status_code == 200
    return [entry["id"] for entry in response.json()["data"]]


def test_the_model_list_lists_aliases_and_drops_what_is_not_routable(
    gateway: GatewayProcess, strict_gateway: GatewayProcess
) -> None:
    wide = httpx.get(f"{gateway.url}/v1/models", headers=AUTH)
    assert models_of(wide) == ["gpt-fake", "gpt-4o-mini", "text-embedding-fake", "fast"]
    assert wide.headers["content-length"] == str(len(wide.content))
    strict = httpx.get(f"{strict_gateway.url}/v1/models", headers=AUTH)
    assert models_of(strict) == ["gpt-fake", "fast"]


def test_a_gzipped_model_list_is_rewritten_and_sent_decoded(gateway: GatewayProcess) -> None:
    with httpx.Client(timeout=10) as client:
        response = client.send(
            client.build_request(
                "GET",
                f"{gateway.url}/v1/models",
                headers={**AUTH, "accept-encoding": "gzip", "x-fake-gzip": "1"},
            ),
            stream=True,
        )
        raw = b"".join(response.iter_raw())
    assert "content-encoding" not in response.headers
    assert response.headers["content-length"] == str(len(raw))
    assert [entry["id"] for entry in orjson.loads(raw)["data"]][-1] == "fast"


@pytest.mark.parametrize("status", [401, 429, 500, 503])
def test_an_upstream_error_on_the_model_list_passes_unchanged(
    gateway: GatewayProcess, upstream: FakeUpstream, status: int
) -> None:
    headers = {**AUTH, "x-fake-status": str(status)}
    direct = httpx.get(f"{upstream.base_url}/models", headers=headers)
    via = httpx.get(f"{gateway.url}/v1/models", headers=headers)
    assert via.status_code == direct.status_code == status
    assert via.content == direct.content


def test_a_model_list_too_large_to_filter_is_502_not_relayed(gateway: GatewayProcess) -> None:
    response = httpx.get(
        f"{gateway.url}/v1/models", headers={**AUTH, "x-fake-bytes": str(5 * 1024 * 1024)}
    )
    assert response.status_code == 502
    assert error_of(response)["code"] == "upstream_error"
    padded = httpx.get(f"{gateway.url}/v1/models", headers={**AUTH, "x-fake-bytes": "100000"})
    assert models_of(padded)[-1] == "fast"


def test_an_alias_is_retrieved_under_the_upstreams_name_and_answered_as_itself(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    response = httpx.get(f"{gateway.url}/v1/models/fast", headers=AUTH)
    assert response.status_code == 200
    assert response.json()["id"] == "fast"
    assert upstream.last().path == "/v1/models/gpt-4o-mini"


def test_a_form_body_passes_when_no_model_rule_applies(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    response = httpx.post(f"{gateway.url}/v1/echo", files={"model": (None, "x")}, headers=AUTH)
    assert response.status_code == 200
    assert (upstream.last().header("content-type") or "").startswith("multipart/form-data")


def test_a_model_that_is_not_a_string_is_400(gateway: GatewayProcess) -> None:
    response = post(f"{gateway.url}/v1/chat/completions", {"model": ["gpt-fake"], "messages": []})
    assert response.status_code == 400
    assert (error_of(response)["code"], error_of(response)["param"]) == ("invalid_type", "model")


def raw_post(gateway: GatewayProcess, path: str) -> tuple[bytes, bytes]:
    """POST ``path`` exactly as written: HTTP clients resolve dot segments before sending."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {DEMO_KEY}\r\n"
            "content-type: application/json\r\ncontent-length: 2\r\n"
            "connection: close\r\n\r\n{}".encode()
        )
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


@pytest.mark.parametrize(
    "path",
    [
        "/v1/../../echo/x",
        "/v1/./chat/completions",
        "/v1//chat/completions",
        "/v1/%2e%2e/echo",
        "/v1/.%2E/echo",
        # Encoded: a server that decodes before it normalises would leave the base path.
        "/v1/models/..%2F..%2Fsecret",
        "/v1/echo/..%2Fchat%2Fcompletions",
        "/v1/echo/a%2Fb",
        "/v1/echo/a%2fb",
        "/v1/echo/a%5Cb",
        "/v1/echo/a\\b",
        "/v1/echo/a%00b",
        "/v1/echo/a%0D%0Ab",
        "/v1/echo/a%7Fb",
    ],
)
def test_unsafe_paths_are_400_and_never_forwarded(
    gateway: GatewayProcess, upstream: FakeUpstream, path: str
) -> None:
    upstream.clear()
    head, body = raw_post(gateway, path)
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert orjson.loads(body)["error"]["code"] == "invalid_path"
    assert upstream.requests == []


def test_encoded_slash_in_the_parameter_that_allows_it_is_forwarded_exactly(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    """The model route lets {model} hold an encoded '/': Hugging Face ids are org/name."""
    upstream.clear()
    response = httpx.get(f"{gateway.url}/v1/models/meta-llama%2FLlama-3-8B", headers=AUTH)
    assert response.status_code != 400
    assert upstream.last().path == "/v1/models/meta-llama%2FLlama-3-8B"


def test_dot_segments_stay_refused_inside_the_parameter_that_allows_encoded_slashes(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    upstream.clear()
    response = httpx.get(f"{gateway.url}/v1/models/..%2F..%2Fsecret", headers=AUTH)
    assert response.status_code == 400
    assert upstream.requests == []


def test_configured_upstream_headers_replace_the_clients(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    post(f"{gateway.url}/v1/echo", {}, {"x-gateway-tenant": "spoofed"})
    assert upstream.last().header_values("x-gateway-tenant") == ["tests"]
