"""The pipeline in process: admission and the relay against a stand-in behind the upstream seam.

Fast specifications of what the end-to-end tests (``tests/end_to_end/test_proxy.py``) check
through a real gateway process and a real fake upstream; here no socket is opened.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from gateway.app import Gateway
from gateway.auth import hash_key
from gateway.upstream.seam import OutboundRequest, UpstreamConnectError, UpstreamTimeout
from tests.support.standin import (
    Scripted,
    StandInUpstream,
    call,
    in_process_gateway,
    json_answer,
)

KEY = "sk-gw-in-process"
NARROW = "sk-gw-in-process-narrow"
UPSTREAM_SECRET = "sk-upstream-in-process-0123456789"
AUTH = [("authorization", f"Bearer {KEY}"), ("content-type", "application/json")]
CONFIG = f"""
server: {{access_log: false}}
upstreams:
  main:
    base_url: http://upstream.test/v1
    auth: {{style: bearer, key: {UPSTREAM_SECRET}}}
  other:
    base_url: http://other.test/v1
routes:
  - name: chat
    path: /v1/chat/completions
    upstream: main
    aliases:
      - {{path: /old/chat/completions, deprecated: 2026-01-01, successor: /v1/chat/completions}}
  - {{name: models, path: /v1/models, methods: [GET], upstream: main, models_list: true}}
models:
  fast: {{upstream: other, model: small-model-v2}}
allow_unlisted_models: true
keys:
  - {{name: demo, team: ml, hash: {hash_key(KEY)}}}
  - {{name: narrow, hash: {hash_key(NARROW)}, models: [fast]}}
