"""What a request is charged, as a client sees it through a real ``gateway serve`` process.

Each case reads the tokens left in the key's bucket (``x-ratelimit-remaining-tokens``) before
and after a request settles: the first request's cost is the bucket's drop minus the second
request's own reservation. The expected cost is worked out here from the usage the client
received, with each provider's published fields, not with the gateway's code.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest

from gateway.auth import hash_key
from tests.conftest import UPSTREAM_KEY, gateway_config
from tests.support.fakeupstream import STANDARD_PROMPT, FakeUpstream, anthropic_message_events
from tests.support.gatewayproc import GatewayProcess

MARKER = "x-limits-test"
BURST = 100_000
# Tokens refill one a minute: over a test, a bucket moves only by what requests cost.
LIMITS = f"{{tokens_per_minute: 1, token_burst: {BURST}}}"
# Settlement runs just after the response: give it a moment before the next admission.
SETTLE_PAUSE = 0.05
# About 1000 tokens: a chat prompt, or a system prompt the fake upstream reports as read from
# a warm prompt cache. The replies are 5 tokens long.
LONG_TEXT = "policy " * 571 + "end"
CACHED_SYSTEM = [{"type": "text", "text": LONG_TEXT, "cache_control": {"type": "ephemeral"}}]
ANTHROPIC_REQUEST: dict[str, Any] = {
    "model": "claude-fake",
    "max_tokens": 1024,
    "system": CACHED_SYSTEM,
    "messages": [{"role": "user", "content": STANDARD_PROMPT}],
}
CHAT_REQUEST: dict[str, Any] = {
    "model": "gpt-fake",
    "max_tokens": 1024,
    "messages": [{"role": "user", "content": LONG_TEXT}],
}


def key_secret(name: str) -> str:
    return f"sk-gw-usage-{name}-0123456789abcdef"


# -- What each provider's usage says was processed -------------------------------------------------


def sse_data(body: bytes) -> list[dict[str, Any]]:
    """The JSON ``data:`` of every event of a stream (``[DONE]`` left out)."""
    return [
        orjson.loads(line[5:])
        for line in body.splitlines()
        if line.startswith(b"data:") and line[5:].strip() != b"[DONE]"
    ]


def anthropic_total(usage: dict[str, Any]) -> int:
    """Anthropic's input_tokens leaves out the prompt cache's reads and writes: all are
    processed tokens (docs.anthropic.com/en/docs/build-with-claude/prompt-caching)."""
    counted = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    total: int = sum(usage.get(name) or 0 for name in counted) + usage["output_tokens"]
    return total


def anthropic_json_cost(body: bytes) -> int:
    return anthropic_total(orjson.loads(body)["usage"])


def anthropic_stream_cost(body: bytes) -> int:
    """message_start's input and cache counts, with the last message_delta's output count
    (cumulative: it replaces message_start's initial one)."""
    events = sse_data(body)
    start = next(e["message"]["usage"] for e in events if e["type"] == "message_start")
    final = [e["usage"] for e in events if e["type"] == "message_delta"][-1]
    return anthropic_total({**start, **final})


def chat_stream_cost(body: bytes) -> int:
    total: int = sse_data(body)[-1]["usage"]["total_tokens"]
    return total


@dataclass(frozen=True)
class Case:
    path: str
    request: dict[str, Any]
    cost: Callable[[bytes], int]
    headers: tuple[tuple[str, str], ...] = ()


SETTLED = {
    "anthropic-messages": Case("/v1/messages", ANTHROPIC_REQUEST, anthropic_json_cost),
    "anthropic-stream": Case(
        "/v1/messages", {**ANTHROPIC_REQUEST, "stream": True}, anthropic_stream_cost
    ),
    "anthropic-stream-gzip": Case(
        "/v1/messages",
        {**ANTHROPIC_REQUEST, "stream": True},
        anthropic_stream_cost,
        (("accept-encoding", "gzip"), ("x-fake-gzip", "1")),
    ),
    "openai-chat-stream": Case(
        "/v1/chat/completions",
        {**CHAT_REQUEST, "stream": True, "stream_options": {"include_usage": True}},
        chat_stream_cost,
    ),
}

# A client that leaves mid-stream, after the stream's first N events (the fake upstream then
# goes silent): whether the final usage had arrived by then decides what the request costs.
ANTHROPIC_EVENTS = anthropic_message_events(ANTHROPIC_REQUEST)
LEFT: dict[str, tuple[Case, int, bool]] = {
    "anthropic-after-message_start": (SETTLED["anthropic-stream"], 2, False),
    "anthropic-after-message_delta": (SETTLED["anthropic-stream"], len(ANTHROPIC_EVENTS) - 1, True),
    "openai-chat-before-its-usage-chunk": (SETTLED["openai-chat-stream"], 3, False),
    # Five content chunks, the finish chunk and the usage chunk: all but [DONE].
    "openai-chat-after-its-usage-chunk": (SETTLED["openai-chat-stream"], 7, True),
}
KEYS = [*SETTLED, *LEFT]


@pytest.fixture(scope="module")
def usage_gateway(upstream: FakeUpstream) -> Iterator[GatewayProcess]:
    keys = "".join(
        f"  - name: {name}\n    hash: {hash_key(key_secret(name))}\n    limits: {LIMITS}\n"
        for name in KEYS
    )
    config = gateway_config(upstream.base_url)
    assert config.count("\nkeys:\n") == 1, "tests/conftest.py no longer has one 'keys:'"
    config = config.replace("\nkeys:\n", "\nkeys:\n" + keys, 1)
    with GatewayProcess(config, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as process:
        yield process


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as http:
        yield http


def send(
    client: httpx.Client, gateway: GatewayProcess, key: str, case: Case, marker: str
) -> httpx.Response:
    # x-api-key and anthropic-version, as the anthropic SDK sends them; the gateway takes
    # either this or Authorization: Bearer.
    headers = {"x-api-key": key_secret(key), "anthropic-version": "2023-06-01", MARKER: marker}
    return client.post(
        gateway.url + case.path, json=case.request, headers={**headers, **dict(case.headers)}
    )


def remaining(response: httpx.Response) -> int:
    return int(response.headers["x-ratelimit-remaining-tokens"])


@pytest.mark.parametrize("name", list(SETTLED))
def test_a_response_is_charged_its_input_cache_and_output_tokens(
    usage_gateway: GatewayProcess, client: httpx.Client, name: str
) -> None:
    case = SETTLED[name]
    marker = uuid.uuid4().hex
    first = send(client, usage_gateway, name, case, marker)
    assert first.status_code == 200, first.text
    reserved = BURST - remaining(first)
    cost = case.cost(first.content)  # httpx inflates a gzip body
    assert 1000 < cost < reserved  # mostly input, far more than the 5 output tokens

    time.sleep(SETTLE_PAUSE)
    second = send(client, usage_gateway, name, case, marker)
    assert second.status_code == 200, second.text
    assert remaining(second) == BURST - cost - reserved


@pytest.mark.parametrize("name", list(LEFT))
def test_a_client_that_leaves_mid_stream_keeps_its_reservation_unless_the_final_usage_came(
    usage_gateway: GatewayProcess, upstream: FakeUpstream, client: httpx.Client, name: str
) -> None:
    """The upstream generated until the gateway cancelled it, and no count says how far: the
    reservation stands. Anthropic's message_start usage (input, and 1 output token) is a
    start, not a count. Once the final usage has been relayed the request costs just that."""
    case, events, settled = LEFT[name]
    marker = uuid.uuid4().hex
    headers = {"x-api-key": key_secret(name), MARKER: marker, "x-fake-hang-after": str(events)}
    with client.stream(
        "POST", usage_gateway.url + case.path, json=case.request, headers=headers
    ) as cut:
        assert cut.status_code == 200
        reserved = BURST - remaining(cut)
        received = b""
        chunks = cut.iter_raw()
        # The gateway feeds each chunk to its usage reader before relaying it: once the client
        # holds the events, so does the reader.
        while received.count(b"\n\n") < events:
            received += next(chunks)
    sent = next(r for r in upstream.requests if r.header(MARKER) == marker)
    upstream.wait_for_disconnect(timeout=3, request=sent)  # the gateway cancelled the upstream
    time.sleep(SETTLE_PAUSE)

    cost = case.cost(received) if settled else reserved
    after = send(client, usage_gateway, name, case, marker)
    assert after.status_code == 200, after.text
    assert remaining(after) == BURST - cost - reserved
