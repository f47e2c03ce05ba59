"""The wire specification of an upstream client: what every client the config can select
(``server.upstream_client``, ``gateway.app.CLIENTS``) does on the wire.

Every test runs once per client, through the seam (``gateway/upstream/seam.py``) only.
Realistic exchanges go to the fake upstream (``tests/support/fakeupstream/``). Protocol edge
cases go to tiny raw servers started in the test on 127.0.0.1 (``tests/support/rawserver.py``):
they record the exact bytes of every request and answer with exact bytes the test chooses, so
nothing between the client and the assertion can normalise what was sent or received. What only
one client guarantees is in that client's own file (``test_http1.py``).

A case that shows a known bug of one client is marked ``bug_in(client, why)``: a strict xfail
for that client alone, which fails again (as an unexpected pass) once the bug is fixed, until
the mark is removed.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import get_args

import orjson
import pytest

from gateway.app import CLIENTS
from gateway.config.settings import ServerSettings
from gateway.upstream.seam import (
    UpstreamClient,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamStreamError,
    UpstreamTimeout,
)
from tests.support import fakeupstream as fake
from tests.support.fakeupstream import FakeUpstream
from tests.support.outbound import chat, fetch, get, outbound, read_all
from tests.support.ports import free_port
from tests.support.rawserver import (
    OK,
    RawConnection,
    RawServer,
    answer_each,
    answering,
    drops_the_second_request,
)

CHAT = {"model": "gpt-fake", "messages": [{"role": "user", "content": "Hello there, fake."}]}
CHAT_STREAM = {**CHAT, "stream": True}

linux_only = pytest.mark.skipif(
    sys.platform != "linux", reason="a hanging connect needs Linux's full-backlog SYN drop"
)

MakeClient = Callable[[int], UpstreamClient]


@pytest.fixture(params=sorted(CLIENTS))
def transport(request: pytest.FixtureRequest) -> str:
    """Each client the config can select, by its name there (``server.upstream_client``)."""
    name: str = request.param
    return name


@pytest.fixture
async def make_client(transport: str) -> AsyncIterator[MakeClient]:
    """Clients closed at the end of the test; responses must be released or closed by it."""
    factory = CLIENTS[transport]
    made: list[UpstreamClient] = []

    def make(max_connections: int = 10) -> UpstreamClient:
        client = factory(max_connections=max_connections)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()
    for _ in range(3):
        await asyncio.sleep(0)  # aborted transports close their sockets on the next iteration


@pytest.fixture(scope="module")
def fake_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


def bug_in(client: str, why: str) -> pytest.MarkDecorator:
    """Run the test for every client, as a strict xfail for ``client``: the case shows a known
    bug of that client, which ``why`` describes."""
    assert client in CLIENTS, client
    return pytest.mark.parametrize(
        "transport",
        [
            pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=f"{client}: {why}"))
            if name == client
            else name
            for name in sorted(CLIENTS)
        ],
    )


def own_names_lowered(request: bytes) -> bytes:
    """``request`` with the names of the header lines a client writes on its own (``host``,
    ``content-length``) lower-cased: field names are case-insensitive (RFC 9110 §5.1) and each
    client spells its own; every other byte stays exactly as it was sent."""
    head, end, body = request.partition(b"\r\n\r\n")
    request_line, *fields = head.split(b"\r\n")
    spelled = []
    for field in fields:
        name, colon, value = field.partition(b":")
        if name.lower() in (b"host", b"content-length"):
            name = name.lower()
        spelled.append(name + colon + value)
    return b"\r\n".join([request_line, *spelled]) + end + body


def test_the_specification_runs_against_every_client_the_config_can_select() -> None:
    names = get_args(ServerSettings.model_fields["upstream_client"].annotation)
    assert set(names) == set(CLIENTS)


# -- The request on the wire ---------------------------------------------------------------------


async def test_a_request_is_written_as_given_but_for_the_spelling_of_the_clients_own_names(
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
    assert [own_names_lowered(request) for request in connection.requests] == [
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


EMPTY_BODIES = [
    ("POST", b"content-length: 0\r\n"),
    ("PUT", b"content-length: 0\r\n"),
    ("PATCH", b"content-length: 0\r\n"),
    ("GET", b""),
    ("DELETE", b""),
]


# RFC 9110 §8.6: a request without content whose method does not anticipate any SHOULD NOT
# carry a Content-Length; the relay sends the client's own framing, and no more.
@pytest.mark.parametrize(("method", "length_line"), EMPTY_BODIES, ids=[m for m, _ in EMPTY_BODIES])
async def test_an_empty_body_is_announced_only_for_methods_that_carry_one(
    make_client: MakeClient, method: str, length_line: bytes
) -> None:
    async with RawServer(answer_each) as server:
        await fetch(make_client(10), outbound(method, server.url + "/x", headers=[("a", "b")]))
    host = f"127.0.0.1:{server.port}".encode()
    assert [own_names_lowered(request) for request in server.connections[0].requests] == [
        method.encode() + b" /x HTTP/1.1\r\nhost: " + host + b"\r\na: b\r\n" + length_line + b"\r\n"
    ]


@pytest.mark.parametrize(("suffix", "target"), [("", b"/"), ("/", b"/"), ("?x=1", b"/?x=1")])
async def test_a_url_without_a_path_asks_for_the_root(
    make_client: MakeClient, suffix: str, target: bytes
) -> None:
    async with RawServer(answer_each) as server:
        await fetch(make_client(10), get(server.url + suffix))
    assert server.connections[0].requests[0].startswith(b"GET " + target + b" HTTP/1.1\r\n")


# -- Response bodies -----------------------------------------------------------------------------


async def test_a_content_length_body_arrives_whole_with_status_and_raw_headers(
    make_client: MakeClient,
) -> None:
    body = b"0123456789" * 1000
    head = (
        b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\nX-Custom: A\r\nx-custom: B\r\n\r\n"
        % len(body)
    )

    async def handler(connection: RawConnection) -> None:
        await connection.read_request()
        connection.write(head + body[:3000])
        await asyncio.sleep(0.01)
        connection.write(body[3000:])
        await connection.wait_eof()

    async with RawServer(handler) as server:
        response, received = await fetch(make_client(10), get(server.url + "/"))
    assert response.status == 201
    assert list(response.raw_headers) == [
        (b"Content-Length", str(len(body)).encode()),
        (b"X-Custom", b"A"),
        (b"x-custom", b"B"),
    ]
    assert received == body


async def test_a_chunked_body_is_handed_over_chunk_by_chunk_as_each_arrives(
    make_client: MakeClient,
) -> None:
    pieces = [b"data: one\r\n\r\n", b"data: two\n\n", b"x" * 5000, b"0\r\n\r\n"]
    sent_at: list[float] = []

    async def handler(connection: RawConnection) -> None:
        await connection.read_request()
        connection.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for piece in pieces:
            await asyncio.sleep(0.05)
            sent_at.append(time.monotonic())
            connection.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        await asyncio.sleep(0.05)
        connection.write(b"0\r\n\r\n")
        await answer_each(connection)

    async with RawServer(handler) as server:
        client = make_client(10)
        response = await client.send(get(server.url + "/stream"))
        chunks: list[bytes] = []
        arrived_at: list[float] = []
        while chunk := await response.read_chunk():
            arrived_at.append(time.monotonic())
            chunks.append(chunk)
        response.release()
        await fetch(client, get(server.url + "/after"))  # the framing was consumed exactly

    assert chunks == pieces  # framing removed, one read per chunk, "0\r\n\r\n" inside data kept
    for index in range(len(pieces) - 1):
        assert arrived_at[index] < sent_at[index + 1], f"chunk {index} waited for the next one"
    assert len(server.connections) == 1


CHUNKED_WITH_TRAILER = (
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n"
    b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc\r\n\r\n"
)


async def test_chunk_extensions_and_trailers_are_not_part_of_the_body(
    make_client: MakeClient,
) -> None:
    async with RawServer(answering(CHUNKED_WITH_TRAILER)) as server:
        client = make_client(10)
        for _ in range(2):  # the trailer section was consumed exactly: the connection is reused
            _, body = await fetch(client, get(server.url + "/"))
            assert body == b"hello world"
    assert len(server.connections) == 1


async def test_a_body_without_length_or_chunking_ends_with_the_connection_which_is_not_reused(
    make_client: MakeClient,
) -> None:
    async def handler(connection: RawConnection) -> None:
        if connection is server.connections[0]:
            await connection.read_request()
            connection.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nfirst part, ")
            await asyncio.sleep(0.02)
            connection.write(b"second part")
            await asyncio.sleep(0.02)
            return  # closing the connection ends the body
        await answer_each(connection)

    async with RawServer(handler) as server:
        client = make_client(10)
        response = await client.send(get(server.url + "/"))
        assert await read_all(response) == b"first part, second part"
        assert await response.read_chunk() == b""  # the end stays the end
        response.release()
        _, body = await fetch(client, get(server.url + "/"))
    assert body == b"ok"
    assert len(server.connections) == 2


async def test_a_gzip_body_is_passed_through_still_compressed(
    make_client: MakeClient, fake_upstream: FakeUpstream
) -> None:
    client = make_client(10)
    payload = orjson.dumps(CHAT)
    response, body = await fetch(client, chat(fake_upstream.url, payload, ("x-fake-gzip", "1")))
    assert response.status == 200
    assert (b"content-encoding", b"gzip") in response.raw_headers
    assert body == gzip.compress(fake.chat_completion_body(CHAT), mtime=0)
    assert gzip.decompress(body) == fake.chat_completion_body(CHAT)


async def test_a_gzip_stream_is_passed_through_still_compressed(
    make_client: MakeClient, fake_upstream: FakeUpstream
) -> None:
    client = make_client(10)
    payload = orjson.dumps(CHAT_STREAM)
    response, body = await fetch(client, chat(fake_upstream.url, payload, ("x-fake-gzip", "1")))
    assert (b"content-encoding", b"gzip") in response.raw_headers
    assert body[:2] == b"\x1f\x8b"
    assert gzip.decompress(body) == b"".join(fake.chat_completion_events(CHAT_STREAM))


async def test_a_stream_from_the_fake_upstream_arrives_byte_for_byte(
    make_client: MakeClient, fake_upstream: FakeUpstream
) -> None:
    payload = orjson.dumps(CHAT_STREAM)
    response, body = await fetch(make_client(10), chat(fake_upstream.url, payload))
    assert response.status == 200
    assert body == b"".join(fake.chat_completion_events(CHAT_STREAM))
    assert fake_upstream.last().body == payload


async def test_a_head_response_has_no_body_even_with_a_content_length(
    make_client: MakeClient,
) -> None:
    async def handler(connection: RawConnection) -> None:
        while (request := await connection.read_request()) is not None:
            if request.startswith(b"HEAD "):
                connection.write(b"HTTP/1.1 200 OK\r\ncontent-length: 12345\r\n\r\n")
            else:
                connection.write(OK)

    async with RawServer(handler) as server:
        client = make_client(10)
        response = await asyncio.wait_for(client.send(outbound("HEAD", server.url + "/")), 2)
        assert response.status == 200
        assert list(response.raw_headers) == [(b"content-length", b"12345")]
        assert await asyncio.wait_for(response.read_chunk(), 1) == b""
        response.release()
        _, body = await fetch(client, get(server.url + "/"))
    assert body == b"ok"


# -- Keep-alive ----------------------------------------------------------------------------------


async def test_sequential_requests_reuse_one_connection(make_client: MakeClient) -> None:
    async with RawServer(answer_each) as server:
        client = make_client(10)
        for path in ("/1", "/2", "/3"):
            _, body = await fetch(client, get(server.url + path))
            assert body == b"ok"
    (connection,) = server.connections
    assert [r.split(b" ")[1] for r in connection.requests] == [b"/1", b"/2", b"/3"]


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nConnection: Close\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
    ],
    ids=["connection-close", "Connection-Close", "http-1.0"],
)
async def test_a_connection_the_server_says_it_will_close_is_not_reused(
    make_client: MakeClient, response: bytes
) -> None:
    # The server keeps its side open: the client must go by the header, not by the EOF.
    async with RawServer(answering(response)) as server:
        client = make_client(10)
        for _ in range(2):
            _, body = await fetch(client, get(server.url + "/"))
            assert body == b"ok"
        await asyncio.wait_for(server.connections[0].finished.wait(), 2)
    assert len(server.connections) == 2
    assert server.connections[0].eof  # the client closed the first one


async def test_a_response_released_before_its_end_drops_its_connection(
    make_client: MakeClient,
) -> None:
    async def handler(connection: RawConnection) -> None:
        if connection is server.connections[0]:
            await connection.read_request()
            connection.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf")
            await connection.wait_eof()
            return
        await answer_each(connection)

    async with RawServer(handler) as server:
        client = make_client(10)
        response = await client.send(get(server.url + "/"))
        assert await response.read_chunk() == b"half"
        response.release()  # misuse: the rest of the body would be read as the next response
        _, body = await fetch(client, get(server.url + "/"))
        assert body == b"ok"
        await asyncio.wait_for(server.connections[0].finished.wait(), 2)
    assert len(server.connections) == 2
    assert server.connections[0].eof


@pytest.mark.parametrize("together", [True, False], ids=["one-write", "two-writes"])
@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n",
    ],
    ids=["100", "103", "100-102"],
)
async def test_interim_responses_before_the_real_one_are_skipped(
    make_client: MakeClient, interim: bytes, together: bool
) -> None:
    final = b"HTTP/1.1 200 OK\r\nx-real: yes\r\ncontent-length: 5\r\n\r\nfinal"

    async def handler(connection: RawConnection) -> None:
        await connection.read_request()
        if together:
            connection.write(interim + final)
        else:
            connection.write(interim)
            await asyncio.sleep(0.02)
            connection.write(final)
        await answer_each(connection)

    async with RawServer(handler) as server:
        client = make_client(10)
        response, body = await fetch(client, outbound("POST", server.url + "/", body=b"{}"))
        assert (response.status, list(response.raw_headers), body) == (
            200,
            [(b"x-real", b"yes"), (b"content-length", b"5")],
            b"final",
        )
        _, body = await fetch(client, get(server.url + "/"))  # and the connection is still good
    assert body == b"ok"
    assert len(server.connections) == 1


# -- The pool limit ------------------------------------------------------------------------------


async def test_the_pool_opens_at_most_max_connections_and_later_requests_wait_their_turn(
    make_client: MakeClient,
) -> None:
    in_flight = 0
    most_in_flight = 0

    async def slow(connection: RawConnection) -> None:
        nonlocal in_flight, most_in_flight
        while await connection.read_request() is not None:
            in_flight += 1
            most_in_flight = max(most_in_flight, in_flight)
            await asyncio.sleep(0.15)
            in_flight -= 1
            connection.write(OK)

    async with RawServer(slow) as server:
        client = make_client(2)
        finished_at: list[float] = []

        async def one(path: str) -> bytes:
            _, body = await fetch(client, get(server.url + path))
            finished_at.append(time.monotonic())
            return body

        bodies = await asyncio.gather(one("/a"), one("/b"), one("/c"))

    assert list(bodies) == [b"ok", b"ok", b"ok"]
    assert len(server.connections) == 2  # the third reused a connection the others gave back
    assert server.peak == 2
    assert most_in_flight == 2
    first_two = sorted(finished_at)[:2]
    assert sorted(finished_at)[2] - max(first_two) >= 0.1  # it was sent only after one ended


async def test_waiting_for_a_free_connection_longer_than_the_connect_timeout_is_a_timeout(
    make_client: MakeClient,
) -> None:
    answer = asyncio.Event()

    async def held(connection: RawConnection) -> None:
        while await connection.read_request() is not None:
            await answer.wait()
            connection.write(OK)

    async with RawServer(held) as server:
        client = make_client(1)
        first = asyncio.create_task(fetch(client, get(server.url + "/held")))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await client.send(get(server.url + "/waits", connect=0.2))
        waited = time.monotonic() - started
        answer.set()
        _, body = await first
        assert body == b"ok"
        _, body = await fetch(client, get(server.url + "/after"))  # the pool still works
    assert 0.18 <= waited < 1.5
    assert len(server.connections) == 1


# -- The retry of a reused connection ------------------------------------------------------------


async def test_a_kept_alive_connection_the_server_closed_is_replaced_transparently(
    make_client: MakeClient,
) -> None:
    async def once(connection: RawConnection) -> None:
        if await connection.read_request() is not None:
            connection.write(OK)  # and close right after the response

    async with RawServer(once) as server:
        client = make_client(1)
        for _ in range(3):
            _, body = await fetch(client, get(server.url + "/"))
            assert body == b"ok"
    assert [len(c.requests) for c in server.connections] == [1, 1, 1]


@pytest.mark.parametrize(
    ("method", "headers"),
    [("PUT", [("a", "1")])],
    ids=["idempotent-method"],
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


async def test_a_post_lost_by_a_reused_connection_is_not_sent_twice(
    make_client: MakeClient,
) -> None:
    """The upstream may have read it: a second POST is a second generation (RFC 9110 §9.2.2)."""
    async with RawServer(drops_the_second_request(lambda: server)) as server:
        client = make_client(1)
        await fetch(client, get(server.url + "/first"))
        with pytest.raises(UpstreamProtocolError):
            await client.send(outbound("POST", server.url + "/second", body=b"{}"))
    assert len(server.connections) == 1


async def test_the_retry_happens_once_only(make_client: MakeClient) -> None:
    async def handler(connection: RawConnection) -> None:
        if connection is server.connections[0]:
            await connection.read_request()
            connection.write(OK)
        await connection.read_request()  # then drop, every time

    async with RawServer(handler) as server:
        client = make_client(1)
        await fetch(client, get(server.url + "/"))
        with pytest.raises(UpstreamProtocolError):
            await client.send(get(server.url + "/again"))
    assert [len(c.requests) for c in server.connections] == [2, 1]


# -- Errors --------------------------------------------------------------------------------------


async def test_a_refused_connection_is_a_connect_error(make_client: MakeClient) -> None:
    client = make_client(1)
    url = f"http://127.0.0.1:{free_port()}/"
    with pytest.raises(UpstreamConnectError):
        await client.send(get(url))
    with pytest.raises(UpstreamConnectError):  # and the failure did not use up the only slot
        await client.send(get(url, connect=0.5))


@linux_only
async def test_a_connect_that_does_not_complete_in_time_is_a_timeout(
    make_client: MakeClient,
) -> None:
    async with RawServer(answer_each, serving=False) as server:
        server.fill_backlog()
        client = make_client(1)
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await client.send(get(server.url + "/", connect=0.2))
        assert 0.18 <= time.monotonic() - started < 1.5
        await server.start_serving()
        _, body = await fetch(client, get(server.url + "/"))  # the slot was given back
    assert body == b"ok"


async def test_a_server_that_never_answers_is_a_timeout_after_the_read_timeout(
    make_client: MakeClient,
) -> None:
    async def silent(connection: RawConnection) -> None:
        await connection.read_request()
        await connection.wait_eof()

    async with RawServer(silent) as server:
        client = make_client(1)
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await client.send(get(server.url + "/", read=0.2))
        elapsed = time.monotonic() - started
        await asyncio.wait_for(server.connections[0].finished.wait(), 2)  # it was closed
    assert 0.18 <= elapsed < 1.5
    assert server.connections[0].eof


@pytest.mark.parametrize(
    "garbage",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: nope\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header line\r\n\r\n",
    ],
    ids=["not-http", "bad-status", "bad-length", "bad-header"],
)
async def test_a_response_that_is_not_http_is_a_protocol_error(
    make_client: MakeClient, garbage: bytes
) -> None:
    async def handler(connection: RawConnection) -> None:
        await connection.read_request()
        connection.write(garbage)
        await connection.wait_eof()

    async with RawServer(handler) as server:
        with pytest.raises(UpstreamProtocolError):
            await asyncio.wait_for(make_client(1).send(get(server.url + "/")), 2)
        await asyncio.wait_for(server.connections[0].finished.wait(), 2)  # and it was closed


async def test_a_connection_cut_mid_stream_is_a_stream_error_after_what_did_arrive(
    make_client: MakeClient, fake_upstream: FakeUpstream
) -> None:
    payload = orjson.dumps(CHAT_STREAM)
    client = make_client(10)
    response = await client.send(chat(fake_upstream.url, payload, ("x-fake-fail-after", "2")))
    assert response.status == 200
    received = b""
    with pytest.raises(UpstreamStreamError):  # noqa: PT012 - every chunk until the failure
        while True:
            received += await response.read_chunk()
    response.close()
    assert received == b"".join(fake.chat_completion_events(CHAT_STREAM)[:2])


async def test_a_content_length_body_cut_short_is_a_stream_error(
    make_client: MakeClient,
) -> None:
    async def handler(connection: RawConnection) -> None:
        await connection.read_request()
        connection.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort")

    async with RawServer(handler) as server:
        response = await make_client(1).send(get(server.url + "/"))
        assert await response.read_chunk() == b"short"
        with pytest.raises(UpstreamStreamError):
            await response.read_chunk()
        response.close()


async def test_silence_after_the_head_longer_than_the_read_timeout_is_a_stream_error(
    make_client: MakeClient,
) -> None:
    async def handler(connection: RawConnection) -> None:
        await connection.read_request()
        connection.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        await connection.wait_eof()

    async with RawServer(handler) as server:
        response = await make_client(1).send(get(server.url + "/", read=0.2))
        assert await response.read_chunk() == b"abc"
        started = time.monotonic()
        with pytest.raises(UpstreamStreamError):
            await response.read_chunk()
        elapsed = time.monotonic() - started
        response.close()
        await asyncio.wait_for(server.connections[0].finished.wait(), 2)
    assert 0.18 <= elapsed < 1.5


async def test_the_read_timeout_bounds_each_silence_not_the_whole_stream(
    make_client: MakeClient, fake_upstream: FakeUpstream
) -> None:
    payload = orjson.dumps(CHAT_STREAM)
    controls = (("x-fake-chunks", "3"), ("x-fake-interval-ms", "80"))
    request = chat(fake_upstream.url, payload, *controls, read=0.3)
    started = time.monotonic()
    _, body = await fetch(make_client(1), request)
    assert time.monotonic() - started > 0.3  # longer in total than the read timeout
    assert body == b"".join(fake.chat_completion_events(CHAT_STREAM, chunks=3))


# -- Closing -------------------------------------------------------------------------------------


async def test_aclose_lets_an_exchange_in_progress_finish_then_closes_its_connection(
    make_client: MakeClient,
) -> None:
    """A reload retires the pool of an upstream it no longer uses while streams on it go on
    (``gateway.app``: "requests in flight finish on the old one")."""
    go_on = asyncio.Event()

    async def handler(connection: RawConnection) -> None:
        await connection.read_request()
        connection.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf-")
        await go_on.wait()
        connection.write(b"done!")
        await connection.wait_eof()

    async with RawServer(handler) as server:
        client = make_client(10)
        response = await client.send(get(server.url + "/"))
        await client.aclose()
        go_on.set()
        assert await read_all(response) == b"half-done!"
        response.release()
        await asyncio.wait_for(server.connections[0].finished.wait(), 2)
    assert server.connections[0].eof


async def test_aclose_closes_the_idle_connections(make_client: MakeClient) -> None:
    async with RawServer(answer_each) as server:
        client = make_client(10)
        await fetch(client, get(server.url + "/"))
        await client.aclose()
        await asyncio.wait_for(server.connections[0].finished.wait(), 2)
    assert server.connections[0].eof


# -- Bugs found while writing this specification -------------------------------------------------


async def test_a_failed_connect_wakes_a_request_waiting_for_its_place(
    make_client: MakeClient,
) -> None:
    client = make_client(1)
    url = f"http://127.0.0.1:{free_port()}/"
    started = time.monotonic()
    results = await asyncio.gather(
        client.send(get(url, connect=0.5)),
        client.send(get(url, connect=0.5)),
        return_exceptions=True,
    )
    assert [type(r) for r in results] == [UpstreamConnectError, UpstreamConnectError]
    assert time.monotonic() - started < 0.4


@linux_only
async def test_a_request_cancelled_while_connecting_gives_its_place_back(
    make_client: MakeClient,
) -> None:
    async with RawServer(answer_each, serving=False) as server:
        server.fill_backlog()
        client = make_client(1)
        connecting = asyncio.create_task(client.send(get(server.url + "/", connect=5)))
        await asyncio.sleep(0.1)
        assert not connecting.done()
        connecting.cancel()  # the gateway's client went away
        with pytest.raises(asyncio.CancelledError):
            await connecting
        await server.start_serving()
        _, body = await fetch(client, get(server.url + "/", connect=0.5))
    assert body == b"ok"


async def test_a_switch_of_protocols_nobody_asked_for_is_a_protocol_error(
    make_client: MakeClient,
) -> None:
    switch = (
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
    )

    async def handler(connection: RawConnection) -> None:
        await connection.read_request()
        connection.write(switch)
        await connection.wait_eof()

    async with RawServer(handler) as server:
        client = make_client(1)
        try:
            response = await asyncio.wait_for(client.send(get(server.url + "/")), 2)
        except UpstreamProtocolError:
            # And the connection was dropped: what follows a 101 on it is not HTTP.
            await asyncio.wait_for(server.connections[0].finished.wait(), 2)
            return
        response.close()
        pytest.fail(f"got a {response.status} response instead of UpstreamProtocolError")


async def test_trailer_fields_do_not_show_up_as_response_headers(
    make_client: MakeClient,
) -> None:
    async with RawServer(answering(CHUNKED_WITH_TRAILER)) as server:
        response = await make_client(1).send(get(server.url + "/"))
        at_head = list(response.raw_headers)
        body = await read_all(response)
        response.release()
    assert body == b"hello world"
    head = [(b"transfer-encoding", b"chunked"), (b"trailer", b"x-checksum")]
    assert (at_head, list(response.raw_headers)) == (head, head)


async def test_a_responses_headers_stay_its_own_after_its_connection_is_reused(
    make_client: MakeClient,
) -> None:
    async def handler(connection: RawConnection) -> None:
        while (request := await connection.read_request()) is not None:
            name = request.split(b" ")[1].strip(b"/")
            connection.write(b"HTTP/1.1 200 OK\r\nx-name: %s\r\ncontent-length: 0\r\n\r\n" % name)

    async with RawServer(handler) as server:
        client = make_client(1)
        first, _ = await fetch(client, get(server.url + "/first"))
        second, _ = await fetch(client, get(server.url + "/second"))
    assert len(server.connections) == 1
    assert (b"x-name", b"second") in second.raw_headers
    assert (b"x-name", b"first") in first.raw_headers


async def test_bytes_after_the_end_of_a_response_are_not_its_body(
    make_client: MakeClient,
) -> None:
    """A response's framing says where it ends; a second message in the same read is a
    protocol fault of the upstream, never more body, and the connection is not reused."""

    async def overruns(connection: RawConnection) -> None:
        await connection.read_request()
        connection.write(OK + b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nEVIL!")
        await answer_each(connection)

    async with RawServer(overruns) as server:
        client = make_client(1)
        _, body = await fetch(client, get(server.url + "/"))
        assert body == b"ok"
        _, again = await fetch(client, get(server.url + "/"))
        assert again == b"ok"
    assert len(server.connections) == 2


@pytest.mark.parametrize("pause", [0.0, 0.05], ids=["with-the-head", "after-the-head"])
async def test_a_close_delimited_body_cut_by_a_reset_is_a_stream_error(
    make_client: MakeClient, pause: float
) -> None:
    async def resets(connection: RawConnection) -> None:
        await connection.read_request()
        connection.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\npartial")
        await connection.writer.drain()
        await asyncio.sleep(pause)
        sock = connection.writer.get_extra_info("socket")
        # SO_LINGER 0: close with a RST, as a crashing upstream does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.writer.transport.abort()

    async with RawServer(resets) as server:
        response = await make_client(1).send(get(server.url + "/"))
        with pytest.raises(UpstreamStreamError):
            await read_all(response)
        response.close()
