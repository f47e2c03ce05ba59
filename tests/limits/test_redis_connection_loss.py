"""Losing the connection to Redis: a vanished node is left behind quickly, and one lost
connection is one failure for the breaker, however many calls were on it.

A relay between the limiter and a real redis-server plays the network: it can swallow every
byte without a reset, as a lost node or a partition does, point new connections at another
Redis, as a Service IP does after a failover, and reset every connection, as a restart or a load
balancer does.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config.model import RedisSettings
from gateway.limits import RedisLimiter, build_limiter
from gateway.limits.resp import RespClient

from .conftest import RedisServer
from .factories import limits, make_key, plan_for


class _Link:
    """One client connection through the relay. Once dead it stays dead: a connection to a node
    that vanished does not come back when a new node takes the address."""

    def __init__(self, client: asyncio.StreamWriter, dead: bool) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.dead = dead


class Relay:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.silent = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: list[_Link] = []
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def go_silent(self) -> None:
        """Swallow everything, on every connection and on those made from now on, no reset."""
        self.silent = True
        for link in self._links:
            link.dead = True

    def forward_to(self, port: int) -> None:
        """New connections reach the Redis on ``port``; dead ones stay dead."""
        self.upstream_port = port
        self.silent = False

    def cut(self) -> None:
        """Reset every connection, as a restarting Redis or a load balancer does."""
        for link in self._links:
            link.client.transport.abort()
            if link.upstream is not None:
                link.upstream.transport.abort()

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)  # for stop() to wait for
        link = _Link(writer, self.silent)
        self._links.append(link)
        if link.dead:
            await self._pump(link, reader, None)
            return
        up_reader, link.upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        await asyncio.gather(
            self._pump(link, reader, link.upstream), self._pump(link, up_reader, writer)
        )

    async def _pump(
        self, link: _Link, source: asyncio.StreamReader, sink: asyncio.StreamWriter | None
    ) -> None:
        try:
            while data := await source.read(65536):
                if sink is not None and not link.dead:
                    sink.write(data)
        except OSError:
            pass
        finally:
            if sink is not None:
                sink.close()


@pytest.fixture
async def relay(redis_server: RedisServer) -> AsyncIterator[Relay]:
    relay = Relay(redis_server.port)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop()


async def test_a_connection_gone_silent_is_dropped_and_a_new_redis_answers_within_seconds(
    relay: Relay, tmp_path: Path
) -> None:
    # on_failure=closed: while the limiter clings to a dead connection, every request is a 503.
    limiter = build_limiter(
        RedisSettings(url=relay.url, timeout_ms=50, on_failure="closed", breaker_seconds=0.2)
    )
    assert isinstance(limiter, RedisLimiter)
    plan = plan_for(make_key("demo", limits=limits(6000)))
    fresh = RedisServer(tmp_path / "fresh")
    try:
        assert not (await limiter.admit(plan)).degraded
        relay.go_silent()  # the node is lost without a reset
        for _ in range(10):
            assert (await limiter.admit(plan)).unavailable
            if limiter.breaker_open:
                break
        assert limiter.breaker_open
        fresh.start()
        relay.forward_to(fresh.port)  # the address now leads to a new Redis
        back = time.monotonic()
        while (await limiter.admit(plan)).degraded:
            assert time.monotonic() - back < 2.0, "still stuck on the dead connection"
            await asyncio.sleep(0.02)
        assert limiter.breaker == "closed"
    finally:
        await limiter.aclose()
        fresh.stop()


async def test_a_timeout_while_other_replies_come_in_keeps_the_connection(
    relay: Relay, tmp_path: Path
) -> None:
    # Replies to earlier commands still arriving: Redis is slow, not gone, so the timeout costs
    # that call only, not the connection and the calls pipelined on it.
    slow_redis = RedisServer(tmp_path / "slow", None, "--enable-debug-command", "yes")
    slow_redis.start()
    relay.forward_to(slow_redis.port)
    client = RespClient(relay.url)
    try:
        await client.call(("PING",), 0.05)
        connection = client._connection
        sleeps = []
        for _ in range(4):  # one at a time, so that Redis replies to each as it finishes it
            sleeps.append(asyncio.ensure_future(client.call(("DEBUG", "SLEEP", "0.03"), None)))
            await asyncio.sleep(0.005)
        queued = asyncio.gather(*sleeps)
        with pytest.raises(RedisTimeoutError):  # 50 ms behind 100 ms of sleeps still to go
            await client.call(("PING",), 0.05)
        assert await queued == [b"OK"] * 4
        assert await client.call(("ECHO", "same"), 0.5) == b"same"
        assert client._connection is connection
    finally:
        await client.aclose()
        slow_redis.stop()


async def test_the_socket_asks_the_kernel_to_notice_a_vanished_peer(relay: Relay) -> None:
    client = RespClient(relay.url)
    try:
        await client.call(("PING",), 0.05)
        assert client._connection is not None
        assert client._connection.transport is not None
        sock: socket.socket = client._connection.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        if sys.platform == "linux":
            user_timeout = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
            assert 0 < user_timeout <= 10_000
    finally:
        await client.aclose()


async def test_one_lost_connection_is_one_failure_however_many_calls_were_on_it(
    relay: Relay,
) -> None:
    limiter = build_limiter(
        RedisSettings(url=relay.url, timeout_ms=1000, on_failure="closed")  # breaker_failures=3
    )
    assert isinstance(limiter, RedisLimiter)
    plan = plan_for(make_key("demo", limits=limits(6000)))
    try:
        assert not (await limiter.admit(plan)).degraded
        relay.go_silent()  # holds the next calls in flight
        calls = [asyncio.ensure_future(limiter.admit(plan)) for _ in range(20)]
        await asyncio.sleep(0.05)
        relay.forward_to(relay.upstream_port)
        relay.cut()  # one reset under twenty pipelined calls
        decisions = await asyncio.gather(*calls)
        assert all(d.unavailable for d in decisions)
        assert limiter.stats.redis_errors == 20
        assert (limiter.breaker, limiter.stats.breaker_trips) == ("closed", 0)
        after = await limiter.admit(plan)
        assert not after.degraded
        assert after.allowed
    finally:
        await limiter.aclose()
