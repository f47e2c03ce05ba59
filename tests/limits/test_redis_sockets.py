"""A Redis that refuses the connection's setup, or never answers it, costs a failed call, never a
socket: every client the gateway builds for a single Redis closes what it opened.

Run through ``build_limiter`` against a real redis-server (a wrong password, a database index out
of range) and against listeners that accept and then say nothing, or never accept at all (the
backlog full, so the kernel drops the SYN: a blackhole without leaving 127.0.0.1). Sockets are
counted where the kernel keeps them: this process's descriptors (``/proc/self/fd``) matched to
their TCP connections (``/proc/net/tcp``), and, on the other side, by what Redis or the listener
saw.

The lean client keeps one connection attempt going for the calls that come after the one that
gave up, until ``CONNECT_BACKSTOP_SECONDS`` (gateway/limits/resp.py); these tests shorten it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis

from gateway.config.model import RedisSettings
from gateway.limits import RedisLimiter, build_limiter
from gateway.limits import resp as resp_module
from gateway.limits.redis_limiter import CLIENT_OVERRIDE_ENV

from .conftest import RedisServer, TlsFiles
from .factories import limits, make_key, plan_for

pytestmark = pytest.mark.skipif(
    not Path("/proc/net/tcp").exists(), reason="counts sockets through Linux's /proc"
)

PLAN = plan_for(make_key("demo", limits=limits(60)))
PASSWORD = "right-password"
# How long a socket may outlive the failure it was opened for: a few loop turns, not seconds.
CLOSED_WITHIN = 1.0
BACKSTOP = 0.2  # the lean client's, shortened

# The clients build_limiter makes for one Redis over TCP; redis-py's also for TLS.
CLIENTS = ["redis-lean", "redis-redis-py", "rediss-redis-py"]
PLAIN_CLIENTS = ["redis-lean", "redis-redis-py"]


def _socket_inodes() -> set[str]:
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = fd.readlink()
        except OSError:  # closed since the listing
            continue
        if target.name.startswith("socket:["):
            inodes.add(target.name[len("socket:[") : -1])
    return inodes


def sockets_to(port: int) -> set[str]:
    """This process's TCP sockets whose peer is 127.0.0.1:``port``, by inode."""
    peers = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port:
                peers.add(fields[9])
    return peers & _socket_inodes()


