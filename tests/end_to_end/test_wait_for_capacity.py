"""Waiting for capacity across replicas (issue #12): four ``gateway serve`` processes, one Redis.

One key allows 10 requests per second (600 per minute, a burst of 1) and ``max_wait: 3``. Slots
are judged on Redis' own clock: before each test drives the gateways, the test empties the key's
bucket in Redis at a Redis time ``T`` it reads back (as an earlier request taking the burst
would), so slot ``k`` (from 1) is exactly ``T + 100 ms * k`` whoever asks for it, and the fake
upstream's arrival times (this process' monotonic clock, moved onto the wall clock Redis' ``TIME``
reads) can be held against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
import redis

from tests.limits.conftest import RedisServer
from tests.limits.test_gateway_limits import (
    ENV,
    MARKER,
    MESSAGES,
    Key,
    limits_config,
    redis_section,
    running,
)
from tests.support.fakeupstream import FakeUpstream, RecordedRequest
from tests.support.gatewayproc import GatewayProcess
from tests.support.rawhttp import connect

GATEWAYS = 4
REQUESTS = 50
MAX_WAIT_MS = 3000
QUEUED = Key("queued", "{requests_per_minute: 600, request_burst: 1, max_wait: 3}")  # 100 ms
LEAVER = Key("leaver", "{requests_per_minute: 60, request_burst: 1, max_wait: 3}")  # 1000 ms
WARMUP = Key("warmup", "{requests_per_minute: 0}")  # always refused: opens the connections
REQUEST_ID = "x-wait-test-id"
# Our clocks against Redis': both read the same kernel clock, so only rounding and any slew of
# the wall clock over a few seconds separate them.
CLOCKS_MS = 2.0
# How late after its slot a request may reach the upstream: the gateway's sleep starts when
# Redis' reply is read (later than Redis decided, by the load of 50 requests landing at once on
# two cores), then the relay to the fake upstream.
LATE_MS = 60.0
# Consecutive arrivals at the upstream are a slot (100 ms) apart, less this much jitter.
GAP_MS = 25.0

# Empty a bucket now, at Redis' clock: level 0, written as the limiter's script writes it.
_DRAIN = """
local clock = redis.call('TIME')
local now = string.format('%.3f', tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000)
redis.call('HSET', KEYS[1], 'v', '0', 't', now)
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return now
"""


@dataclass(frozen=True)
class Stack:
    gateways: list[GatewayProcess]
    redis: redis.Redis
    upstream: FakeUpstream


@pytest.fixture(scope="module")
def stack(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    server = RedisServer(Path(tmp_path_factory.mktemp("wait-redis")))
    server.start()
    try:
        # A generous timeout: this is about exactness; on_failure closed makes any degraded
        # decision a visible 503 instead of a silently per-process one.
        extra = redis_section(server.url, "closed", timeout_ms=2000)
        config = limits_config(upstream, [QUEUED, LEAVER, WARMUP], extra=extra)
        gateways = [GatewayProcess(config, env=ENV) for _ in range(GATEWAYS)]
        client = redis.Redis.from_url(server.url)
        with running(*gateways), contextlib.closing(client):
            yield Stack(gateways, client, upstream)
    finally:
        server.stop()


def bucket(key: Key) -> str:
    return f"rl:{{k:{key.redis_id}}}:rpm"


def drain(stack: Stack, key: Key, ttl_ms: int) -> float:
    """Empty ``key``'s requests bucket; the Redis time (ms) it was emptied at."""
    return float(stack.redis.eval(_DRAIN, 1, bucket(key), ttl_ms))


def stored(stack: Stack, key: Key) -> tuple[float, float]:
    """``key``'s requests bucket as stored: its level, and the Redis time (ms) of that level.
    Its debt is paid back (the last slot handed out) at ``time - level / rate``."""
    level, at = stack.redis.hmget(bucket(key), ["v", "t"])
    assert level is not None, "the bucket expired"
    assert at is not None
    return float(level), float(at)


def wall_offset_ms() -> float:
    """What to add to ``time.monotonic()`` (in ms) to read the wall clock Redis' TIME reads."""
    return (time.time() - time.monotonic()) * 1000


