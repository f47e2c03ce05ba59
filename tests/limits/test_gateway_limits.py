"""Per-key limits as a client sees them, through real ``gateway serve`` processes.

Each test talks HTTP to a gateway process in front of the fake upstream, with the official
``openai`` SDK where the SDK's own behaviour is the point (its retry, its SSE parser) and with
httpx where the exact bytes and headers are. Redis-backed tests start their own private
``redis-server`` (``tests/limits/conftest.py``) and kill it mid-test; nothing here touches a shared
Redis. Requests are tagged with a per-test ``x-limits-test`` header so the fake upstream's record
(shared by the session) tells exactly which of them reached it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import re
import signal
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import redis
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam
from redis.cluster import RedisCluster

from gateway.auth import hash_key
from gateway.openai.tokens import estimate_tokens
from tests.conftest import DEMO_KEY, UPSTREAM_KEY, gateway_config
from tests.support.admin import admin_get
from tests.support.fakeupstream import STANDARD_PROMPT, FakeUpstream
from tests.support.gatewayproc import GatewayProcess

from .conftest import RedisServer

MARKER = "x-limits-test"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": STANDARD_PROMPT}]
# A route that asks the upstream for stream usage on the client's behalf.
METERED_ROUTE = (
    "  - {name: metered, path: /metered/chat/completions, upstream: fake,"
    " upstream_path: /chat/completions, stream_usage: true}\n"
)
ENV = {"TEST_UPSTREAM_KEY": UPSTREAM_KEY}
RATELIMIT_NAMES = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)


# -- Building gateways --------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """A client key of the test config, with its limits as a YAML flow mapping."""

    name: str
    limits: str

    @property
    def secret(self) -> str:
        return f"sk-gw-limits-{self.name}-0123456789abcdef"

    @property
    def redis_id(self) -> str:
        """The key's name in Redis: 16 hex digits of its configured hash."""
        return hashlib.sha256(self.secret.encode()).hexdigest()[:16]

    def yaml(self) -> str:
        return (
            f"  - name: {self.name}\n    hash: {hash_key(self.secret)}\n    limits: {self.limits}\n"
        )


def limits_config(upstream: FakeUpstream, keys: Sequence[Key], *, extra: str = "") -> str:
    """The test gateway's YAML with these keys added and the ``metered`` route."""
    config = gateway_config(upstream.base_url, extra=extra)
    for anchor, added in (
        ("\nkeys:\n", "".join(key.yaml() for key in keys)),
        ("\nroutes:\n", METERED_ROUTE),
    ):
        assert config.count(anchor) == 1, f"tests/conftest.py no longer has one {anchor!r}"
        config = config.replace(anchor, anchor + added, 1)
    return config


def redis_section(url: str, on_failure: str, *, timeout_ms: int = 50, cluster: bool = False) -> str:
    return (
        f"redis:\n  url: {url}\n  cluster: {'true' if cluster else 'false'}\n"
        f"  on_failure: {on_failure}\n  timeout_ms: {timeout_ms}\n  breaker_seconds: 0.5\n"
    )


@contextlib.contextmanager
def running(*gateways: GatewayProcess) -> Iterator[None]:
    """Start the gateways side by side (each start takes most of a second); stop them all."""
    try:
        with concurrent.futures.ThreadPoolExecutor(len(gateways)) as pool:
            for future in [pool.submit(g.start) for g in gateways]:
                future.result()
        yield
    finally:
        for gateway in gateways:
            gateway.stop()


# -- Talking to them ----------------------------------------------------------------------------


def new_marker() -> str:
    return uuid.uuid4().hex


def reached_upstream(upstream: FakeUpstream, marker: str) -> int:
    return sum(1 for r in upstream.requests if r.header(MARKER) == marker)


def chat(
    client: httpx.Client,
    gateway: GatewayProcess,
    key: Key,
    marker: str,
    **body: Any,
) -> httpx.Response:
    request = {"model": "gpt-fake", "messages": MESSAGES, **body}
    return client.post(
        gateway.url + "/v1/chat/completions",
        json=request,
        headers={"authorization": f"Bearer {key.secret}", MARKER: marker},
    )


