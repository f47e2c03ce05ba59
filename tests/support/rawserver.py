"""A raw HTTP/1.1 server in the test's own event loop that records exact bytes.

For specifications of an HTTP client (``tests/upstream/transports/``): each ``RawServer``
records the exact bytes of every request and answers with exact bytes the test chooses, so
nothing between the client and the assertion can normalise what was sent or received. Each
connection is handed to a ``handler`` coroutine, which decides what to read, what to write, when
to pause and when to close. (``hostileupstream.HostileUpstream`` is the threaded one, for a
gateway running as a separate process.)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import Self

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


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


def drops_the_second_request(
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
