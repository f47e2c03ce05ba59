"""A lean Redis client for the limiter's hot path: RESP2 over one pipelined connection.

Chosen by measurement, and kept by it (``bench/redis_clients.py``; figures in the README's
Benchmark section): with limits in Redis, the same gateway serves 1.4-2.3x the requests per
second with this client as with redis-py's asyncio client, which spends a few hundred µs more
CPU per request (two calls: admit, settle). The limiter needs one thing, "send this command,
give me the reply", so this client packs the command itself, writes it on one shared
connection, and lets hiredis (the parser redis-py uses) split the replies, which Redis sends in
request order (RESP pipelining), so one FIFO of futures matches them up.

**Timeouts measure Redis, not the event loop.** A plain ``asyncio.timeout`` fires when the loop
gets round to its timer; a gateway busy with a burst of requests (or short of CPU) gets there
late, after the reply has long been sitting unread in the socket, and blames a healthy Redis.
Here a deadline that fires looks at the socket first: while bytes from Redis wait in it unread
(or the connect has completed, or DNS has answered, unnoticed), the loop is behind, not Redis,
and the deadline looks again once the loop has read them. A call times out only when, at or
after its deadline, its reply has not reached this process at all: Redis (or the network
between) really took longer than the timeout.

**A silent connection is dropped.** A call that times out without a single byte from Redis since
it was sent (not merely behind a long pipeline of replies still coming) aborts the connection, so
the next call connects afresh: when the node vanished without a reset (node lost, a partition, a
Service IP now pointing elsewhere), reusing the socket would time out every call until the
kernel gave up, about 15 minutes. Keepalive and, on Linux, ``TCP_USER_TIMEOUT`` catch an idle or
stuck socket in seconds too. Every call failed by one lost connection carries its generation
(``lost_generation``), so the limiter's breaker counts the loss once, not once per call.

**No socket outlives its use.** A connection whose setup fails (AUTH refused, SELECT out of
range) is closed before the error reaches its callers; a socket given up while connecting is
closed at once. An attempt whose callers have all stopped waiting (their deadlines) runs on for
the calls that come next, since a slow handshake or a retransmitted SYN may still complete it,
but for ``CONNECT_BACKSTOP_SECONDS`` at most; ``aclose`` ends it at once.

It speaks to a single Redis (``redis://``, optional user, password and database). Redis
Cluster, TLS and Unix sockets use redis-py (``build_limiter`` picks). Errors are redis-py's
exception types, so the limiter's fallbacks (NOSCRIPT, unknown command, connection errors)
work the same with either client.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import ipaddress
import select
import socket
import sys
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

Args = tuple[str | int | bytes, ...]

# How soon a deadline that found the loop behind looks again. A timer, because in uvloop a
# call_soon callback made from a timer runs before the same turn's socket poll; a timer runs on
# a later turn, after it.
RECHECK_SECONDS = 0.001
# A connection attempt still unfinished after this long is abandoned and the next call starts
# afresh (the kernel would retry a lost SYN for minutes). A backstop, not a timeout: callers
# stopped waiting at their own deadlines long before.
CONNECT_BACKSTOP_SECONDS = 5.0
# How long the kernel may keep unacknowledged data (TCP_USER_TIMEOUT) or probe an idle
# connection (keepalive) before it declares the peer gone, instead of ~15 minutes.
KEEPALIVE_IDLE_SECONDS = 5
KEEPALIVE_INTERVAL_SECONDS = 1
KEEPALIVE_PROBES = 3
USER_TIMEOUT_MS = 5000


class ConnectionLost(RedisConnectionError):
    """The connection failed under this call. ``generation`` numbers the client's connections:
    one loss fails every call in flight on it, and they all carry the same number."""

    def __init__(self, message: str, generation: int) -> None:
        super().__init__(message)
        self.generation = generation


def lost_generation(error: BaseException) -> int | None:
    """The connection generation whose loss failed this call, if a lost connection did: a
    ``ConnectionLost``, or a timeout that dropped a silent connection (its cause)."""
    for candidate in (error, error.__cause__):
        if isinstance(candidate, ConnectionLost):
            return candidate.generation
    return None


def pack(args: Args) -> bytes:
    """One command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _error(reply: hiredis.ReplyError) -> ResponseError | AuthenticationError:
    """The exception redis-py raises for this error reply (its parser's table, for the replies
    the limiter can get): ``/readyz``'s ``last_error`` names the same type with either client."""
    message = str(reply)
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    if message.startswith(("WRONGPASS", "NOAUTH")):
        return AuthenticationError(message)
    return ResponseError(message)


def pending_events(fd: int, events: int) -> bool:
    """Whether socket ``fd`` has any of ``events``, an error or a hang-up waiting right now.
    poll(2), not select(2): a busy gateway's descriptors go past select's limit of 1024."""
    if fd < 0:
        return False
    poller = select.poll()
    poller.register(fd, events)
    return bool(poller.poll(0))