def arrivals(stack: Stack, marker: str) -> dict[str, RecordedRequest]:
    found: dict[str, RecordedRequest] = {}
    for record in stack.upstream.requests:
        if record.header(MARKER) == marker:
            ident = record.header(REQUEST_ID)
            assert ident is not None
            assert ident not in found, f"request {ident} reached the upstream twice"
            found[ident] = record
    return found


def body(key: Key, marker: str, ident: str) -> tuple[bytes, dict[str, str]]:
    headers = {
        "authorization": f"Bearer {key.secret}",
        "content-type": "application/json",
        MARKER: marker,
        REQUEST_ID: ident,
    }
    return orjson.dumps({"model": "gpt-fake", "messages": MESSAGES}), headers


async def burst(stack: Stack, key: Key, marker: str) -> tuple[dict[str, httpx.Response], float]:
    """``REQUESTS`` requests at once, spread over the gateways; the responses by request id, and
    the Redis time the bucket was emptied at just before. A first round with an always-refused
    key opens every connection, so the counted round starts on equal terms."""
    limits = httpx.Limits(max_connections=REQUESTS)
    clients = [httpx.AsyncClient(base_url=g.url, timeout=30, limits=limits) for g in stack.gateways]

    async def round_of(key: Key, marker: str) -> list[httpx.Response]:
        sends = []
        for i in range(REQUESTS):
            content, headers = body(key, marker, str(i))
            client = clients[i % len(clients)]
            sends.append(client.post("/v1/chat/completions", content=content, headers=headers))
        return await asyncio.gather(*sends)

    try:
        assert {r.status_code for r in await round_of(WARMUP, marker + "-warmup")} == {429}
        emptied = drain(stack, key, 200)
        responses = await round_of(key, marker)
    finally:
        for client in clients:
            await client.aclose()
    return {str(i): r for i, r in enumerate(responses)}, emptied


def test_fifty_requests_at_once_wait_for_exactly_the_slots_within_max_wait(stack: Stack) -> None:
    marker = uuid.uuid4().hex
    offset = wall_offset_ms()
    started = time.monotonic()
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(burst(stack, QUEUED, marker))
        # Once every request has been decided (well within a second) the bucket holds the last
        # debit: read it before it expires, a few seconds on.
        loop.run_until_complete(asyncio.sleep(1.0))
        level, at = stored(stack, QUEUED)
        responses, emptied = loop.run_until_complete(task)
    finally:
        loop.close()
    elapsed = time.monotonic() - started

    admitted = {i for i, r in responses.items() if r.status_code == 200}
    refused = {i for i, r in responses.items() if r.status_code == 429}
    assert admitted | refused == set(responses), {r.status_code for r in responses.values()}
    n = len(admitted)

    # Exactly the ones that fit: Redis' own answers put every refusal's slot more than max_wait
    # away, and every admission waited no more than max_wait (plus the timer's lateness).
    for i in refused:
        assert int(responses[i].headers["retry-after-ms"]) > MAX_WAIT_MS, i
    waits = sorted(int(responses[i].headers.get("x-gateway-queue-wait-ms", 0)) for i in admitted)
    assert waits[-1] <= MAX_WAIT_MS + LATE_MS, waits
    # The bucket's last state, on Redis' clock: its debt is paid back at T + 100 ms * n, so the
    # n admissions took the n slots after T, none twice, none skipped; the last of them fit
    # within max_wait of its own arrival (at); and slots T + 100 ms .. T + 3 s are within
    # max_wait of any arrival after T, so at least those 30 were taken. (A 31st fits only if
    # the requests reach Redis over more than 100 ms; here they come within tens of ms.)
    assert at - level * 100 == pytest.approx(emptied + 100 * n, abs=0.01), (level, at, emptied)
    assert emptied + 100 * n <= at + MAX_WAIT_MS, (n, at - emptied)
    assert n >= MAX_WAIT_MS // 100

    # The upstream saw each admitted request once, each no earlier than its slot and close to
    # it: the k-th arrival against the k-th slot (each request is at or after its own slot, so
    # the sorted arrivals are at or after the sorted slots).
    seen = arrivals(stack, marker)
    assert set(seen) == admitted
    times = sorted(record.received_at * 1000 + offset for record in seen.values())
    lateness = [t - (emptied + 100 * (k + 1)) for k, t in enumerate(times)]
    assert min(lateness) >= -CLOCKS_MS, lateness
    assert max(lateness) <= LATE_MS, lateness
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 100 - GAP_MS, gaps
    print(  # the figures the report quotes (pytest -s)
        f"\nadmitted {n}, refused {len(refused)}, decided within {at - emptied:.1f} ms of T; "
        f"lateness after slot min {min(lateness):.1f} max {max(lateness):.1f} ms; "
        f"gaps min {min(gaps):.1f} max {max(gaps):.1f} ms; waits {waits[0]}..{waits[-1]} ms; "
        f"test {elapsed:.2f} s"
    )