def timed_chat(
    client: httpx.Client, gateway: GatewayProcess, key: Key, marker: str
) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = chat(client, gateway, key, marker)
    return response, time.perf_counter() - started


def remaining(headers: Mapping[str, str], kind: str) -> int:
    return int(headers[f"x-ratelimit-remaining-{kind}"])


def duration_ms(text: str) -> float:
    """A Go duration as OpenAI's reset headers write it (``20ms``, ``1.5s``, ``6m0s``)."""
    if text.endswith("ms"):
        return float(text[:-2])
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?([\d.]+)s", text)
    assert match is not None, text
    hours, minutes, seconds = match.groups()
    return ((int(hours or 0) * 60 + int(minutes or 0)) * 60 + float(seconds)) * 1000


def assert_rate_limit_error(response: httpx.Response, kind: str) -> dict[str, Any]:
    """A 429 whose body is exactly OpenAI's rate-limit error; returns its ``error`` object."""
    assert response.status_code == 429, response.text
    body: dict[str, dict[str, Any]] = response.json()
    message = body["error"]["message"]
    assert isinstance(message, str)
    assert message
    assert body == {
        "error": {"message": message, "type": kind, "param": None, "code": "rate_limit_exceeded"}
    }
    return body["error"]


def access_statuses(gateway: GatewayProcess, key: Key, count: int) -> list[int]:
    """The statuses of the key's requests from the gateway's JSON access log, once ``count``
    are there (a line is written just after its response)."""
    deadline = time.monotonic() + 5
    while True:
        statuses = [
            record["status"]
            for record in map(json.loads, re.findall(r"^\{.*\}$", gateway.logs(), re.M))
            if record.get("key") == key.name
        ]
        if len(statuses) >= count or time.monotonic() > deadline:
            return statuses
        time.sleep(0.02)


def limits_state(gateway: GatewayProcess) -> dict[str, Any]:
    """The limiter's state as the admin API shows it (``/readyz`` carries no values)."""
    body: dict[str, dict[str, Any]] = admin_get(gateway.url, "health")
    return body["limits"]


def poll_until(
    client: httpx.Client,
    gateway: GatewayProcess,
    key: Key,
    marker: str,
    status: int,
    timeout: float = 5.0,
) -> httpx.Response:
    """Send requests until one gets ``status`` (a sign that Redis answers again)."""
    deadline = time.monotonic() + timeout
    while True:
        response = chat(client, gateway, key, marker)
        if response.status_code == status:
            return response
        assert time.monotonic() < deadline, f"still {response.status_code}: {response.text}"
        time.sleep(0.05)


# -- Without Redis: the embedded per-process limiter ---------------------------------------------

HEADERS_A = Key(
    "headers-a", "{requests_per_minute: 600, request_burst: 10, tokens_per_minute: 60000}"
)
HEADERS_B = Key("headers-b", "{requests_per_minute: 120, tokens_per_minute: 6000}")
REFUSED = Key("refused", "{requests_per_minute: 60, request_burst: 2}")
SDK_RETRY = Key("sdk-retry", "{requests_per_minute: 60, request_burst: 1}")
# Tokens refill one a minute: over a test, the buckets move only by what requests cost.
SLOW_TOKENS = "{tokens_per_minute: 1, token_burst: 100000}"
SETTLE_JSON = Key("settle-json", SLOW_TOKENS)
SETTLE_STREAM = Key("settle-stream", SLOW_TOKENS)
NO_USAGE = Key("no-usage", "{tokens_per_minute: 1, token_burst: 25000}")
TOO_LARGE = Key("too-large", "{tokens_per_minute: 60, token_burst: 1000}")
GZIP = Key("gzip", SLOW_TOKENS)
UPSTREAM_ERROR = Key("upstream-error", SLOW_TOKENS)
# For the keys that name no limits of their own (the shared config's 'demo' and 'narrow').
DEFAULT_LIMITS = """
limits:
  default: {requests_per_minute: 6000, request_burst: 7, tokens_per_minute: 60000}
  default_max_tokens: 256
"""
LOCAL_KEYS = (
    HEADERS_A,
    HEADERS_B,
    REFUSED,
    SDK_RETRY,
    SETTLE_JSON,
    SETTLE_STREAM,
    NO_USAGE,
    TOO_LARGE,
    GZIP,
    UPSTREAM_ERROR,
)
BIG_MAX_TOKENS = 10_000
# Settlement runs after the response, off its path: give it a moment before the next admission.
SETTLE_PAUSE = 0.05