def _writable(sock: socket.socket) -> bool:
    return pending_events(sock.fileno(), select.POLLOUT)


def _always() -> bool:
    return True


class Deadline:
    """Fail ``future`` with redis-py's ``TimeoutError`` at loop time ``when``, unless what it
    waits for has already reached this process and only the event loop has yet to take it
    (``arrived()``): then look again on the loop's next turn, and again, until the future is
    done or nothing is left waiting for the loop. A starved loop thus delays a verdict but never
    makes one; only a Redis that has not answered by the deadline is timed out."""

    __slots__ = ("_arrived", "_future", "_handle", "_loop", "_seconds")

    def __init__(
        self,
        future: asyncio.Future[Any],
        when: float,
        seconds: float,
        arrived: Callable[[], bool],
    ) -> None:
        self._loop = future.get_loop()
        self._future = future
        self._seconds = seconds
        self._arrived = arrived
        self._handle = self._loop.call_at(when, self._expire)

    def _expire(self) -> None:
        future = self._future
        if future.done():
            return
        if self._arrived():
            self._handle = self._loop.call_later(RECHECK_SECONDS, self._expire)
            return
        future.set_exception(
            RedisTimeoutError(f"Redis did not answer within {self._seconds * 1000:g} ms")
        )

    def cancel(self) -> None:
        self._handle.cancel()


class _Connection(asyncio.Protocol):
    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.received = 0  # data_received calls: whether Redis said anything since a send
        self.reader = hiredis.Reader()
        self.pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.fileno = -1
        self.alive = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        self.fileno = sock.fileno() if sock is not None else -1
        self.alive = True

    def data_received(self, data: bytes) -> None:
        self.received += 1
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError:
                self._fail("invalid reply from Redis")
                return
            if reply is False:
                return
            # Replies come in request order; a caller that gave up (timeout) left its future
            # done in place, so the order still holds.
            future = self.pending.popleft()
            if future.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(_error(reply))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail("connection to Redis lost")

    def unread(self) -> bool:
        """Redis has sent something the loop has not read yet (or closed the connection)."""
        return pending_events(self.fileno, select.POLLIN)

    def _fail(self, message: str) -> None:
        self.alive = False
        self.fileno = -1  # the number may soon belong to another socket
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(ConnectionLost(message, self.generation))
        if self.transport is not None:
            self.transport.abort()

    def drop(self, message: str) -> None:
        """Abort the connection, failing the calls still waiting on it."""
        self._fail(message)

    def close(self) -> None:
        self.alive = False
        self.fileno = -1
        if self.transport is not None:
            self.transport.close()

    def send(self, args: Args) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending.append(future)
        assert self.transport is not None
        self.transport.write(pack(args))
        return future


