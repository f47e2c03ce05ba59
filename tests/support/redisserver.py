"""A private redis-server for a test (never the shared one on 6379), and a Redis Cluster of them.

``RedisServer`` can be stopped and started again on the same port, which the failure tests use
to show the breaker and the recovery. It can also listen on a Unix socket and for TLS, so that
every client the gateway builds (``build_limiter``) can be run against a real server.
``redis_server`` is the fixture most tests want: import ``redis_server_fixture`` (registered under
that name) into a conftest or a test module.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.ports import free_port

__all__ = [
    "REDIS_CLI",
    "REDIS_SERVER",
    "RedisServer",
    "TlsFiles",
    "ask",
    "free_cluster_port",
    "free_port",
    "redis_server_fixture",
    "running_cluster",
]

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli")


@dataclass(frozen=True)
class TlsFiles:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key."""

    cert: Path
    key: Path


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too; both must be below 65536."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20_000, 45_000)
        if _bindable(port) and _bindable(port + 10_000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def ask(port: int, command: bytes) -> bytes:
    """One inline command to the Redis on ``port`` and the first bytes of its answer (empty when
    nothing answers): no client library, so it works while a client under test is broken."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(command + b"\r\n")
            return sock.recv(4096)
    except OSError:
        return b""


def _ping(port: int) -> bool:
    """Whether a Redis answers on ``port``: PONG, or NOAUTH from one that wants a password."""
    return ask(port, b"PING").startswith((b"+PONG", b"-NOAUTH"))


class RedisServer:
    """A redis-server of our own in a temporary directory, without persistence. It always
    listens on ``port`` (plain TCP, which ``start`` pings); with ``unix_socket`` on that path
    too, and with ``tls`` for TLS on ``tls_port``."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *extra: str,
        unix_socket: Path | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = port if port is not None else free_port()
        self.extra = extra
        self.unix_socket = unix_socket
        self.tls = tls
        self.tls_port = free_port() if tls is not None else None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def unix_url(self) -> str:
        assert self.unix_socket is not None
        return f"unix://{self.unix_socket}"

    @property
    def tls_url(self) -> str:
        assert self.tls is not None
        return f"rediss://127.0.0.1:{self.tls_port}?ssl_ca_certs={self.tls.cert}"

    def _listeners(self) -> list[str]:
        args = []
        if self.unix_socket is not None:
            args += ["--unixsocket", str(self.unix_socket), "--unixsocketperm", "700"]
        if self.tls is not None:
            args += ["--tls-port", str(self.tls_port), "--tls-auth-clients", "no"]
            args += ["--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key)]
            args += ["--tls-ca-cert-file", str(self.tls.cert)]
        return args

    def start(self, timeout: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                *self._listeners(),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not _ping(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited at start")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        """Kill it (SIGKILL: a crash, not a shutdown) and wait for the port to close."""
        if self.process is None:
            return
        self.process.kill()
        self.process.wait(timeout=10)
        self.process = None


@pytest.fixture(name="redis_server")
def redis_server_fixture(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, killed when the test ends."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def running_cluster(base: Path) -> Iterator[list[RedisServer]]:
    """Three masters, no replicas, all slots assigned: ``cluster_state:ok``."""
    if REDIS_CLI is None:
        pytest.skip("redis-cli is not installed: cannot create a Redis Cluster")
    nodes = [
        RedisServer(
            base / f"node{i}",
            free_cluster_port(),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "5000",
        )
        for i in range(3)
    ]
    try:
        for node in nodes:
            node.start()
        subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )
        deadline = time.monotonic() + 20
        while not all(b"cluster_state:ok" in ask(n.port, b"CLUSTER INFO") for n in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.05)
        yield nodes
    finally:
        for node in nodes:
            node.stop()
