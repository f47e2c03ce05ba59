"""What ``gateway.upstream.transports.http1.Http1Client`` does on the wire, as a specification.

Realistic exchanges go to the fake upstream (``tests/fakeupstream.py``). Protocol edge cases go
to tiny raw servers started in the test on 127.0.0.1 (``RawServer``): they record the exact bytes
of every request and answer with exact bytes the test chooses, so nothing between the client
and the assertion can normalise what was sent or received.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Self

import orjson
import pytest

from gateway.config.model import Timeouts
from gateway.upstream.seam import (
    OutboundRequest,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamResponse,
    UpstreamStreamError,
    UpstreamTimeout,
)
from gateway.upstream.transports.http1 import Http1Client, Http1Response
from tests import fakeupstream as fake
from tests.fakeupstream import FakeUpstream

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
CHAT = {"model": "gpt-fake", "messages": [{"role": "user", "content": "Hello there, fake."}]}
CHAT_STREAM = {**CHAT, "stream": True}

linux_only = pytest.mark.skipif(
    sys.platform != "linux", reason="a hanging connect needs Linux's full-backlog SYN drop"
)


# -- A raw server that records exact bytes -------------------------------------------------------


class RawConnection:
    """One accepted connection, seen from the server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.requests: list[bytes] = []  # each request's exact bytes: head and body
        self.eof = False  # the client closed cleanly (FIN, not RST)
        self.finished = asyncio.Event()  # the handler is done; the server closed its side

    async def read_request(self) -> bytes | None:
        """The next request's exact bytes (a ``content-length`` body included); None at EOF."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise AssertionError(
                    f"the connection ended inside a head: {exc.partial!r}"
                ) from None
            self.eof = True
            return None
        except ConnectionResetError:
            return None
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        request = head + await self.reader.readexactly(length)
        self.requests.append(request)
        return request

    async def wait_eof(self) -> None:
        """Discard what arrives until the client closes the connection."""
        with contextlib.suppress(ConnectionResetError):
            while await self.reader.read(65536):
                pass
            self.eof = True

    def write(self, data: bytes) -> None:
        self.writer.write(data)


Handler = Callable[[RawConnection], Awaitable[None]]


class RawServer:
    """``asyncio.start_server`` on 127.0.0.1, a free port, one ``handler`` per connection.

    The server closes a connection when its handler returns. ``connections`` lists them in
    accept order; ``peak`` is the most that were open at once. An exception in a handler fails
    the test when the server stops. With ``serving=False`` the socket listens with a backlog of
    one and accepts nothing until ``start_serving()``: ``fill_backlog()`` then makes any further
    connect hang (Linux drops the SYN of a connection its full accept queue cannot take).
    """

    def __init__(self, handler: Handler, *, serving: bool = True) -> None:
        self._handler = handler
        self._serving = serving
        self._tasks: set[asyncio.Task[None]] = set()
        self._fillers: list[socket.socket] = []
        self.connections: list[RawConnection] = []
        self.errors: list[BaseException] = []
        self.open = 0
        self.peak = 0
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(
            self._serve, sock=sock, start_serving=self._serving
        )
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        connection = RawConnection(reader, writer)
        self.connections.append(connection)
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            await self._handler(connection)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away mid-exchange: the test decides whether that was right
        except Exception as exc:
            self.errors.append(exc)
        finally:
            self.open -= 1
            writer.close()
            connection.finished.set()

    def fill_backlog(self) -> None:
        """Occupy the accept queue of a server that is not serving yet."""
        for _ in range(3):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", self.port))
            self._fillers.append(filler)

    async def start_serving(self) -> None:
        """Close the fillers, accept, and return once the queued ones have been taken."""
        queued = 0
        for filler in self._fillers:
            with contextlib.suppress(OSError):
                filler.getpeername()  # only connections that made it into the queue have a peer
                queued += 1
            filler.close()
        self._fillers.clear()
        await self._server.start_serving()
        async with asyncio.timeout(2):
            while len(self.connections) < queued:
                await asyncio.sleep(0.001)

    async def __aexit__(self, exc_type: object, *rest: object) -> None:
        for filler in self._fillers:
            filler.close()
        self._server.close()
        for connection in self.connections:
            connection.writer.close()  # a handler waiting on a read sees EOF and returns
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=2)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        await self._server.wait_closed()
        if self.errors and exc_type is None:
            raise self.errors[0]


async def answer_each(connection: RawConnection, response: bytes = OK) -> None:
    """Answer every request on the connection with ``response`` until the client closes."""
    while await connection.read_request() is not None:
        connection.write(response)


def answering(response: bytes) -> Handler:
    async def handler(connection: RawConnection) -> None:
        await answer_each(connection, response)

    return handler


# -- The client side -----------------------------------------------------------------------------


def outbound(
    method: str,
    url: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    connect: float = 2.0,
    read: float = 2.0,
) -> OutboundRequest:
    return OutboundRequest(method, url, headers, body, Timeouts(connect=connect, read=read))


def get(url: str, *, connect: float = 2.0, read: float = 2.0) -> OutboundRequest:
    return outbound("GET", url, connect=connect, read=read)


def chat(
    url: str, payload: bytes, *controls: tuple[str, str], read: float = 2.0
) -> OutboundRequest:
    headers = [("content-type", "application/json"), *controls]
    path = url + "/v1/chat/completions"
    return outbound("POST", path, headers=headers, body=payload, read=read)


async def read_all(response: UpstreamResponse) -> bytes:
    parts = []
    while chunk := await response.read_chunk():
        parts.append(chunk)
    return b"".join(parts)


async def fetch(client: Http1Client, request: OutboundRequest) -> tuple[UpstreamResponse, bytes]:
    """Send, read the body to its end, give the connection back."""
    response = await client.send(request)
    body = await read_all(response)
    response.release()
    return response, body


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


@pytest.fixture(scope="module")
def fake_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- The request on the wire ---------------------------------------------------------------------


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


@pytest.mark.parametrize(
    ("suffix", "target"), [("", b"/"), ("/", b"/"), ("?x=1", b"/?x=1"), ("/?", b"/?")]
)
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


def _drops_the_second_request(
    server: Callable[[], RawServer],
) -> Callable[[RawConnection], Awaitable[None]]:
    """A server whose first connection takes one request and closes as the second arrives."""

    async def handler(connection: RawConnection) -> None:
        if connection is server().connections[0]:
            await connection.read_request()
            connection.write(OK)
            await connection.read_request()
            return  # closed as the request arrived: not a byte of a response
        await answer_each(connection)

    return handler


@pytest.mark.parametrize(
    ("method", "headers"),
    [("PUT", [("a", "1")]), ("POST", [("idempotency-key", "k-1")])],
    ids=["idempotent-method", "idempotency-key"],
)
async def test_a_replayable_request_lost_by_a_reused_connection_is_sent_once_more(
    make_client: MakeClient, method: str, headers: list[tuple[str, str]]
) -> None:
    async with RawServer(_drops_the_second_request(lambda: server)) as server:
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
    async with RawServer(_drops_the_second_request(lambda: server)) as server:
        client = make_client(1)
        await fetch(client, get(server.url + "/first"))
        with pytest.raises(UpstreamProtocolError):
            await client.send(outbound("POST", server.url + "/second", body=b"{}"))
    assert len(server.connections) == 1


async def test_a_new_connection_closed_before_the_response_is_a_protocol_error_without_retry(
    make_client: MakeClient,
) -> None:
    async def drops(connection: RawConnection) -> None:
        await connection.read_request()

    async with RawServer(drops) as server:
        with pytest.raises(UpstreamProtocolError):
            await make_client(1).send(get(server.url + "/"))
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


# -- Back-pressure -------------------------------------------------------------------------------


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


# -- Bugs found while writing this specification (strict xfails: they fail until fixed) ----------


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


async def test_a_close_delimited_body_cut_by_a_reset_is_a_stream_error(
    make_client: MakeClient,
) -> None:
    async def resets(connection: RawConnection) -> None:
        await connection.read_request()
        connection.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\npartial")
        await connection.writer.drain()
        await asyncio.sleep(0.05)
        sock = connection.writer.get_extra_info("socket")
        # SO_LINGER 0: close with a RST, as a crashing upstream does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.writer.transport.abort()

    async with RawServer(resets) as server:
        response = await make_client(1).send(get(server.url + "/"))
        with pytest.raises(UpstreamStreamError):
            await read_all(response)
        response.close()
