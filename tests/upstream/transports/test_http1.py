"""What only ``Http1Client`` (``gateway/upstream/transports/http1.py``) guarantees, beyond the
wire specification every upstream client meets (``test_wire_spec.py``): the exact bytes it
writes, when it drops or retries a connection, its back-pressure and the turns of its pool.

Each case says why it is not part of the specification; none of them is a bug of another client.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.upstream.seam import UpstreamProtocolError, UpstreamResponse
from gateway.upstream.transports.http1 import Http1Client, Http1Response
from tests.support.outbound import fetch, get, outbound, read_all
from tests.support.rawserver import (
    OK,
    RawConnection,
    RawServer,
    answer_each,
    answering,
    drops_the_second_request,
)


def internals(response: UpstreamResponse) -> Http1Response:
    assert isinstance(response, Http1Response)
    return response


MakeClient = Callable[[int], Http1Client]


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    """Clients closed at the end of the test; responses must be released or closed by it."""
    made: list[Http1Client] = []

    def make(max_connections: int = 10) -> Http1Client:
        client = Http1Client(max_connections=max_connections)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()
    for _ in range(3):
        await asyncio.sleep(0)  # aborted transports close their sockets on the next iteration


# -- The request on the wire ---------------------------------------------------------------------


# Its exact bytes: it spells the header names it adds on its own `host` and `content-length`.
# Other clients spell them their own way (aiohttp: `Host`, `Content-Length`), which is as good
# (RFC 9110 §5.1); the specification compares everything else byte for byte.
async def test_a_request_is_written_as_given_target_host_headers_in_order_and_body(
    make_client: MakeClient,
) -> None:
    async with RawServer(answer_each) as server:
        client = make_client(10)
        target = "/v1/some%2Fpath/caf%C3%A9?q=a%20b&empty=&slash=%2F&plus=a+b"
        headers = [
            ("Authorization", "Bearer sk-1"),
            ("x-dup", "1"),
            ("Content-Type", "application/json"),
            ("x-dup", "2"),
        ]
        body = b'{"a": "caf\xc3\xa9"}'
        _, answer = await fetch(
            client, outbound("POST", server.url + target, headers=headers, body=body)
        )
        assert answer == b"ok"
        # The next request on the same connection starts right after the body: nothing extra.
        await fetch(client, get(server.url + "/next"))

    (connection,) = server.connections
    host = f"127.0.0.1:{server.port}".encode()
    assert connection.requests == [
        b"POST " + target.encode() + b" HTTP/1.1\r\n"
        b"host: " + host + b"\r\n"
        b"Authorization: Bearer sk-1\r\n"
        b"x-dup: 1\r\n"
        b"Content-Type: application/json\r\n"
        b"x-dup: 2\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
        b"\r\n" + body,
        b"GET /next HTTP/1.1\r\nhost: " + host + b"\r\n\r\n",
    ]


# Its exact bytes again (see above).
@pytest.mark.parametrize(
    ("method", "length_line"),
    [
        ("POST", b"content-length: 0\r\n"),
        ("PUT", b"content-length: 0\r\n"),
        ("PATCH", b"content-length: 0\r\n"),
        ("GET", b""),
        ("DELETE", b""),
    ],
)
async def test_an_empty_body_is_announced_as_zero_length_only_for_methods_that_carry_one(
    make_client: MakeClient, method: str, length_line: bytes
) -> None:
    async with RawServer(answer_each) as server:
        await fetch(make_client(10), outbound(method, server.url + "/x", headers=[("a", "b")]))
    host = f"127.0.0.1:{server.port}".encode()
    assert server.connections[0].requests == [
        method.encode() + b" /x HTTP/1.1\r\nhost: " + host + b"\r\na: b\r\n" + length_line + b"\r\n"
    ]


# The URL is sent as is, even an empty query. aiohttp (yarl) drops the lone `?`; the
# gateway never builds such a URL (``UpstreamTarget.url`` adds `?` only before a query).
@pytest.mark.parametrize(("suffix", "target"), [("/?", b"/?")])
async def test_a_url_without_a_path_asks_for_the_root(
    make_client: MakeClient, suffix: str, target: bytes
) -> None:
    async with RawServer(answer_each) as server:
        await fetch(make_client(10), get(server.url + suffix))
    assert server.connections[0].requests[0].startswith(b"GET " + target + b" HTTP/1.1\r\n")


# -- Keep-alive ----------------------------------------------------------------------------------


# It holds a connection until the response is released or closed, and close() drops it
# even when the whole body has arrived. aiohttp hands a connection back to its pool as
# soon as the body has arrived, before it is read: close() has nothing left to drop, and
# the exchange was over on the wire (the specification's case: a response released, or
# closed, while the rest of its body is still to come).
async def test_a_response_closed_before_its_end_drops_its_connection(
    make_client: MakeClient,
) -> None:
    big = b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"z" * 100000
    async with RawServer(answering(big)) as server:
        client = make_client(10)
        response = await client.send(get(server.url + "/"))
        assert await response.read_chunk()
        response.close()
        response.close()  # idempotent
        response.release()  # after close: nothing to give back
        second = await client.send(get(server.url + "/"))
        assert len(await read_all(second)) == 100000
        second.release()
        await asyncio.wait_for(server.connections[0].finished.wait(), 2)
    assert len(server.connections) == 2


# -- The retry of a reused connection ------------------------------------------------------------


# Its own rule: a POST with an Idempotency-Key is replayed too. aiohttp replays only
# idempotent methods (the specification's case).
@pytest.mark.parametrize(
    ("method", "headers"),
    [("POST", [("idempotency-key", "k-1")])],
    ids=["idempotency-key"],
)
async def test_a_replayable_request_lost_by_a_reused_connection_is_sent_once_more(
    make_client: MakeClient, method: str, headers: list[tuple[str, str]]
) -> None:
    async with RawServer(drops_the_second_request(lambda: server)) as server:
        client = make_client(1)
        await fetch(client, get(server.url + "/first"))
        request = outbound(method, server.url + "/second", headers=headers, body=b"{}")
        response, body = await fetch(client, request)
    assert (response.status, body) == (200, b"ok")
    first, second = server.connections
    assert len(first.requests) == 2
    assert second.requests == [first.requests[1]]  # the very same bytes, body included


# Its own rule: only a reused connection lost before any byte of the response is retried
# (the keep-alive race, RFC 9112 §9.3.1). aiohttp retries an idempotent request once
# whenever its connection drops, as RFC 9110 §9.2.2 allows; a POST is retried by
# neither (the specification's case).
async def test_a_new_connection_closed_before_the_response_is_a_protocol_error_without_retry(
    make_client: MakeClient,
) -> None:
    async def drops(connection: RawConnection) -> None:
        await connection.read_request()

    async with RawServer(drops) as server:
        with pytest.raises(UpstreamProtocolError):
            await make_client(1).send(get(server.url + "/"))
    assert len(server.connections) == 1


# Its own rule again (see above).
async def test_a_reused_connection_that_dies_after_response_bytes_is_not_retried(
    make_client: MakeClient,
) -> None:
    async def handler(connection: RawConnection) -> None:
        await connection.read_request()
        connection.write(OK)
        await connection.read_request()
        connection.write(b"HTTP/1.1 200 OK\r\ncontent-")

    async with RawServer(handler) as server:
        client = make_client(1)
        await fetch(client, get(server.url + "/"))
        with pytest.raises(UpstreamProtocolError):
            await client.send(get(server.url + "/again"))
    assert len(server.connections) == 1


# -- Back-pressure -------------------------------------------------------------------------------


# Its own buffer: the high-water mark, pause and resume of its transport.
async def test_a_slow_reader_pauses_a_fast_upstream_and_gets_every_byte(
    make_client: MakeClient,
) -> None:
    size = 16 * 1024 * 1024
    payload = hashlib.shake_256(b"back-pressure").digest(size)
    all_written = asyncio.Event()

    async def fast(connection: RawConnection) -> None:
        await connection.read_request()
        connection.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        view = memoryview(payload)
        for start in range(0, size, 64 * 1024):
            connection.writer.write(view[start : start + 64 * 1024])
            await connection.writer.drain()
        all_written.set()
        await answer_each(connection)

    bound = 1024 * 1024  # 256 KiB high-water mark plus at most one socket read past it
    async with RawServer(fast) as server:
        response = await make_client(1).send(get(server.url + "/big"))
        exchange = internals(response)._connection
        await asyncio.sleep(0.2)  # the reader is busy elsewhere; the upstream keeps sending
        assert exchange.paused
        assert 0 < exchange.buffered <= bound
        assert not all_written.is_set()  # the kernel's buffers filled: the upstream waits too
        digest = hashlib.sha256()
        received = 0
        most = exchange.buffered
        while chunk := await response.read_chunk():
            digest.update(chunk)
            received += len(chunk)
            most = max(most, exchange.buffered)
            if received % (1024 * 1024) < len(chunk):
                await asyncio.sleep(0.005)  # still slow now and then
        response.release()
        assert all_written.is_set()
    assert received == size
    assert digest.digest() == hashlib.sha256(payload).digest()
    assert most <= bound


# -- Closing -------------------------------------------------------------------------------------


# A response not yet released keeps its connection busy even when its whole body has
# arrived; aiohttp frees that connection at once (see the keep-alive case above). The
# specification's aclose case has an exchange in progress on the wire.
async def test_aclose_closes_idle_connections_and_drops_busy_ones_when_released(
    make_client: MakeClient,
) -> None:
    async with RawServer(answer_each) as server:
        client = make_client(10)
        busy = await client.send(get(server.url + "/busy"))
        idle_response, _ = await fetch(client, get(server.url + "/idle"))  # a second connection
        assert len(server.connections) == 2
        await client.aclose()
        in_use, idle = server.connections
        await asyncio.wait_for(idle.finished.wait(), 2)
        assert idle.eof  # a clean close, not a reset
        assert not in_use.finished.is_set()  # the exchange in progress is left alone
        assert await read_all(busy) == b"ok"
        busy.release()
        await asyncio.wait_for(in_use.finished.wait(), 2)
    assert in_use.eof
    assert idle_response.status == 200


# -- The turns of the pool -----------------------------------------------------------------------


# A release() wakes the next request waiting for a place; the race is between that wake-up
# and a cancel. With aiohttp the holder's place is free as soon as its body has arrived,
# so the waiter has its turn (and is done) long before the test cancels it.
async def test_a_waiter_cancelled_as_it_is_woken_stops_and_passes_the_turn_on(
    make_client: MakeClient,
) -> None:
    async with RawServer(answer_each) as server:
        client = make_client(1)
        holder = await client.send(get(server.url + "/holder"))
        cancelled = asyncio.create_task(client.send(get(server.url + "/cancelled")))
        patient = asyncio.create_task(fetch(client, get(server.url + "/patient", connect=0.5)))
        await asyncio.sleep(0.05)  # both wait for the only place
        assert await read_all(holder) == b"ok"
        holder.release()  # wakes the first waiter...
        cancelled.cancel()  # ...whose client goes away before it could take its turn
        await asyncio.wait([cancelled])
        if not cancelled.cancelled() and cancelled.exception() is None:
            cancelled.result().close()  # the cancel was swallowed: the request went on
        (outcome,) = await asyncio.gather(patient, return_exceptions=True)
    assert cancelled.cancelled(), "the cancelled request went on"
    assert not isinstance(outcome, BaseException), f"the next waiter got {outcome!r}"
    assert outcome[1] == b"ok"
