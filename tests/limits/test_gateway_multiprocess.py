"""Exact admissions from four ``gateway serve`` processes sharing one key through one Redis.

``test_multiprocess.py`` shows it for the limiter alone; this shows it for the whole gateway: the
HTTP front, the planner, the relay and the fake upstream's record of what got through.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx

from tests.support.fakeupstream import FakeUpstream
from tests.support.gatewayproc import GatewayProcess

from .conftest import RedisServer
from .test_gateway_limits import (
    ENV,
    MARKER,
    MESSAGES,
    Key,
    limits_config,
    reached_upstream,
    redis_section,
    running,
)

BURST = 20
PER_SECOND = 1
HAMMERED = Key("hammered", f"{{requests_per_minute: {PER_SECOND * 60}, request_burst: {BURST}}}")
# Never admitted: its round opens the connections without a single request going upstream.
WARMUP = Key("warmup", "{requests_per_minute: 0}")
GATEWAYS = 4
REQUESTS = 200


async def fire(gateways: list[GatewayProcess], marker: str) -> tuple[list[int], float]:
    """All requests at once, spread evenly over the gateways; their statuses and the time taken.

    A first round with a key that is always refused opens every connection (client to gateway,
    gateway to Redis) so that in the counted round the four processes contend on equal terms."""
    limits = httpx.Limits(max_connections=REQUESTS)
    clients = [httpx.AsyncClient(base_url=g.url, timeout=30, limits=limits) for g in gateways]

    async def round_of(key: Key) -> list[int]:
        headers = {"authorization": f"Bearer {key.secret}", MARKER: marker}
        body = {"model": "gpt-fake", "messages": MESSAGES}
        responses = await asyncio.gather(
            *(
                clients[i % len(clients)].post("/v1/chat/completions", json=body, headers=headers)
                for i in range(REQUESTS)
            )
        )
        return [r.status_code for r in responses]

    try:
        assert set(await round_of(WARMUP)) == {429}
        started = time.monotonic()
        statuses = await round_of(HAMMERED)
        elapsed = time.monotonic() - started
    finally:
        for client in clients:
            await client.aclose()
    return statuses, elapsed


def test_four_gateway_processes_never_admit_more_than_the_bucket_allows(
    upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    # A generous Redis timeout: this is about exactness, and a degraded decision (a 503 with
    # on_failure: closed) would be visible, never silently counted per process.
    extra = redis_section(redis_server.url, "closed", timeout_ms=2000)
    config = limits_config(upstream, [HAMMERED, WARMUP], extra=extra)
    gateways = [GatewayProcess(config, env=ENV) for _ in range(GATEWAYS)]
    marker = uuid.uuid4().hex
    with running(*gateways):
        statuses, elapsed = asyncio.run(fire(gateways, marker))
    admitted = statuses.count(200)
    assert statuses.count(429) == REQUESTS - admitted, sorted(set(statuses))
    # The burst, plus what refilled while the requests were being decided, and no more.
    assert BURST <= admitted <= BURST + PER_SECOND * elapsed + 1, (admitted, elapsed)
    assert reached_upstream(upstream, marker) == admitted
