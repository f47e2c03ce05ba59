"""Fixtures: a private redis-server per test (never the shared one), and clients for it.

``RedisServer`` (``tests/support/redisserver.py``, shared with the other suites that need a real
Redis) can be stopped and started again on the same port, which the failure tests use to show
the breaker and the recovery. It can also listen on a Unix socket and for TLS, so that every
client the gateway builds (``build_limiter``) can be run against a real server.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from tests.support.redisserver import (
    RedisServer,
    TlsFiles,
    ask,
    free_port,
    running_cluster,
)
from tests.support.redisserver import redis_server_fixture as redis_server

# Re-exported: the limits tests (and some others) import these from here.
__all__ = ["RedisServer", "TlsFiles", "free_port", "redis_server", "running_cluster"]

OPENSSL = shutil.which("openssl")


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A certificate for 127.0.0.1 that signs itself: the server's, and the CA clients trust."""
    if OPENSSL is None:
        pytest.skip("openssl is not installed: cannot make a certificate for TLS")
    base = tmp_path_factory.mktemp("tls")
    files = TlsFiles(cert=base / "cert.pem", key=base / "key.pem")
    subprocess.run(
        [
            OPENSSL,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-keyout",
            str(files.key),
            "-out",
            str(files.cert),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=30,
    )
    return files


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a Unix socket's path must fit in 108 bytes, which a test's
    ``tmp_path`` may not."""
    with tempfile.TemporaryDirectory(prefix="rl-") as name:
        yield Path(name)


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[list[RedisServer]]:
    """A cluster of this test's own."""
    with running_cluster(tmp_path) as nodes:
        yield nodes


@pytest.fixture(scope="session")
def shared_redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    """One cluster for the session (it takes seconds to form): use ``flushed_redis_cluster``."""
    with running_cluster(tmp_path_factory.mktemp("cluster")) as nodes:
        yield nodes


@pytest.fixture
def flushed_redis_cluster(shared_redis_cluster: list[RedisServer]) -> list[RedisServer]:
    """The session's cluster, emptied of the previous test's keys."""
    for node in shared_redis_cluster:
        assert ask(node.port, b"FLUSHALL").startswith(b"+OK")
    return shared_redis_cluster