"""
CHAT = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture
def upstream() -> StandInUpstream:
    return StandInUpstream(lambda request: json_answer({"id": "chatcmpl-1", "object": "x"}))


@pytest.fixture
async def gateway(upstream: StandInUpstream) -> AsyncIterator[Gateway]:
    async with in_process_gateway(CONFIG, upstream) as app:
        yield app


async def test_the_clients_body_goes_upstream_byte_for_byte(
    gateway: Gateway, upstream: StandInUpstream
) -> None:
    body = b'{"messages": [{"role":"user","content":"hi"}],   "model":"gpt-4o"}'
    response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=body)
    assert response.status == 200
    sent = upstream.requests[0]
    assert bytes(sent.body) == body
    assert sent.url == "http://upstream.test/v1/chat/completions"
    headers = dict(sent.headers)
    assert headers["authorization"] == f"Bearer {UPSTREAM_SECRET}"
    assert KEY not in str(sent.headers)


async def test_the_upstreams_content_length_is_kept(gateway: Gateway) -> None:
    response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
    assert response.headers["content-length"] == str(len(response.body))
    assert response.complete


async def test_a_model_alias_renames_the_body_and_picks_its_upstream(
    gateway: Gateway, upstream: StandInUpstream
) -> None:
    body = orjson.dumps({"model": "fast", "messages": []})
    response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=body)
    assert response.status == 200
    sent = upstream.requests[0]
    assert sent.url.startswith("http://other.test/v1/")
    assert orjson.loads(sent.body)["model"] == "small-model-v2"


async def test_a_refused_request_never_reaches_the_upstream(
    gateway: Gateway, upstream: StandInUpstream
) -> None:
    bad_key = [("authorization", "Bearer sk-gw-wrong")]
    assert (await call(gateway, "POST", "/v1/chat/completions", headers=bad_key)).status == 401
    narrow = [("authorization", f"Bearer {NARROW}"), ("content-type", "application/json")]
    refused = await call(gateway, "POST", "/v1/chat/completions", headers=narrow, body=CHAT)
    assert refused.status == 403
    assert refused.json()["error"]["code"] == "model_not_allowed"
    assert (await call(gateway, "GET", "/v1/nowhere", headers=AUTH)).status == 404
    assert upstream.requests == []


async def test_a_deprecated_alias_carries_its_notice_on_refusals_too(gateway: Gateway) -> None:
    response = await call(gateway, "POST", "/old/chat/completions")
    assert response.status == 401
    assert "deprecation" in response.headers


async def test_the_request_id_is_sent_upstream_and_returned(
    gateway: Gateway, upstream: StandInUpstream
) -> None:
    headers = [*AUTH, ("x-request-id", "trace-42")]
    response = await call(gateway, "POST", "/v1/chat/completions", headers=headers, body=CHAT)
    assert dict(upstream.requests[0].headers)["x-request-id"] == "trace-42"
    assert [n for n, _ in upstream.requests[0].headers].count("x-request-id") == 1
    assert response.headers["x-request-id"] == "trace-42"


async def test_a_generated_request_id_is_sent_upstream_too(
    gateway: Gateway, upstream: StandInUpstream
) -> None:
    response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
    assert dict(upstream.requests[0].headers)["x-request-id"] == response.headers["x-request-id"]


async def test_stream_chunks_are_relayed_in_order_without_a_length(
    upstream: StandInUpstream, gateway: Gateway
) -> None:
    events = [b'data: {"n":%d}\n\n' % n for n in range(5)] + [b"data: [DONE]\n\n"]
    upstream.respond = lambda request: Scripted(
        headers=((b"content-type", b"text/event-stream"),), chunks=events
    )
    response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
    assert [m["body"] for m in response.messages[1:-1]] == events
    assert "content-length" not in response.headers
    assert response.headers["cache-control"] == "no-cache"
    assert response.complete
    assert upstream.responses[0].released


async def test_a_failure_mid_stream_cuts_the_response_and_drops_the_upstream_connection(
    upstream: StandInUpstream, gateway: Gateway
) -> None:
    upstream.respond = lambda request: Scripted(
        headers=((b"content-type", b"text/event-stream"),),
        chunks=[b"data: 1\n\n", b"data: 2\n\n"],
        cut_after=1,
    )
    response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
    assert response.status == 200
    assert response.body == b"data: 1\n\n"
    assert not response.complete
    assert upstream.responses[0].closed


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        (UpstreamConnectError("refused"), 502, "upstream_unreachable"),
        (UpstreamTimeout("no head"), 504, "upstream_timeout"),
        (RuntimeError("a bug in a transport"), 502, "upstream_error"),
    ],
)
async def test_an_upstream_that_fails_before_its_head_is_an_openai_shaped_error(
    upstream: StandInUpstream, gateway: Gateway, fault: Exception, status: int, code: str
) -> None:
    upstream.respond = lambda request: Scripted(fault=fault)
    response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
    assert response.status == status
    assert response.json()["error"]["code"] == code
    assert "upstream.test" not in response.body.decode()


async def test_an_exception_escaping_the_relay_is_a_500_with_the_request_id(
    upstream: StandInUpstream, gateway: Gateway
) -> None:
    class BrokenResponse:
        status = 200

        @property
        def raw_headers(self) -> list[tuple[bytes, bytes]]:
            raise RuntimeError("a transport bug")

    async def send(request: OutboundRequest) -> BrokenResponse:
        return BrokenResponse()

    runtime = gateway.runtime()
    runtime.upstreams["main"].first.client.send = send  # type: ignore[method-assign,assignment]
    response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
    assert response.status == 500
    error = response.json()["error"]
    assert error["code"] == "internal_error"
    assert response.headers["x-request-id"] in error["message"]


async def test_the_model_list_is_filtered_for_a_narrow_key(
    upstream: StandInUpstream, gateway: Gateway
) -> None:
    listed = {"object": "list", "data": [{"id": "gpt-4o", "object": "model", "owned_by": "x"}]}
    upstream.respond = lambda request: json_answer(listed)
    narrow = [("authorization", f"Bearer {NARROW}")]
    response = await call(gateway, "GET", "/v1/models", headers=narrow)
    assert response.status == 200
    assert [m["id"] for m in response.json()["data"]] == ["fast"]
    assert response.headers["content-length"] == str(len(response.body))


async def test_a_client_that_leaves_cancels_the_upstream_exchange(
    upstream: StandInUpstream, gateway: Gateway
) -> None:
    upstream.respond = lambda request: Scripted(
        headers=((b"content-type", b"text/event-stream"),),
        chunks=[b"data: 1\n\n"] * 1000,
        chunk_delay=0.01,
    )
    started = asyncio.get_running_loop().time()
    response = await call(
        gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT, disconnect_after=0.2
    )
    assert asyncio.get_running_loop().time() - started < 2
    assert not response.complete
    assert upstream.responses[0].closed