async def until(condition: Callable[[], bool], within: float = CLOSED_WITHIN) -> bool:
    """Whether ``condition`` holds within ``within`` seconds, the loop running meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def _connected_clients(server: RedisServer) -> int:
    """Clients connected to ``server``, counting the one that asks."""
    with redis.Redis(port=server.port, password=PASSWORD) as admin:
        info = admin.info("clients")
    return int(info["connected_clients"])


@pytest.fixture
def backstop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resp_module, "CONNECT_BACKSTOP_SECONDS", BACKSTOP)


@pytest.fixture
def guarded_redis(tmp_path: Path, tls_files: TlsFiles) -> Iterator[RedisServer]:
    """A Redis that wants a password, on plain TCP and on TLS."""
    server = RedisServer(tmp_path / "redis", None, "--requirepass", PASSWORD, tls=tls_files)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _settings(
    client: str, server: RedisServer, monkeypatch: pytest.MonkeyPatch, *, auth: str, db: int = 0
) -> tuple[RedisSettings, int]:
    """Settings that make build_limiter pick ``client`` for ``server``, and the port it uses."""
    if client == "redis-redis-py":
        monkeypatch.setenv(CLIENT_OVERRIDE_ENV, "redis-py")
    if client == "rediss-redis-py":
        assert server.tls_port is not None
        url = server.tls_url.replace("rediss://", f"rediss://:{auth}@").replace(
            "?", f"/{db}?" if db else "?"
        )
        return RedisSettings(url=url, timeout_ms=1000), server.tls_port
    url = f"redis://:{auth}@127.0.0.1:{server.port}" + (f"/{db}" if db else "")
    return RedisSettings(url=url, timeout_ms=1000), server.port


async def _fails_and_leaves_nothing(settings: RedisSettings, port: int) -> str:
    """Admit once (it must fall back), check no socket to ``port`` stays open, close; the
    failure's type."""
    before = sockets_to(port)
    limiter = build_limiter(settings)
    assert isinstance(limiter, RedisLimiter)
    try:
        assert (await limiter.admit(PLAN)).degraded
        assert await until(lambda: not sockets_to(port) - before), "a socket stayed open"
    finally:
        await limiter.aclose()
    assert limiter.stats.last_error is not None
    return limiter.stats.last_error


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_wrong_password_fails_the_call_as_an_authentication_error_and_closes_its_socket(
    client: str, guarded_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, port = _settings(client, guarded_redis, monkeypatch, auth="wrong-password")
    assert await _fails_and_leaves_nothing(settings, port) == "AuthenticationError"
    assert _connected_clients(guarded_redis) == 1  # the one asking


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_database_index_out_of_range_fails_the_call_and_closes_its_socket(
    client: str, guarded_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, port = _settings(client, guarded_redis, monkeypatch, auth=PASSWORD, db=99)
    assert await _fails_and_leaves_nothing(settings, port) == "ResponseError"
    assert _connected_clients(guarded_redis) == 1


class SilentListener:
    """Accepts connections and never writes a byte; records when each one is closed."""

    def __init__(self) -> None:
        self.accepted = 0
        self.closed = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)  # for stop() to wait for
        self._writers.add(writer)
        try:
            while await reader.read(65536):
                pass  # read what the client sends (AUTH, PING...), answer nothing
        except OSError:
            pass
        finally:
            self.closed += 1
            self._writers.discard(writer)
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()
        await asyncio.gather(*self._handlers, return_exceptions=True)


@pytest.fixture
async def silent() -> AsyncIterator[SilentListener]:
    listener = SilentListener()
    await listener.start()
    try:
        yield listener
    finally:
        await listener.stop()


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port whose SYNs the kernel drops: a listener that never accepts, its backlog full."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port: int = listener.getsockname()[1]
        for _ in range(3):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            fillers.append(filler)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def _timeout_settings(
    client: str, port: int, monkeypatch: pytest.MonkeyPatch, *, password: bool
) -> RedisSettings:
    if client == "redis-redis-py":
        monkeypatch.setenv(CLIENT_OVERRIDE_ENV, "redis-py")
    auth = ":pw@" if password else ""
    return RedisSettings(url=f"redis://{auth}127.0.0.1:{port}", timeout_ms=50)


@pytest.mark.parametrize("client", PLAIN_CLIENTS)
@pytest.mark.parametrize("password", [True, False], ids=["silent-at-auth", "silent-at-command"])
@pytest.mark.usefixtures("backstop")
async def test_a_redis_that_accepts_but_never_answers_times_out_and_its_socket_is_closed(
    client: str, password: bool, silent: SilentListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _timeout_settings(client, silent.port, monkeypatch, password=password)
    assert await _fails_and_leaves_nothing(settings, silent.port) == "TimeoutError"
    assert silent.accepted >= 1
    assert await until(lambda: silent.closed == silent.accepted), "the listener saw no close"


@pytest.mark.parametrize("client", PLAIN_CLIENTS)
@pytest.mark.usefixtures("backstop")
async def test_a_redis_that_never_accepts_times_out_and_the_connecting_socket_is_closed(
    client: str, blackhole: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _timeout_settings(client, blackhole, monkeypatch, password=False)
    assert await _fails_and_leaves_nothing(settings, blackhole) == "TimeoutError"


@pytest.mark.parametrize("client", PLAIN_CLIENTS)
async def test_closing_the_limiter_while_a_connection_is_set_up_closes_its_socket(
    client: str, silent: SilentListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No shortened backstop: the lean client's attempt is still waiting for AUTH's reply.
    settings = _timeout_settings(client, silent.port, monkeypatch, password=True)
    before = sockets_to(silent.port)
    limiter = build_limiter(settings)
    assert isinstance(limiter, RedisLimiter)
    try:
        assert (await limiter.admit(PLAN)).degraded
    finally:
        await limiter.aclose()
    assert await until(lambda: not sockets_to(silent.port) - before), "a socket stayed open"
    assert await until(lambda: silent.closed == silent.accepted)
