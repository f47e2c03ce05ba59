"""The lean Redis client the limiter uses for a single Redis (gateway/limits/resp.py)."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from gateway.limits.resp import RespClient, pack

from .conftest import RedisServer


def test_commands_are_packed_as_resp_arrays_of_bulk_strings() -> None:
    assert pack(("SET", "k", 12, b"\x00v")) == (
        b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n$2\r\n\x00v\r\n"
    )


async def test_replies_match_their_commands_when_pipelined(redis_server: RedisServer) -> None:
    client = RespClient(redis_server.url)
    try:
        await client.execute_command("SET", "a", "1")
        results = await asyncio.gather(
            *(client.execute_command("INCRBY", "a", i) for i in range(1, 51))
        )
        # Each reply belongs to its own command: the running totals, in order.
        assert results == [1 + sum(range(1, i + 1)) for i in range(1, 51)]
        assert await client.execute_command("GET", "a") == b"1276"
    finally:
        await client.aclose()


async def test_a_caller_that_gave_up_does_not_shift_the_replies(redis_server: RedisServer) -> None:
    client = RespClient(redis_server.url)
    try:
        await client.execute_command("SET", "k", "v")
        slow = asyncio.ensure_future(client.execute_command("DEBUG", "SLEEP", "0.2"))
        await asyncio.sleep(0.05)
        slow.cancel()
        # Queued behind the sleep: must get its own reply, not the cancelled one's.
        assert await client.execute_command("GET", "k") == b"v"
    finally:
        await client.aclose()


async def test_error_replies_raise_redis_py_exception_types(redis_server: RedisServer) -> None:
    client = RespClient(redis_server.url)
    try:
        with pytest.raises(NoScriptError):
            await client.execute_command("EVALSHA", "0" * 40, 0)
        with pytest.raises(ResponseError, match="unknown command"):
            await client.execute_command("NOSUCHCOMMAND")
        # The connection is still good after error replies.
        assert await client.execute_command("PING") == b"PONG"
    finally:
        await client.aclose()


async def test_database_is_selected_from_the_url(redis_server: RedisServer) -> None:
    client = RespClient(redis_server.url + "/3")
    try:
        await client.execute_command("SET", "in-db-3", "x")
        assert await client.execute_command("EXISTS", "in-db-3") == 1
    finally:
        await client.aclose()
    other = RespClient(redis_server.url)
    try:
        assert await other.execute_command("EXISTS", "in-db-3") == 0
    finally:
        await other.aclose()


async def test_password_is_sent_with_auth(redis_server: RedisServer) -> None:
    admin = RespClient(redis_server.url)
    try:
        await admin.execute_command("CONFIG", "SET", "requirepass", "s3cret")
    finally:
        await admin.aclose()
    client = RespClient(f"redis://:s3cret@127.0.0.1:{redis_server.port}")
    try:
        assert await client.execute_command("PING") == b"PONG"
        await client.execute_command("CONFIG", "SET", "requirepass", "")
    finally:
        await client.aclose()


async def test_a_lost_connection_fails_pending_calls_and_the_next_call_reconnects(
    redis_server: RedisServer,
) -> None:
    client = RespClient(redis_server.url)
    try:
        assert await client.execute_command("PING") == b"PONG"
        await client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "no")
        await asyncio.sleep(0.05)
        assert await client.execute_command("PING") == b"PONG"
    finally:
        await client.aclose()


async def test_refused_connection_is_a_redis_connection_error() -> None:
    client = RespClient("redis://127.0.0.1:1")
    with pytest.raises(RedisConnectionError):
        await client.execute_command("PING")
    await client.aclose()


def test_only_plain_redis_urls_are_accepted() -> None:
    with pytest.raises(ValueError, match="redis://"):
        RespClient("rediss://127.0.0.1:6379")
