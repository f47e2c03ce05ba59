"""``/readyz`` and the admin API's health detail follow the upstreams' targets: when no target
of an upstream that traffic reaches is usable, the gateway says so (``endpoints/health.py``),
in /readyz only when ``server.unready_without_targets`` asks for it.

The gateway runs in this test's loop with its lifespan (so its active health checks run as in
production); its pools are stand-ins whose health path answers as the test says.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from gateway.app import Gateway
from gateway.upstream.seam import OutboundRequest
from tests.support.admin import ADMIN_HEADERS, ADMIN_SECTION
from tests.support.standin import Scripted, StandInUpstream, call, in_process_gateway, json_answer

SECRET = "sk-upstream-readiness-secret-0042"
CHECK = "{path: /health, interval: 0.05, timeout: 0.5, unhealthy_after: 1, healthy_after: 1}"
CONFIG = f"""
server: {{access_log: false, unready_without_targets: true}}
upstreams:
  llm:
    targets:
      - {{name: east, base_url: "https://east.llm.test/v1"}}
      - {{name: west, base_url: "https://west.llm.test/v1"}}
    auth: {{style: bearer, key: {SECRET}}}
    health_check: {CHECK}
  backup:
    base_url: "https://backup.llm.test/v1"
    health_check: {CHECK}
  spare:
    base_url: "https://spare.llm.test/v1"
    health_check: {CHECK}
routes:
  - {{name: chat, path: /v1/chat/completions, upstream: llm}}
models:
  big: {{upstream: llm, fallbacks: [{{upstream: backup}}]}}
{ADMIN_SECTION}
"""


class Hosts:
    """Which hosts' health paths answer 500."""

    def __init__(self) -> None:
        self.down: set[str] = set()

    def respond(self, request: OutboundRequest) -> Scripted:
        host = request.url.split("/")[2]
        if request.url.split("?")[0].endswith("/health") and host in self.down:
            return json_answer({"status": "unwell"}, 500)
        return json_answer({"status": "ok"})


@pytest.fixture
def hosts() -> Hosts:
    return Hosts()


@pytest.fixture
async def gateway(hosts: Hosts) -> AsyncIterator[Gateway]:
    async with in_process_gateway(CONFIG, StandInUpstream(hosts.respond)) as app:
        yield app


async def readyz(gateway: Gateway) -> tuple[int, bytes]:
    response = await call(gateway, "GET", "/readyz")
    return response.status, response.body


async def becomes(gateway: Gateway, status: int, within: float = 2.0) -> bytes:
    async with asyncio.timeout(within):
        while True:
            answer, body = await readyz(gateway)
            if answer == status:
                return body
            await asyncio.sleep(0.02)


async def health(gateway: Gateway) -> dict[str, Any]:
    response = await call(gateway, "GET", "/admin/health", headers=list(ADMIN_HEADERS.items()))
    assert response.status == 200
    assert b"llm.test" not in response.body  # names only: no URL, no host
    assert SECRET.encode() not in response.body
    document: dict[str, Any] = response.json()
    return document


async def test_readyz_is_503_no_usable_target_while_every_target_of_a_routed_upstream_is_down(
    gateway: Gateway, hosts: Hosts
) -> None:
    assert await readyz(gateway) == (200, b'{"status":"ready"}')

    hosts.down = {"east.llm.test"}  # one of two: still served
    await asyncio.sleep(0.2)
    assert await readyz(gateway) == (200, b'{"status":"ready"}')
    assert (await health(gateway))["upstreams"]["llm"] == {"usable_targets": 1, "targets": 2}

    hosts.down = {"east.llm.test", "west.llm.test"}
    body = await becomes(gateway, 503)
    assert orjson.loads(body) == {"status": "no_usable_target"}  # a status word, nothing more
    detail = await health(gateway)
    assert detail["status"] == "no_usable_target"
    assert detail["ready"] is False
    assert detail["unusable_upstreams"] == ["llm"]
    assert detail["upstreams"] == {
        "llm": {"usable_targets": 0, "targets": 2},
        "backup": {"usable_targets": 1, "targets": 1},
        "spare": {"usable_targets": 1, "targets": 1},
    }

    hosts.down = {"west.llm.test"}
    assert await becomes(gateway, 200) == b'{"status":"ready"}'
    assert (await health(gateway))["unusable_upstreams"] == []


async def test_only_upstreams_that_routes_models_or_fallbacks_reach_count_for_readiness(
    gateway: Gateway, hosts: Hosts
) -> None:
    hosts.down = {"spare.llm.test"}  # no route or model reaches it
    async with asyncio.timeout(2):
        while (await health(gateway))["upstreams"]["spare"]["usable_targets"]:
            await asyncio.sleep(0.02)
    assert await readyz(gateway) == (200, b'{"status":"ready"}')

    hosts.down = {"spare.llm.test", "backup.llm.test"}  # a model's fallback step
    assert orjson.loads(await becomes(gateway, 503)) == {"status": "no_usable_target"}
    assert (await health(gateway))["unusable_upstreams"] == ["backup"]


async def test_by_default_readyz_stays_ready_and_only_the_detail_names_the_upstream(
    hosts: Hosts,
) -> None:
    config = CONFIG.replace(", unready_without_targets: true", "")
    async with in_process_gateway(config, StandInUpstream(hosts.respond)) as gateway:
        hosts.down = {"east.llm.test", "west.llm.test"}
        async with asyncio.timeout(2):
            while (await health(gateway))["unusable_upstreams"] != ["llm"]:
                await asyncio.sleep(0.02)
        # Every replica sees the same upstream down: all of them leaving the load balancer
        # would turn away the routes to healthy upstreams too.
        assert await readyz(gateway) == (200, b'{"status":"ready"}')