@pytest.fixture(scope="module")
def local_gateway(upstream: FakeUpstream) -> Iterator[GatewayProcess]:
    config = limits_config(upstream, LOCAL_KEYS, extra=DEFAULT_LIMITS)
    with GatewayProcess(config, env=ENV) as process:
        yield process


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as http:
        yield http


def sdk(gateway: GatewayProcess, key: Key, marker: str, path: str = "/v1") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gateway.url + path, api_key=key.secret, default_headers={MARKER: marker}
    )


def test_each_key_sees_its_own_limits_in_openai_headers_instead_of_the_upstreams(
    local_gateway: GatewayProcess, upstream: FakeUpstream, client: httpx.Client
) -> None:
    marker = new_marker()
    a = chat(client, local_gateway, HEADERS_A, marker, max_tokens=100)
    b = chat(client, local_gateway, HEADERS_B, marker, max_tokens=100)
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    reserve = estimate_tokens({"messages": MESSAGES, "max_tokens": 100}, 4096)
    assert 100 < reserve < 200

    for response in (a, b):
        for name in RATELIMIT_NAMES:
            # Exactly one value: the fake upstream's own (10000, 9999, 200000...) are gone.
            assert len(response.headers.get_list(name)) == 1, (name, response.headers)
        assert response.headers["x-ratelimit-limit-requests"] != "10000"
        assert response.headers["x-ratelimit-limit-tokens"] != "200000"
        assert response.headers["openai-organization"] == "fake-org"  # others pass through

    # headers-a: a burst of 10 refilled at 600/min (one per 100 ms); 60000 tokens at 1000/s.
    assert a.headers["x-ratelimit-limit-requests"] == "10"
    assert remaining(a.headers, "requests") == 9
    assert duration_ms(a.headers["x-ratelimit-reset-requests"]) == pytest.approx(100, abs=1)
    assert a.headers["x-ratelimit-limit-tokens"] == "60000"
    assert remaining(a.headers, "tokens") == 60000 - reserve
    assert duration_ms(a.headers["x-ratelimit-reset-tokens"]) == pytest.approx(reserve, abs=1)

    # headers-b names no bursts: its buckets hold a minute's worth, 120 requests, 6000 tokens.
    assert b.headers["x-ratelimit-limit-requests"] == "120"
    assert remaining(b.headers, "requests") == 119
    assert duration_ms(b.headers["x-ratelimit-reset-requests"]) == pytest.approx(500, abs=1)
    assert b.headers["x-ratelimit-limit-tokens"] == "6000"
    assert remaining(b.headers, "tokens") == 6000 - reserve
    assert duration_ms(b.headers["x-ratelimit-reset-tokens"]) == pytest.approx(reserve * 10, abs=1)

    # The next request of headers-a counts down its own bucket, untouched by headers-b's.
    again = chat(client, local_gateway, HEADERS_A, marker, max_tokens=100)
    assert remaining(again.headers, "requests") == 8
    assert reached_upstream(upstream, marker) == 3


