"""A Redis timeout measures Redis, never the gateway's own event loop.

A gateway busy with a burst of requests, or short of CPU, runs its event loop late: a reply can
sit unread in the socket long past the deadline. Such a reply is Redis answering in time, and
the call must succeed. Only a reply that has not reached the socket by the deadline times out.

The tests make the loop late the way a busy gateway does, by keeping it from running
(``time.sleep`` in a callback stands for CPU work), and make Redis slow by pausing it
(``CLIENT PAUSE``). They run on both loops the gateway may use: uvloop (``gateway serve``), which
runs due timers before it reads sockets, and asyncio's own, which reads first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest
import uvloop
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config.model import RedisSettings
from gateway.limits import RedisLimiter, build_limiter
from gateway.limits.resp import RespClient

from .conftest import RedisServer
from .factories import limits, make_key, plan_for

T = TypeVar("T")

TIMEOUT = 0.05
BUSY = 0.2  # the loop is held up four times the timeout
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}
loops = pytest.mark.parametrize("loop", sorted(LOOPS))


def run(loop: str, scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(scenario())


async def pause_redis(url: str, ms: int) -> None:
    """Hold every client's commands in Redis for ``ms`` milliseconds, from now."""
    admin = RespClient(url)
    try:
        assert await admin.execute_command("CLIENT", "PAUSE", ms, "ALL") == b"OK"
    finally:
        await admin.aclose()


async def sent_then_busy(call: Awaitable[T]) -> T:
    """Start ``call``, let it send its command, then keep the loop busy while Redis answers."""
    task: asyncio.Future[T] = asyncio.ensure_future(call)
    for _ in range(3):  # enough turns for redis-py, too, to write its command
        await asyncio.sleep(0)
    assert not task.done()  # Redis is paused: nothing can have come back yet
    time.sleep(BUSY)
    return await task


@loops
def test_a_reply_that_waited_in_the_socket_while_the_loop_was_busy_is_not_a_timeout(
    redis_server: RedisServer, loop: str
) -> None:
    async def scenario() -> Any:
        client = RespClient(redis_server.url)
        try:
            await client.call(("PING",), TIMEOUT)  # connected
            await pause_redis(redis_server.url, 20)  # it answers 20 ms after the call
            return await sent_then_busy(client.call(("ECHO", "on time"), TIMEOUT))
        finally:
            await client.aclose()

    assert run(loop, scenario) == b"on time"


@loops
def test_a_connection_made_while_the_loop_was_busy_is_not_a_timeout(
    redis_server: RedisServer, loop: str
) -> None:
    async def scenario() -> Any:
        client = RespClient(redis_server.url)
        try:
            call = asyncio.ensure_future(client.call(("PING",), TIMEOUT))
            await asyncio.sleep(0)  # the connection attempt is under way
            time.sleep(BUSY)
            return await call
        finally:
            await client.aclose()

    assert run(loop, scenario) == b"PONG"


@loops
def test_a_redis_that_has_not_answered_by_the_deadline_times_out_at_once_after_a_busy_loop(
    redis_server: RedisServer, loop: str
) -> None:
    async def scenario() -> float:
        client = RespClient(redis_server.url)
        try:
            await client.call(("PING",), TIMEOUT)
            await pause_redis(redis_server.url, 1000)
            call = asyncio.ensure_future(client.call(("PING",), TIMEOUT))
            await asyncio.sleep(0)
            time.sleep(BUSY)
            busy_ended = time.perf_counter()
            with pytest.raises(RedisTimeoutError, match="within 50 ms"):
                await call
            return time.perf_counter() - busy_ended
        finally:
            await client.aclose()

    # The deadline passed while the loop was busy; the socket is empty, so the verdict comes on
    # the loop's first look, not a timeout later.
    assert run(loop, scenario) < TIMEOUT


@loops
def test_a_slow_redis_times_out_after_the_timeout(redis_server: RedisServer, loop: str) -> None:
    async def scenario() -> float:
        client = RespClient(redis_server.url)
        try:
            await client.call(("PING",), TIMEOUT)
            await pause_redis(redis_server.url, 1000)
            started = time.perf_counter()
            with pytest.raises(RedisTimeoutError):
                await client.call(("PING",), TIMEOUT)
            return time.perf_counter() - started
        finally:
            await client.aclose()

    # libuv keeps time in whole milliseconds, so under uvloop a deadline may fire up to 1 ms
    # before the float it was set from (measured: 49.45 ms for 50).
    assert TIMEOUT - 0.001 <= run(loop, scenario) < 2 * TIMEOUT


@loops
@pytest.mark.parametrize("client", ["redis://", "redis-py"])
def test_the_limiter_decides_with_redis_however_late_the_loop(
    redis_server: RedisServer, loop: str, client: str
) -> None:
    # redis:// uses the lean client, which looks at the socket; redis-py (rediss://, unix://,
    # Cluster) gets a few loop turns of grace past the deadline to read a waiting reply.
    plan = plan_for(make_key("demo", limits=limits(60, request_burst=3)))

    async def scenario() -> tuple[list[bool], int, int]:
        if client == "redis://":
            limiter = build_limiter(RedisSettings(url=redis_server.url, timeout_ms=50))
            assert isinstance(limiter, RedisLimiter)
        else:
            limiter = RedisLimiter(Redis.from_url(redis_server.url), timeout=TIMEOUT)
        try:
            assert not (await limiter.admit(plan)).degraded  # connected, script loaded
            decisions = []
            for _ in range(3):
                await pause_redis(redis_server.url, 20)
                decisions.append(await sent_then_busy(limiter.admit(plan)))
            assert not any(d.degraded for d in decisions), limiter.stats
            return (
                [d.allowed for d in decisions],
                limiter.stats.redis_errors,
                limiter.stats.degraded,
            )
        finally:
            await limiter.aclose()

    assert run(loop, scenario) == ([True, True, False], 0, 0)
