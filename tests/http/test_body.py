"""The request body: the per-process budget of body bytes held in memory."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from gateway import errors
from gateway.http.body import BodyBudget
from tests.conftest import DEMO_KEY, UPSTREAM_KEY, gateway_config
from tests.server.test_protocol import CHAT, CHAT_BODY
from tests.support.admin import admin_get
from tests.support.fakeupstream import FakeUpstream
from tests.support.gatewayproc import GatewayProcess
from tests.support.rawhttp import connect, read_all


async def test_bodies_that_fit_take_their_bytes_at_once_and_give_them_back() -> None:
    budget = BodyBudget(100, wait=1)
    lease = budget.lease()
    await lease.reserve(60)
    await lease.reserve(40)
    assert budget.available == 0
    lease.release()
    lease.release()  # releasing twice gives nothing twice
    assert budget.available == 100


async def test_a_body_that_does_not_fit_waits_for_room() -> None:
    budget = BodyBudget(100, wait=5)
    first = budget.lease()
    await first.reserve(80)
    second = budget.lease()
    waiting = asyncio.ensure_future(second.reserve(50))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    first.release()
    await asyncio.wait_for(waiting, 1)
    assert budget.available == 50


async def test_a_body_that_waits_too_long_gets_503_and_holds_nothing() -> None:
    budget = BodyBudget(100, wait=0.1)
    held = budget.lease()
    await held.reserve(100)
    late = budget.lease()
    started = time.monotonic()
    with pytest.raises(errors.GatewayError) as refused:
        await late.reserve(1)
    assert (refused.value.status, refused.value.code) == (503, "server_busy")
    assert 0.09 < time.monotonic() - started < 0.5
    assert late.held == 0
    held.release()
    assert budget.available == 100


async def test_waiters_are_served_first_come_first_served() -> None:
    budget = BodyBudget(100, wait=5)
    holder = budget.lease()
    await holder.reserve(100)
    order: list[str] = []

    async def wait(name: str, size: int) -> None:
        await budget.lease().reserve(size)
        order.append(name)

    big = asyncio.ensure_future(wait("big", 90))
    await asyncio.sleep(0)
    small = asyncio.ensure_future(wait("small", 10))
    await asyncio.sleep(0.05)
    holder.release()
    await asyncio.wait_for(asyncio.gather(big, small), 1)
    assert order == ["big", "small"]


async def test_a_cancelled_waiter_leaves_the_queue_and_lets_others_in() -> None:
    budget = BodyBudget(100, wait=5)
    holder = budget.lease()
    await holder.reserve(50)
    blocked = asyncio.ensure_future(budget.lease().reserve(80))
    await asyncio.sleep(0.01)
    behind = asyncio.ensure_future(budget.lease().reserve(30))
    await asyncio.sleep(0.01)
    blocked.cancel()
    await asyncio.wait_for(behind, 1)
    assert budget.available == 20


def test_declared_lengths_alone_hold_nothing(budgeted: GatewayProcess) -> None:
    """Heads declaring large bodies, with no body sent, must not pin the budget."""
    head = CHAT + b"Content-Length: 60000\r\n\r\n"
    holders = [connect(budgeted.port) for _ in range(4)]
    try:
        for sock in holders:
            sock.sendall(head)
        time.sleep(0.2)
        served = httpx.post(
            budgeted.url + "/v1/chat/completions", content=CHAT_BODY, headers=AUTH, timeout=5
        )
        assert served.status_code == 200
        bodies = admin_get(budgeted.url, "health")["request_bodies"]
        assert bodies["held_bytes"] == 0
    finally:
        for sock in holders:
            sock.close()


async def test_a_body_larger_than_the_whole_budget_is_refused_at_once() -> None:
    budget = BodyBudget(100, wait=5)
    with pytest.raises(errors.GatewayError):
        await budget.lease().reserve(101)


AUTH = {"authorization": f"Bearer {DEMO_KEY}", "content-type": "application/json"}
BUDGET = """  max_buffered_body_bytes: 131072
  body_buffer_wait: 0.5
"""


@pytest.fixture(scope="module")
def budgeted(upstream: FakeUpstream) -> Iterator[GatewayProcess]:
    config = gateway_config(upstream.base_url).replace("server:\n", "server:\n" + BUDGET, 1)
    with GatewayProcess(config, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as process:
        yield process


def test_bodies_beyond_the_process_budget_wait_then_get_503(budgeted: GatewayProcess) -> None:
    """Two 60 kB bodies sent but for their last 1,000 bytes hold 118 kB of the 128 KiB budget;
    a third waits 0.5 s for room and gets 503, and is served once they finish."""
    size = 60_000
    body = CHAT_BODY + b" " * (size - len(CHAT_BODY))
    head = CHAT + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % size
    holders = [connect(budgeted.port) for _ in range(2)]
    try:
        for sock in holders:
            sock.sendall(head + body[:-1000])
        time.sleep(0.2)
        started = time.monotonic()
        refused = httpx.post(
            budgeted.url + "/v1/chat/completions",
            content=body,
            headers=AUTH,
            timeout=5,
        )
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "server_busy"
        assert 0.4 < time.monotonic() - started < 2
        for sock in holders:
            sock.sendall(body[-1000:])
            data, _ = read_all(sock)
            assert data.startswith(b"HTTP/1.1 200 "), data[:100]
    finally:
        for sock in holders:
            sock.close()
    served = httpx.post(
        budgeted.url + "/v1/chat/completions",
        content=body,
        headers=AUTH,
        timeout=5,
    )
    assert served.status_code == 200