def _detect_dead_peers(sock: socket.socket) -> None:
    """Let the kernel notice a peer that vanished without a reset in seconds, idle (keepalive)
    or with data unacknowledged (TCP_USER_TIMEOUT), rather than after ~15 minutes."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if sys.platform == "linux":
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_SECONDS)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_SECONDS)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


class _Attempt:
    """One try at opening the connection, shared by the calls waiting for it. ``step`` says
    whether what its current step waits for (DNS, the TCP handshake, a reply) has arrived; until
    the first step starts, and between steps, it waits for nothing but the loop."""

    __slots__ = ("step", "task")

    def __init__(self) -> None:
        self.step: Callable[[], bool] = _always
        self.task: asyncio.Task[_Connection] | None = None

    def arrived(self) -> bool:
        # Done but not yet passed on to its waiters (done callbacks run on a later turn).
        return self.task is None or self.task.done() or self.step()


class RespClient:
    """``execute_command`` and ``aclose``, as the limiter uses redis-py's client, and ``call``:
    one command with a timeout that measures Redis (see the module's docstring)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError("RespClient speaks plain redis:// only")
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        path = parts.path.strip("/")
        db = int(path) if path else 0
        self._setup: list[Args] = []
        if password is not None:
            self._setup.append(("AUTH", username, password) if username else ("AUTH", password))
        if db:
            self._setup.append(("SELECT", db))
        self._connection: _Connection | None = None
        self._attempt: _Attempt | None = None
        self._resolver: concurrent.futures.ThreadPoolExecutor | None = None
        self._generation = 0  # of the last connection opened

    async def execute_command(self, *args: str | int | bytes) -> Any:
        """Send one command and return its reply, however long it takes."""
        return await self.call(args, None)

    async def call(self, args: Args, within: float | None) -> Any:
        """Send one command and return its reply.

        Raises redis-py's ``TimeoutError`` when, as seen at the socket, Redis has not answered
        ``within`` seconds after the command was sent (or, when a connection must be opened
        first, has not accepted it within as long); ``ConnectionError`` when it cannot be
        reached; ``ResponseError`` (and ``NoScriptError``) for error replies."""
        connection = self._connection
        if connection is None or not connection.alive:
            connection = await self._connected(within)
        future = connection.send(args)
        if within is None:
            return await future
        heard = connection.received
        # Timed from the write, not from the call: time spent connecting was judged on its own.
        deadline = Deadline(future, future.get_loop().time() + within, within, connection.unread)
        try:
            return await future
        except RedisTimeoutError as exc:
            if connection.received != heard or not connection.alive:
                raise  # Redis is busy answering others on it: a slow Redis, not a dead socket
            # Not a byte since the command went out, and none waiting (the deadline looked):
            # the peer may be gone without a reset, so the next call connects afresh.
            lost = ConnectionLost("Redis went silent; connection dropped", connection.generation)
            connection.drop(str(lost))
            raise exc from lost
        finally:
            deadline.cancel()

    async def _connected(self, within: float | None) -> _Connection:
        """The connection, once the shared attempt to open it succeeds. A caller that stops
        waiting (its deadline, a cancellation) leaves the attempt running for the others."""
        attempt = self._attempt
        if attempt is None:
            attempt = self._attempt = _Attempt()
            attempt.task = asyncio.ensure_future(self._open(attempt))
            attempt.task.add_done_callback(self._opened)
        opening = attempt.task
        assert opening is not None
        waiter: asyncio.Future[_Connection] = opening.get_loop().create_future()

        def relay(done: asyncio.Task[_Connection]) -> None:
            if waiter.done():
                return
            if done.cancelled():
                waiter.set_exception(RedisConnectionError("connecting to Redis was cancelled"))
            elif (error := done.exception()) is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(done.result())

        opening.add_done_callback(relay)
        deadline = None
        if within is not None:
            deadline = Deadline(waiter, waiter.get_loop().time() + within, within, attempt.arrived)
        try:
            return await waiter
        finally:
            if deadline is not None:
                deadline.cancel()
            opening.remove_done_callback(relay)

    def _opened(self, opening: asyncio.Task[_Connection]) -> None:
        if self._attempt is not None and self._attempt.task is opening:
            self._attempt = None
        if not opening.cancelled():
            opening.exception()  # retrieved here, whether or not anyone still waits for it

    async def _open(self, attempt: _Attempt) -> _Connection:
        try:
            async with asyncio.timeout(CONNECT_BACKSTOP_SECONDS):
                connection = await self._open_unbounded(attempt)
        except TimeoutError:
            raise RedisConnectionError("connecting to Redis took too long") from None
        finally:
            attempt.step = _always
        self._connection = connection
        return connection

    async def _open_unbounded(self, attempt: _Attempt) -> _Connection:
        loop = asyncio.get_running_loop()
        connection: _Connection | None = None
        error: OSError | None = None
        for family, address in await self._addresses(attempt):
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _detect_dead_peers(sock)
                # Connected (or refused) shows as writable before the loop notices.
                attempt.step = functools.partial(_writable, sock)
                await loop.sock_connect(sock, address)
                attempt.step = _always  # only the loop's own work from here
                self._generation += 1
                generation = self._generation
                _, connection = await loop.create_connection(
                    functools.partial(_Connection, generation), sock=sock
                )
                break
            except OSError as exc:
                sock.close()
                error = exc
            except BaseException:
                sock.close()
                raise
        if connection is None:
            reason = (error.strerror or str(error)) if error is not None else "no address"
            raise RedisConnectionError(f"cannot connect to Redis: {reason}")
        attempt.step = connection.unread
        try:
            for command in self._setup:
                await connection.send(command)
        except BaseException:
            connection.close()
            raise
        return connection

    async def _addresses(self, attempt: _Attempt) -> list[tuple[int, Any]]:
        """Where Redis may be, in the resolver's order; an IP address as it is."""
        with contextlib.suppress(ValueError):  # not an address: a name to resolve below
            ip = ipaddress.ip_address(self._host)
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            return [(family, (self._host, self._port))]
        # In a thread of our own, so that a deadline can see the answer has come (done())
        # before the loop passes it on.
        if self._resolver is None:
            self._resolver = concurrent.futures.ThreadPoolExecutor(1, "redis-resolver")
        lookup = self._resolver.submit(
            socket.getaddrinfo, self._host, self._port, type=socket.SOCK_STREAM
        )
        attempt.step = lookup.done
        try:
            infos = await asyncio.wrap_future(lookup)
        except OSError as exc:
            raise RedisConnectionError(f"cannot resolve the Redis host: {exc.strerror}") from None
        attempt.step = _always
        return [(info[0], info[4]) for info in infos]

    async def aclose(self) -> None:
        attempt, self._attempt = self._attempt, None
        if attempt is not None and attempt.task is not None:
            attempt.task.cancel()
            await asyncio.wait([attempt.task])
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
        if self._resolver is not None:
            self._resolver.shutdown(wait=False, cancel_futures=True)
            self._resolver = None