def raw_request(key: Key, marker: str, ident: str) -> bytes:
    content, headers = body(key, marker, ident)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\n{head}"
        f"content-length: {len(content)}\r\n\r\n"
    ).encode() + content


def access_records(gateway: GatewayProcess, marker_key: Key) -> list[dict[str, object]]:
    return [
        record
        for record in map(json.loads, re.findall(r"^\{.*\}$", gateway.logs(), re.M))
        if record.get("key") == marker_key.name
    ]


def test_a_client_that_leaves_while_waiting_frees_its_slot(stack: Stack) -> None:
    marker = uuid.uuid4().hex
    first, second = stack.gateways[0], stack.gateways[1]
    offset = wall_offset_ms()
    emptied = drain(stack, LEAVER, 3000)  # slot 1 is at T + 1000 ms, slot 2 at T + 2000 ms

    # A asks through one gateway, gets slot 1 and waits for it; 300 ms on, it hangs up.
    with connect(first.port) as sock:
        sock.sendall(raw_request(LEAVER, marker, "leaver"))
        time.sleep(0.3)
        level, at = stored(stack, LEAVER)
        assert at - level * 1000 == pytest.approx(emptied + 1000, abs=0.01), "A holds slot 1"
    time.sleep(0.2)  # its gateway notices, and gives the slot back
    level, _ = stored(stack, LEAVER)
    assert level >= 0, "slot 1 given back: no one is scheduled on the bucket"

    # B, sent after A left, through another gateway: it gets slot 1, not slot 2.
    content, headers = body(LEAVER, marker, "next")
    sent = time.monotonic() * 1000 + offset
    response = httpx.post(
        second.url + "/v1/chat/completions", content=content, headers=headers, timeout=10
    )
    assert response.status_code == 200, response.text
    seen = arrivals(stack, marker)
    assert set(seen) == {"next"}  # A never reached the upstream
    arrived = seen["next"].received_at * 1000 + offset
    slot = emptied + 1000
    assert slot - CLOCKS_MS <= arrived <= slot + LATE_MS, (arrived - emptied, sent - emptied)
    waited = int(response.headers["x-gateway-queue-wait-ms"])
    # From its decision (after it was sent, by the time to connect and be read) to slot 1.
    assert slot - sent - LATE_MS <= waited <= slot - sent + CLOCKS_MS, (waited, slot - sent)

    # The wait shows in the access log (A's line says it left) and in the metrics.
    deadline = time.monotonic() + 5
    while not (left := access_records(first, LEAVER)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(left) == 1, left
    assert left[0].get("client_gone") is True
    # From its decision to the hang-up 300 ms after it was sent; well before its slot.
    assert 200 <= int(left[0]["queue_wait_ms"]) <= 300 + LATE_MS  # type: ignore[call-overload]
    scraped = httpx.get(second.url + "/metrics", timeout=5).text
    count = re.search(r'^gateway_queue_wait_seconds_count\{route="chat"\} (\S+)$', scraped, re.M)
    assert count is not None
    assert float(count.group(1)) >= 1
    print(
        f"\nB sent at T+{sent - emptied:.0f} ms, reached the upstream at "
        f"T+{arrived - emptied:.1f} ms (slot 1: T+1000), waited {waited} ms; "
        f"A waited {left[0]['queue_wait_ms']} ms before leaving"
    )
