"""The access line: one JSON object per request with what an operator needs, and no secrets."""

from __future__ import annotations

import io
from typing import Any

import orjson

from gateway.auth import hash_key
from gateway.upstream.seam import UpstreamTimeout
from tests.support.standin import Scripted, StandInUpstream, call, in_process_gateway, json_answer

KEY = "sk-gw-access-log-key"
SECRET = "sk-upstream-access-log-secret"
CONFIG = f"""
upstreams:
  main: {{base_url: "http://upstream.test/v1", auth: {{style: bearer, key: {SECRET}}}}}
routes:
  - {{name: chat, path: /v1/chat/completions, upstream: main}}
models:
  fast: {{upstream: main, model: small-model}}
keys:
  - name: demo
    team: ml
    hash: {hash_key(KEY)}
    limits: {{requests_per_minute: 600, tokens_per_minute: 100000}}
"""
AUTH = [("authorization", f"Bearer {KEY}"), ("content-type", "application/json")]
USAGE = {"usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}}


async def lines_for(respond: Scripted | None, headers: list[tuple[str, str]]) -> list[Any]:
    stream = io.StringIO()
    upstream = StandInUpstream(lambda request: respond or json_answer(USAGE))
    async with in_process_gateway(CONFIG, upstream, access_stream=stream) as app:
        body = orjson.dumps({"model": "fast", "messages": []})
        await call(app, "POST", "/v1/chat/completions", headers=headers, body=body)
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


async def test_the_access_line_names_everything_an_operator_needs() -> None:
    headers = [*AUTH, ("x-request-id", "trace-7")]
    (line,) = await lines_for(None, headers)
    assert line["request_id"] == "trace-7"
    assert line["client"] == "127.0.0.1"
    assert line["method"] == "POST"
    assert line["path"] == "/v1/chat/completions"
    assert line["status"] == 200
    assert line["route"] == "chat"
    assert line["key"] == "demo"
    assert line["team"] == "ml"
    assert line["model"] == "fast"
    assert line["upstream_model"] == "small-model"
    assert line["upstream"] == "main"
    assert line["bytes"] > 0
    assert line["ms"] >= line["upstream_ms"] >= 0
    assert line["tokens_in"] == 12
    assert line["tokens_out"] == 30
    assert line["limit"] == "allowed"


async def test_the_access_line_says_why_a_request_failed() -> None:
    (line,) = await lines_for(Scripted(fault=UpstreamTimeout("slow")), AUTH)
    assert line["status"] == 504
    assert line["upstream_error"] == "timeout"
    (refused,) = await lines_for(None, [("authorization", "Bearer sk-gw-unknown")])
    assert refused["status"] == 401
    assert refused["key"] is None


async def test_the_access_line_carries_no_key_hash_or_secret() -> None:
    lines = await lines_for(None, AUTH)
    text = orjson.dumps(lines).decode()
    for secret in (KEY, SECRET, hash_key(KEY)[7:], "upstream.test"):
        assert secret not in text
