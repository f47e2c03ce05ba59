"""The shared limiter: one script call per admission against Redis or Redis Cluster.

Failure handling (``redis.on_failure``), after any Redis error or a call slower than
``timeout_ms``:

- ``open``: admit, and count in the local limiter so the headers still mean something;
- ``closed``: refuse with 503 and ``Retry-After`` (``Decision.unavailable``);
- ``local``: the local limiter's decision (per-process limits).

All three set ``Decision.degraded`` and count in ``stats.degraded``. After a failure a breaker
skips Redis for ``breaker_seconds``, so a dead Redis costs nothing per request; then one request
probes it (the others keep falling back while the probe is in flight), and success closes the
breaker again.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any, Literal

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from gateway.config.model import RedisSettings
from gateway.limits import lua
from gateway.limits.buckets import Decision, Plan
from gateway.limits.limiter import Limiter, LimiterStats
from gateway.limits.local_limiter import LocalLimiter
from gateway.limits.resp import RespClient

OnFailure = Literal["open", "closed", "local"]
RedisClient = Redis | RedisCluster | RespClient

_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)


class RedisLimiter:
    def __init__(
        self,
        client: RedisClient,
        *,
        on_failure: OnFailure = "local",
        timeout: float = 0.05,
        breaker_seconds: float = 2.0,
        local: LocalLimiter | None = None,
        stats: LimiterStats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stats = stats if stats is not None else LimiterStats()
        self._client = client
        self._on_failure = on_failure
        self._timeout = timeout
        self._breaker = breaker_seconds
        self._local = local if local is not None else LocalLimiter(stats=self.stats)
        self._clock = clock
        self._skip_until = 0.0  # breaker: Redis is not asked before this (monotonic) time
        self._evalsha = True  # False once a proxy in front of Redis refused EVALSHA
        # redis-py's cluster client initializes lazily, and commands racing that first
        # initialization fail (connections are swapped under them): do it once, first.
        self._cluster = client if isinstance(client, RedisCluster) else None
        self._cluster_lock = asyncio.Lock()

    @property
    def local(self) -> LocalLimiter:
        return self._local

    @property
    def breaker_open(self) -> bool:
        return self._skip_until > self._clock()

    async def admit(self, plan: Plan) -> Decision:
        bucket_set = plan.buckets
        if not bucket_set.buckets:
            self.stats.admitted += 1
            return Decision(plan, True)
        if self._skip_until:
            now = self._clock()
            if now < self._skip_until:
                return self._fallback(plan, now)
            self._skip_until = now + self._timeout  # this request probes; others fall back
        try:
            async with asyncio.timeout(self._timeout):
                reply = await self._call(bucket_set.admit_command, plan.tokens)
        except _FAILURES as exc:
            now = self._trip(exc)
            return self._fallback(plan, now)
        self._skip_until = 0.0
        if reply[0]:
            self.stats.admitted += 1
            return Decision(plan, True, 0, tuple(reply[3::2]), tuple(reply[4::2]))
        self.stats.refused += 1
        return Decision(plan, False, reply[1], tuple(reply[3::2]), tuple(reply[4::2]), reply[2] - 1)

    async def settle(self, decision: Decision, actual_tokens: int | None) -> None:
        if actual_tokens is None or not decision.allowed:
            return
        plan = decision.plan
        delta = actual_tokens - plan.tokens
        command = plan.buckets.settle_command
        if delta == 0 or not command:
            return
        if decision.degraded:  # admitted by the local limiter: correct it there
            self._local.settle_now(plan, delta)
            return
        if self._skip_until and self._clock() < self._skip_until:
            return  # the reservation stands; a settle is not worth a probe
        try:
            async with asyncio.timeout(self._timeout):
                await self._call(command, delta)
        except _FAILURES as exc:
            self._trip(exc)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(self, command: tuple[str, ...], last: int) -> Any:
        if self._cluster is not None:
            await self._initialize_cluster()
        client = self._client
        if self._evalsha:
            try:
                return await client.execute_command(*command, last)
            except NoScriptError:
                # Redis restarted, flushed its scripts or failed over: EVAL loads it again.
                return await client.execute_command(*lua.as_eval(command), last)
            except ResponseError as exc:
                if "unknown command" not in str(exc).lower():
                    raise
                self._evalsha = False  # a proxy that does not pass EVALSHA on
        return await client.execute_command(*lua.as_eval(command), last)

    async def _initialize_cluster(self) -> None:
        async with self._cluster_lock:
            if self._cluster is not None:
                await self._cluster.initialize()
                self._cluster = None

    def _trip(self, exc: BaseException) -> float:
        now = self._clock()
        stats = self.stats
        stats.redis_errors += 1
        stats.last_error = f"{type(exc).__name__}: {exc}"
        if not self._skip_until or self._skip_until <= now + self._timeout:
            stats.breaker_trips += 1
        self._skip_until = now + self._breaker
        return now

    def _fallback(self, plan: Plan, now: float) -> Decision:
        self.stats.degraded += 1
        mode = self._on_failure
        if mode == "closed":
            self.stats.refused += 1
            wait_ms = max(1, math.ceil((self._skip_until - now) * 1000))
            return Decision(plan, False, wait_ms, degraded=True, unavailable=True)
        return self._local.admit_now(plan, force=mode == "open", degraded=True)


def build_limiter(
    settings: RedisSettings,
    *,
    stats: LimiterStats | None = None,
    local_max_buckets: int = 100_000,
) -> Limiter:
    """The limiter the settings ask for: local when no Redis URL is set, else Redis (or Redis
    Cluster) with a local fallback. Build it in the app's lifespan; ``await limiter.aclose()``
    at shutdown. No connection is made here: the first admission connects."""
    stats = stats if stats is not None else LimiterStats()
    local = LocalLimiter(max_buckets=local_max_buckets, stats=stats)
    if settings.url is None:
        return local
    timeout = settings.timeout_ms / 1000
    # One immediate retry (a connection the server closed while idle), no backoff: a failing
    # call falls back at once, the breaker does the rest, and admit() caps it all at timeout_ms.
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 1),
    }
    client: RedisClient
    if settings.cluster:
        client = RedisCluster.from_url(settings.url, **options)
    elif settings.url.startswith("redis://"):
        # The lean client (gateway/limits/resp.py): ~90 µs of CPU less per call, measured.
        client = RespClient(settings.url)
    else:  # rediss:// (TLS) and unix:// stay with redis-py
        client = Redis.from_url(settings.url, **options)
    return RedisLimiter(
        client,
        on_failure=settings.on_failure,
        timeout=timeout,
        breaker_seconds=settings.breaker_seconds,
        local=local,
        stats=stats,
    )
