"""Fixtures: each job store the gateway builds, as two replicas, on a clock the test can move.

``backend`` is parametrised over the stores: ``memory`` (one process: its two "replicas" are
the same store, and its clock is a fake one the test moves), ``redis`` (two ``RedisStore``
instances with clients of their own on a private redis-server: two replicas), and
``redis-cluster`` (the same on a three-node Redis Cluster, which fails any script whose keys
are not in one slot). Redis measures leases (idle times) and retention (TTLs) with its own
clock, so for Redis ``advance`` sleeps for real: the settings keep those times short.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway.jobs.memory_store import MemoryStore
from gateway.jobs.redis_store import RedisStore
from gateway.jobs.store import JobStore, StoreSettings
from tests.support.redisserver import RedisServer, ask, running_cluster
from tests.support.redisserver import redis_server_fixture as redis_server_fixture

# Short, so that the Redis runs (real time) stay fast; the lease well above a scheduler's
# hiccup, the retention well above the lease.
SETTINGS = StoreSettings(lease=0.3, max_attempts=3, retention=1.0)
BACKENDS = ["memory", "redis", "redis-cluster"]


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Backend:
    """One kind of store: ``replicas`` opens stores that share their jobs (two processes'
    worth for Redis), ``now`` is their clock, ``advance`` moves time for them."""

    def __init__(self, kind: str, url: str | None = None, cluster: bool = False) -> None:
        self.kind = kind
        self._url = url
        self._cluster = cluster
        self._fake = FakeClock(time.time()) if url is None else None
        self._opened: list[JobStore] = []

    @property
    def url(self) -> str | None:
        """The Redis server's URL (None in process): for the tests that look into Redis."""
        return self._url

    def now(self) -> float:
        return self._fake() if self._fake is not None else time.time()

    async def advance(self, seconds: float) -> None:
        if self._fake is not None:
            self._fake.now += seconds
        else:
            await asyncio.sleep(seconds)

    def replicas(self, settings: StoreSettings = SETTINGS) -> tuple[JobStore, JobStore]:
        if self._fake is not None:
            store = MemoryStore(settings, clock=self._fake)
            self._opened.append(store)
            return store, store  # one process has one store
        first, second = self._redis(settings), self._redis(settings)
        self._opened += [first, second]
        return first, second

    def _redis(self, settings: StoreSettings) -> RedisStore:
        assert self._url is not None
        if self._cluster:
            return RedisStore(RedisCluster.from_url(self._url), settings)
        return RedisStore(Redis.from_url(self._url), settings)

    async def aclose(self) -> None:
        closing = {id(store): store for store in self._opened}
        for store in closing.values():
            await store.aclose()


@pytest.fixture(scope="session")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    """One Redis Cluster for the session (it takes seconds to form); each test flushes it."""
    with running_cluster(tmp_path_factory.mktemp("jobs-cluster")) as nodes:
        yield nodes


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    kind: str = request.param
    if kind == "memory":
        made = Backend(kind)
    elif kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        made = Backend(kind, server.url)
    else:
        nodes: list[RedisServer] = request.getfixturevalue("shared_cluster")
        for node in nodes:
            assert ask(node.port, b"FLUSHALL").startswith(b"+OK")
        made = Backend(kind, nodes[0].url, cluster=True)
    try:
        yield made
    finally:
        await made.aclose()