def test_keys_that_name_no_limits_get_the_defaults_and_the_default_completion_reservation(
    local_gateway: GatewayProcess, client: httpx.Client
) -> None:
    response = client.post(
        local_gateway.url + "/v1/chat/completions",
        json={"model": "gpt-fake", "messages": MESSAGES},  # no max_tokens
        headers={"authorization": f"Bearer {DEMO_KEY}"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-ratelimit-limit-requests"] == "7"
    assert remaining(response.headers, "requests") == 6
    assert response.headers["x-ratelimit-limit-tokens"] == "60000"
    reserved = 60000 - remaining(response.headers, "tokens")
    assert reserved == estimate_tokens({"messages": MESSAGES}, 0) + 256


def test_over_the_request_limit_is_a_429_with_retry_headers_that_never_reaches_the_upstream(
    local_gateway: GatewayProcess, upstream: FakeUpstream, client: httpx.Client
) -> None:
    marker = new_marker()
    first, second, refused = (chat(client, local_gateway, REFUSED, marker) for _ in range(3))
    assert (first.status_code, second.status_code) == (200, 200)
    assert remaining(second.headers, "requests") == 0

    error = assert_rate_limit_error(refused, "requests")
    assert "key 'refused'" in error["message"]
    # One request a second: the next is due in (almost) a second.
    assert refused.headers["retry-after"] == "1"
    assert 500 < int(refused.headers["retry-after-ms"]) <= 1000
    assert refused.headers["x-ratelimit-limit-requests"] == "2"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["content-type"] == "application/json"
    assert reached_upstream(upstream, marker) == 2


def test_the_openai_sdk_retry_waits_the_advertised_time_and_then_succeeds(
    local_gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    marker = new_marker()
    with sdk(local_gateway, SDK_RETRY, marker) as client:  # max_retries: the SDK's default, 2
        assert client.max_retries == 2
        client.chat.completions.create(model="gpt-fake", messages=MESSAGES)
        started = time.monotonic()
        completion = client.chat.completions.create(model="gpt-fake", messages=MESSAGES)
        elapsed = time.monotonic() - started
    assert completion.choices[0].message.content
    # Refused once (burst 1, one more a second), retried after the advertised ~1 s, admitted.
    assert 0.5 <= elapsed <= 3.0
    assert access_statuses(local_gateway, SDK_RETRY, 3) == [200, 429, 200]
    assert reached_upstream(upstream, marker) == 2


def test_tokens_are_reserved_at_admission_and_settled_from_the_responses_usage(
    local_gateway: GatewayProcess, client: httpx.Client
) -> None:
    marker = new_marker()
    first = chat(client, local_gateway, SETTLE_JSON, marker, max_tokens=BIG_MAX_TOKENS)
    assert first.status_code == 200, first.text
    reserved = 100_000 - remaining(first.headers, "tokens")
    assert reserved == estimate_tokens({"messages": MESSAGES, "max_tokens": BIG_MAX_TOKENS}, 0)
    used = first.json()["usage"]["total_tokens"]
    assert 0 < used < 100  # the fake's reply: far below the 10000 reserved

    time.sleep(SETTLE_PAUSE)
    second = chat(client, local_gateway, SETTLE_JSON, marker, max_tokens=BIG_MAX_TOKENS)
    assert second.status_code == 200, second.text
    # The first request now costs what it used: the unused reservation came back.
    assert remaining(second.headers, "tokens") == 100_000 - used - reserved
    assert remaining(second.headers, "tokens") > 100_000 - 2 * reserved + 9000


def sdk_stream(client: openai.OpenAI) -> tuple[Mapping[str, str], list[ChatCompletionChunk]]:
    """A chat stream through the SDK, as the client asks for it (no ``stream_options``)."""
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-fake", messages=MESSAGES, max_tokens=BIG_MAX_TOKENS, stream=True
    )
    stream = raw.parse()
    assert isinstance(stream, openai.Stream)
    return raw.headers, list(stream)


def test_a_stream_on_a_stream_usage_route_settles_from_its_final_usage_chunk(
    local_gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    marker = new_marker()
    with sdk(local_gateway, SETTLE_STREAM, marker, "/metered") as client:
        headers, chunks = sdk_stream(client)
        reserved = 100_000 - remaining(headers, "tokens")
        # The upstream was asked for usage although the client did not ask...
        sent = next(r for r in upstream.requests if r.header(MARKER) == marker).json()
        assert sent["stream_options"] == {"include_usage": True}
        # ...and the client's stream still parses, ending with the usage chunk.
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "This is a deterministic reply"
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None
        used = chunks[-1].usage.total_tokens
        assert 0 < used < 100

        time.sleep(SETTLE_PAUSE)
        headers, _ = sdk_stream(client)
    # The first stream now costs what its usage chunk said, not its reservation.
    assert remaining(headers, "tokens") == 100_000 - used - reserved


def test_a_stream_without_usage_keeps_its_reservation_and_the_next_that_cannot_fit_is_refused(
    local_gateway: GatewayProcess, upstream: FakeUpstream, client: httpx.Client
) -> None:
    marker = new_marker()
    first = chat(client, local_gateway, NO_USAGE, marker, max_tokens=BIG_MAX_TOKENS, stream=True)
    assert first.status_code == 200, first.text
    assert b'"usage"' not in first.content  # the 'chat' route does not ask for stream usage
    sent = next(r for r in upstream.requests if r.header(MARKER) == marker).json()
    assert "stream_options" not in sent
    reserved = 25_000 - remaining(first.headers, "tokens")
    assert reserved > BIG_MAX_TOKENS

    time.sleep(SETTLE_PAUSE)
    second = chat(client, local_gateway, NO_USAGE, marker, max_tokens=BIG_MAX_TOKENS, stream=True)
    assert second.status_code == 200, second.text
    assert (
        remaining(second.headers, "tokens") == 25_000 - 2 * reserved
    )  # no usage: nothing given back

    time.sleep(SETTLE_PAUSE)
    third = chat(client, local_gateway, NO_USAGE, marker, max_tokens=BIG_MAX_TOKENS, stream=True)
    error = assert_rate_limit_error(third, "tokens")
    assert "TPM" in error["message"]
    # It fits once the bucket refills: one token a minute, so in about `missing` minutes.
    missing = reserved - (25_000 - 2 * reserved)
    assert int(third.headers["retry-after"]) == pytest.approx(missing * 60, abs=60)
    assert int(third.headers["retry-after-ms"]) == pytest.approx(missing * 60_000, abs=60_000)
    assert reached_upstream(upstream, marker) == 2


def test_a_gzip_compressed_response_is_settled_from_its_usage_too(
    local_gateway: GatewayProcess, client: httpx.Client
) -> None:
    marker = new_marker()
    gzipped = client.post(
        local_gateway.url + "/v1/chat/completions",
        json={"model": "gpt-fake", "messages": MESSAGES, "max_tokens": BIG_MAX_TOKENS},
        headers={
            "authorization": f"Bearer {GZIP.secret}",
            "accept-encoding": "gzip, deflate",  # what the openai SDK sends
            "x-fake-gzip": "1",  # and an upstream that compresses, as api.openai.com may
            MARKER: marker,
        },
    )
    assert gzipped.status_code == 200, gzipped.text
    assert gzipped.headers["content-encoding"] == "gzip"
    reserved = 100_000 - remaining(gzipped.headers, "tokens")
    used = gzipped.json()["usage"]["total_tokens"]  # httpx decompresses it
    time.sleep(SETTLE_PAUSE)
    second = chat(client, local_gateway, GZIP, marker, max_tokens=BIG_MAX_TOKENS)
    assert remaining(second.headers, "tokens") == 100_000 - used - reserved


def test_a_request_whose_reservation_exceeds_the_token_bucket_is_refused_for_tokens(
    local_gateway: GatewayProcess, upstream: FakeUpstream, client: httpx.Client
) -> None:
    marker = new_marker()
    refused = chat(client, local_gateway, TOO_LARGE, marker, max_tokens=5000)
    error = assert_rate_limit_error(refused, "tokens")
    assert error["message"].startswith("Request too large")
    # Waiting cannot help, so there is no time to advertise.
    assert "retry-after" not in refused.headers
    assert "retry-after-ms" not in refused.headers
    # ...and the openai SDK is told not to retry it.
    assert refused.headers["x-should-retry"] == "false"
    fits = chat(client, local_gateway, TOO_LARGE, marker, max_tokens=500)
    assert fits.status_code == 200, fits.text
    assert reached_upstream(upstream, marker) == 1


# -- With Redis: shared limits, and each way of living without it ---------------------------------

# One request a minute refills: over a test, a bucket moves only by what requests take.
SHARED = Key("shared", "{requests_per_minute: 1, request_burst: 3}")
SHARED_TOKENS = Key("shared-tokens", SLOW_TOKENS)
UNSHARED = Key("unshared", "{requests_per_minute: 1, request_burst: 3}")  # never used with Redis up
LATENCY_BUDGET = 0.1  # seconds per request while Redis is dead, after the first one


def redis_gateway(
    upstream: FakeUpstream, server: RedisServer, on_failure: str, *, timeout_ms: int = 1000
) -> GatewayProcess:
    """A gateway on the private Redis. The timeout is generous by default so a busy test machine
    cannot turn a slow answer into a fallback decision: a killed Redis refuses connections at
    once, whatever the timeout; only the hung-Redis test needs the real, short one."""
    extra = redis_section(server.url, on_failure, timeout_ms=timeout_ms)
    keys = [SHARED, SHARED_TOKENS, UNSHARED]
    return GatewayProcess(limits_config(upstream, keys, extra=extra), env=ENV)


def redis_keys(server: RedisServer) -> dict[str, int]:
    """Every key in the private Redis, with its time to live in seconds."""
    with redis.Redis.from_url(server.url) as store:
        return {name.decode(): store.ttl(name) for name in store.scan_iter("*")}


def test_redis_limits_and_token_settlements_are_shared_by_gateways_under_hashed_expiring_keys(
    upstream: FakeUpstream, redis_server: RedisServer, client: httpx.Client
) -> None:
    marker = new_marker()
    a = redis_gateway(upstream, redis_server, "closed")
    b = redis_gateway(upstream, redis_server, "closed")
    with running(a, b):
        admitted = [chat(client, g, SHARED, marker) for g in (a, b, a)]
        assert [r.status_code for r in admitted] == [200, 200, 200]
        assert [remaining(r.headers, "requests") for r in admitted] == [2, 1, 0]
        for gateway in (b, a):
            assert_rate_limit_error(chat(client, gateway, SHARED, marker), "requests")

        # A reservation taken through one gateway is settled in Redis, and the other sees it.
        first = chat(client, a, SHARED_TOKENS, marker, max_tokens=BIG_MAX_TOKENS)
        reserved = 100_000 - remaining(first.headers, "tokens")
        used = first.json()["usage"]["total_tokens"]
        time.sleep(SETTLE_PAUSE)
        second = chat(client, b, SHARED_TOKENS, marker, max_tokens=BIG_MAX_TOKENS)
        assert remaining(second.headers, "tokens") == 100_000 - used - reserved

        healthy = {
            "store": "redis",
            "degraded_decisions": 0,
            "redis_errors": 0,
            "breaker": "closed",
            "last_error": None,
        }
        for gateway in (a, b):
            state = limits_state(gateway)
            assert {name: state[name] for name in healthy} == healthy
    assert reached_upstream(upstream, marker) == 5
    keys = redis_keys(redis_server)
    requests_key = f"rl:{{k:{SHARED.redis_id}}}:rpm"
    # The buckets, and each key's usage counters for this hour, day and month (accounting is
    # on by default), under the same hash tag.
    buckets = [name for name in keys if ":u:" not in name]
    assert sorted(buckets) == sorted([requests_key, f"rl:{{k:{SHARED_TOKENS.redis_id}}}:tpm"])
    for key in (SHARED, SHARED_TOKENS):
        usage = [name for name in keys if name.startswith(f"rl:{{k:{key.redis_id}}}:u:")]
        assert len(usage) == 3, keys
    assert all(key.secret not in name for name in keys for key in (SHARED, SHARED_TOKENS))
    assert all(ttl > 0 for ttl in keys.values()), keys
    # Expiry comes about when a bucket is full again: 3 requests at one a minute.
    assert keys[requests_key] <= 3 * 60 + 1


def test_redis_down_with_on_failure_closed_refuses_with_503_fast_and_recovers(
    upstream: FakeUpstream, redis_server: RedisServer, client: httpx.Client
) -> None:
    marker = new_marker()
    with redis_gateway(upstream, redis_server, "closed") as gateway:
        assert chat(client, gateway, SHARED, marker).status_code == 200
        redis_server.stop()

        timings = []
        for _ in range(8):
            response, elapsed = timed_chat(client, gateway, SHARED, marker)
            timings.append(elapsed)
            assert response.status_code == 503, response.text
            assert int(response.headers["retry-after"]) >= 1
            assert int(response.headers["retry-after-ms"]) > 0
            assert response.json() == {
                "error": {
                    "message": response.json()["error"]["message"],
                    "type": "api_error",
                    "param": None,
                    "code": "rate_limit_unavailable",
                }
            }
        assert max(timings[1:]) < LATENCY_BUDGET, timings
        assert reached_upstream(upstream, marker) == 1  # a refusal never reaches it
        degraded = limits_state(gateway)
        assert degraded["degraded_decisions"] >= 8
        assert degraded["redis_errors"] >= 3  # breaker_failures: 3 in a row open the breaker
        assert degraded["breaker"] == "open"
        # What failed and when; never its text (which names the host) to anyone who asks.
        last_error = degraded["last_error"]
        assert last_error["type"] == "ConnectionError"
        assert abs(last_error["at"] - time.time()) < 60
        assert set(last_error) == {"type", "at"}

        redis_server.start()  # same port, empty: a fresh bucket of 3
        # 'closed' admits only what Redis admits: the first 200 means Redis answers again.
        recovered = poll_until(client, gateway, SHARED, marker, 200)
        assert remaining(recovered.headers, "requests") == 2
        assert remaining(chat(client, gateway, SHARED, marker).headers, "requests") == 1
        assert remaining(chat(client, gateway, SHARED, marker).headers, "requests") == 0
        assert_rate_limit_error(chat(client, gateway, SHARED, marker), "requests")
        assert limits_state(gateway)["breaker"] == "closed"
    assert reached_upstream(upstream, marker) == 4


def test_redis_down_with_on_failure_open_admits_everything_fast_and_recovers(
    upstream: FakeUpstream, redis_server: RedisServer, client: httpx.Client
) -> None:
    marker = new_marker()
    with redis_gateway(upstream, redis_server, "open") as gateway:
        assert [chat(client, gateway, SHARED, marker).status_code for _ in range(4)] == [
            200,
            200,
            200,
            429,
        ]
        redis_server.stop()

        timings = []
        for _ in range(8):  # all over the limit, all admitted
            response, elapsed = timed_chat(client, gateway, SHARED, marker)
            timings.append(elapsed)
            assert response.status_code == 200, response.text
        assert max(timings[1:]) < LATENCY_BUDGET, timings
        assert reached_upstream(upstream, marker) == 3 + 8
        assert limits_state(gateway)["degraded_decisions"] >= 8

        redis_server.start()
        # 'open' never refuses on its own: a 429 means Redis counts again.
        refused = poll_until(client, gateway, SHARED, marker, 429)
        assert refused.headers["x-ratelimit-limit-requests"] == "3"
        assert_rate_limit_error(refused, "requests")
        assert_rate_limit_error(chat(client, gateway, SHARED, marker), "requests")


def test_redis_down_with_on_failure_local_enforces_per_process_buckets_then_shares_again(
    upstream: FakeUpstream, redis_server: RedisServer, client: httpx.Client
) -> None:
    marker = new_marker()
    a = redis_gateway(upstream, redis_server, "local")
    b = redis_gateway(upstream, redis_server, "local")
    with running(a, b):
        # Shared while Redis is up: three between the two gateways.
        assert [chat(client, g, SHARED, marker).status_code for g in (a, b, a, b)] == [
            200,
            200,
            200,
            429,
        ]
        redis_server.stop()

        for gateway in (a, b):
            timings = []
            statuses = []
            for key in (SHARED, UNSHARED) * 5:
                response, elapsed = timed_chat(client, gateway, key, marker)
                timings.append(elapsed)
                statuses.append(response.status_code)
                if response.status_code == 429:
                    assert_rate_limit_error(response, "requests")
            # Dead Redis: each process decides alone. The key Redis had drained stays drained
            # (each gateway continues from the level Redis last reported to it); a key Redis
            # never saw gets a full bucket of 3 in each process, enforced.
            assert statuses[0::2] == [429] * 5
            assert statuses[1::2] == [200, 200, 200, 429, 429]
            assert max(timings[1:]) < LATENCY_BUDGET, timings
            assert limits_state(gateway)["degraded_decisions"] >= 10
        assert reached_upstream(upstream, marker) == 3 + 3 + 3

        redis_server.start()
        # Both local buckets are empty, so a 200 now can only come from Redis (a fresh 3).
        recovered_a = poll_until(client, a, SHARED, marker, 200)
        recovered_b = poll_until(client, b, SHARED, marker, 200)
        assert remaining(recovered_a.headers, "requests") == 2
        assert remaining(recovered_b.headers, "requests") == 1  # counted together again
        assert remaining(chat(client, a, SHARED, marker).headers, "requests") == 0
        assert_rate_limit_error(chat(client, b, SHARED, marker), "requests")
    assert reached_upstream(upstream, marker) == 9 + 3


def test_a_hung_redis_costs_a_few_timeouts_then_nothing_while_the_breaker_is_open(
    upstream: FakeUpstream, redis_server: RedisServer, client: httpx.Client
) -> None:
    marker = new_marker()
    process = redis_server.process
    assert process is not None
    with redis_gateway(upstream, redis_server, "local", timeout_ms=50) as gateway:
        assert chat(client, gateway, SHARED, marker).status_code == 200
        process.send_signal(signal.SIGSTOP)  # connections stay open; nothing answers
        try:
            timings = [timed_chat(client, gateway, SHARED, marker)[1] for _ in range(8)]
        finally:
            process.send_signal(signal.SIGCONT)
        # The first three Redis calls (breaker_failures) wait out the 50 ms timeout; the
        # breaker spares the others. Each request makes two: its admission, and after its
        # response its settlement (usage accounting is on by default), off the response's
        # path: two requests wait, and the breaker is open before the third.
        assert all(0.04 <= t < 0.5 for t in timings[:2]), timings
        assert max(timings[2:]) < LATENCY_BUDGET, timings
        limits = limits_state(gateway)
        assert limits["redis_errors"] >= 3
        assert limits["last_error"]["type"] == "TimeoutError"


# -- Redis Cluster -------------------------------------------------------------------------------

CLUSTERED = Key("clustered", "{requests_per_minute: 1, request_burst: 5}")


def test_a_gateway_on_a_redis_cluster_enforces_a_request_limit_exactly(
    upstream: FakeUpstream, redis_cluster: list[RedisServer], client: httpx.Client
) -> None:
    marker = new_marker()
    # on_failure: closed, so a decision made without the cluster would show as a 503 rather
    # than pass for an exact count; a generous timeout for the client's first slot discovery.
    extra = redis_section(redis_cluster[0].url, "closed", timeout_ms=2000, cluster=True)
    config = limits_config(upstream, [CLUSTERED], extra=extra)
    gateways = [GatewayProcess(config, env=ENV) for _ in range(2)]
    with running(*gateways):
        statuses = [chat(client, gateways[i % 2], CLUSTERED, marker).status_code for i in range(8)]
        assert [limits_state(g)["degraded_decisions"] for g in gateways] == [0, 0]
    assert statuses == [200] * 5 + [429] * 3
    assert reached_upstream(upstream, marker) == 5
    bucket = f"rl:{{k:{CLUSTERED.redis_id}}}:rpm"
    with RedisCluster.from_url(redis_cluster[0].url) as store:
        assert store.exists(bucket) == 1


def test_an_upstream_error_without_usage_refunds_the_reservation(
    local_gateway: GatewayProcess, client: httpx.Client
) -> None:
    marker = new_marker()
    failed = client.post(
        local_gateway.url + "/v1/chat/completions",
        json={"model": "gpt-fake", "messages": MESSAGES, "max_tokens": BIG_MAX_TOKENS},
        headers={
            "authorization": f"Bearer {UPSTREAM_ERROR.secret}",
            MARKER: marker,
            "x-fake-status": "500",
        },
    )
    assert failed.status_code == 500  # the upstream's own error, unchanged
    reserved = 100_000 - remaining(failed.headers, "tokens")
    assert reserved > BIG_MAX_TOKENS
    time.sleep(SETTLE_PAUSE)
    after = chat(client, local_gateway, UPSTREAM_ERROR, marker, max_tokens=BIG_MAX_TOKENS)
    # The upstream generated nothing: the first reservation came back in full.
    assert remaining(after.headers, "tokens") == 100_000 - reserved
