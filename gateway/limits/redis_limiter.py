"""The shared limiter: one script call per admission against Redis or Redis Cluster.

Failure handling (``redis.on_failure``), for a call Redis failed (an error, a lost connection,
or no answer within ``timeout_ms``) and while the breaker is open:

- ``open``: admit, and count in the local limiter so the headers still mean something;
- ``closed``: refuse with 503 and ``Retry-After`` (``Decision.unavailable``);
- ``local``: the local limiter's decision (per-process limits), continuing from the levels Redis
  last reported, so a key Redis had drained is not handed a fresh burst.

All three set ``Decision.degraded`` and count in ``stats.degraded``.

**What counts as Redis failing.** The timeout measures Redis, not this process: with the lean
client (``redis://``, the usual case) a call times out only if its reply has not reached the
socket by the deadline (``gateway/limits/resp.py``); a gateway too busy to read a reply in time
keeps waiting for it instead. redis-py's clients (Cluster, TLS, Unix sockets) hide their sockets,
so there the verdict waits a few loop turns past the deadline, time for a reply that was already
there to be read. redis-py holds a connection per call in flight, up to ``REDIS_PY_CONNECTIONS``;
a call beyond that waits for a free one first, and its timeout starts once it has one: a full
pool is this process's queue, not Redis failing.

**The breaker** opens after ``breaker_failures`` failures in a row, not on one, and then skips
Redis for ``breaker_seconds``; then one request probes it (half-open) while the others keep
falling back, and an answer closes it. The pattern and its three states are Nygard's "Circuit
Breaker" (Release It!, 2007), as in https://martinfowler.com/bliki/CircuitBreaker.html.
A lost connection counts once however many calls it failed: one reset (a Redis restart, a load
balancer cutting an idle connection) under a pipeline of calls is one failure, not an outage.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config.model import RedisSettings
from gateway.limits import lua
from gateway.limits.buckets import Bucket, Decision, Plan, Scheduled
from gateway.limits.limiter import BreakerState, Limiter, LimiterStats
from gateway.limits.local_limiter import LocalLimiter
from gateway.limits.resp import RECHECK_SECONDS, RespClient, lost_generation

logger = logging.getLogger("gateway.limits")

OnFailure = Literal["open", "closed", "local"]
RedisClient = Redis | RedisCluster | RespClient

_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)
# Loop turns a redis-py call may run past its deadline: enough for a reply already in the socket
# to be read (one turn), handed to the waiting task and parsed (the next).
_GRACE_TURNS = 3
# Benchmark-only (bench/redis_clients.py): "redis-py" makes redis:// use redis-py's client
# instead of the lean one, so that one gateway build can be measured with either. Read once,
# when the limiter is built; not a user setting.
CLIENT_OVERRIDE_ENV = "GATEWAY_BENCH_REDIS_CLIENT"
# redis-py's asyncio clients hold one connection per call in flight and fail the call outright
# (``MaxConnectionsError``, a ``ConnectionError``) once their pool, 100 by default (per node for
# Cluster), is in use. The limiter sizes the pool itself and lets no more calls than that reach
# the client at once: the others wait their turn here, untimed, since that wait is this process's
# queue, not Redis failing.
REDIS_PY_CONNECTIONS = 100


class Breaker:
    """Whether to ask Redis: closed until ``failures`` calls in a row fail, then open for
    ``cooldown`` seconds, then half-open: the first caller probes, and its answer closes the
    breaker (its failure opens it again). A probe that never reports (its request cancelled)
    frees the slot after another ``cooldown``. The state is mirrored into ``stats.breaker``."""

    def __init__(
        self,
        stats: LimiterStats,
        *,
        failures: int = 3,
        cooldown: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stats = stats
        self._threshold = failures
        self._cooldown = cooldown
        self._clock = clock
        self._failures = 0  # in a row
        self._retry_at = 0.0  # open or half-open: no (other) call before this time
        self.state: BreakerState = "closed"
        stats.breaker = "closed"

    def allow(self) -> bool:
        """Whether this call may go to Redis (when not closed: whether it is the probe)."""
        if self.state == "closed":
            return True
        now = self._clock()
        if now < self._retry_at:
            return False
        self._retry_at = now + self._cooldown
        self._set("half-open")
        return True

    def retry_in(self) -> float:
        """Seconds until Redis is asked again (0 when closed)."""
        return max(0.0, self._retry_at - self._clock()) if self.state != "closed" else 0.0

    def succeeded(self) -> None:
        self._failures = 0
        if self.state != "closed":
            self._set("closed")

    def failed(self) -> bool:
        """Count a failure; True when it opened a closed breaker."""
        self._failures += 1
        if self.state == "closed" and self._failures < self._threshold:
            return False
        tripped = self.state == "closed"
        self._retry_at = self._clock() + self._cooldown
        self._set("open")
        return tripped

    def _set(self, state: BreakerState) -> None:
        self.state = state
        self._stats.breaker = state


class _GraceTimeout:
    """Cancel ``task`` once ``seconds`` have passed and then ``_GRACE_TURNS`` more turns of the
    loop, each after a socket poll; ``fired`` says it did. For redis-py's clients, whose sockets
    are out of sight: a reply that came while the loop was busy is read and parsed in those turns
    and the call succeeds. Best effort: it cannot tell a request redis-py sent late (a starved
    loop) from one Redis answered late."""

    __slots__ = ("_handle", "_loop", "_task", "_turns", "fired")

    def __init__(self, task: asyncio.Task[Any], seconds: float) -> None:
        self._loop = task.get_loop()
        self._task = task
        self._turns = _GRACE_TURNS
        self.fired = False
        self._handle = self._loop.call_later(seconds, self._tick)

    def _tick(self) -> None:
        if self._turns:
            self._turns -= 1
            self._handle = self._loop.call_later(RECHECK_SECONDS, self._tick)
            return
        self.fired = True
        self._task.cancel()

    def cancel(self) -> None:
        self._handle.cancel()


class RedisLimiter:
    def __init__(
        self,
        client: RedisClient,
        *,
        on_failure: OnFailure = "local",
        timeout: float = 0.05,
        breaker_failures: int = 3,
        breaker_seconds: float = 1.0,
        local: LocalLimiter | None = None,
        stats: LimiterStats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stats = stats if stats is not None else LimiterStats()
        self._client = client
        self._resp = client if isinstance(client, RespClient) else None
        self._on_failure = on_failure
        self._timeout = timeout
        self._breaker = Breaker(
            self.stats, failures=breaker_failures, cooldown=breaker_seconds, clock=clock
        )
        self._local = local if local is not None else LocalLimiter(stats=self.stats)
        # The lean client's last lost connection counted by the breaker: the other calls it
        # failed were in flight with that one and say nothing more about Redis.
        self._counted_loss: int | None = None
        self._evalsha = True  # False once a proxy in front of Redis refused EVALSHA
        # Calls admitted to a redis-py client at once (REDIS_PY_CONNECTIONS).
        self._slots = asyncio.Semaphore(REDIS_PY_CONNECTIONS)
        # redis-py's cluster client initializes lazily, and commands racing that first
        # initialization fail (connections are swapped under them): do it once, first.
        self._cluster = client if isinstance(client, RedisCluster) else None
        self._cluster_lock = asyncio.Lock()

    @property
    def client(self) -> RedisClient:
        return self._client

    @property
    def local(self) -> LocalLimiter:
        return self._local

    @property
    def breaker(self) -> BreakerState:
        return self._breaker.state

    @property
    def breaker_open(self) -> bool:
        """Redis is being skipped (open, or half-open with a probe out)."""
        return self._breaker.state != "closed"

    async def admit(self, plan: Plan) -> Decision:
        bucket_set = plan.buckets
        if not bucket_set.buckets:
            self.stats.admitted += 1
            return Decision(plan, True)
        if not self._breaker.allow():
            return self._fallback(plan)
        command = bucket_set.admit_command
        # A plan that may wait takes a place in the key's waiting room first (the count must
        # hold while the call is out); a full room asks Redis for no waiting at all.
        seated = False
        if bucket_set.max_wait_ms:
            seated = self._local.room.enter(plan.key_name, bucket_set.max_waiting)
            if not seated:
                command = bucket_set.no_wait_command
        try:
            reply = await self._call(command, plan.tokens)
        except _FAILURES as exc:
            if seated:
                self._local.room.leave(plan.key_name)
            self._failed(exc)
            return self._fallback(plan)
        except BaseException:
            if seated:
                self._local.room.leave(plan.key_name)
            raise
        self._breaker.succeeded()
        remaining = tuple(reply[3::2])
        self._local.observe(bucket_set, remaining)  # where a fallback would continue from
        if reply[0]:
            self.stats.admitted += 1
            if reply[1]:  # admitted after a wait: the seat is the request's until ``waited``
                return Scheduled(
                    plan, True, 0, remaining, tuple(reply[4::2]), wait_ms=reply[1], ticket=reply[2]
                )
            if seated:
                self._local.room.leave(plan.key_name)
            return Decision(plan, True, 0, remaining, tuple(reply[4::2]))
        if seated:
            self._local.room.leave(plan.key_name)
        self.stats.refused += 1
        return Decision(plan, False, reply[1], remaining, tuple(reply[4::2]), reply[2] - 1)

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
        if self._breaker.state != "closed":
            return  # the reservation stands; a settle is not worth a probe
        try:
            await self._call(command, delta)
        except _FAILURES as exc:
            self._failed(exc)
            return
        self._breaker.succeeded()
        self._local.settle_now(plan, delta)  # keep the fallback's copy in step

    def waited(self, decision: Decision) -> None:
        self._local.room.leave(decision.plan.key_name)

    async def give_back(self, decision: Decision) -> None:
        if not decision.wait_ms:
            return
        if decision.degraded:  # admitted by the local limiter: given back there
            self._local.give_back_now(decision)
            return
        ticket = decision.ticket
        if not isinstance(ticket, (str, bytes)) or self._breaker.state != "closed":
            return  # the debit stands: a give-back is not worth a probe
        plan = decision.plan
        command = lua.give_back_command(plan.buckets.buckets, ticket)
        try:
            await self._call(command, plan.tokens)
        except _FAILURES as exc:
            self._failed(exc)
            return
        self._breaker.succeeded()

    async def peek(self, buckets: Sequence[Bucket]) -> list[float | None]:
        """The levels in Redis; while Redis is skipped or failing, the local fallback's copy
        (what a degraded decision would start from)."""
        if not buckets:
            return []
        if self._breaker.state == "closed":
            try:
                reply = await self._execute(lua.peek_command(buckets))
            except _FAILURES as exc:
                self._failed(exc)
            else:
                return [float(level) for level in reply]
        return list(self._local.levels(buckets))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def execute(self, *args: str | int) -> Any:
        """One command on the limiter's client, under its timeout, for the gateway's other
        shared state (``upstream/health_sync.py``). Neither the breaker nor the limiter's
        counters see it: how Redis serves that state must not change how requests are
        limited. Raises what ``_execute`` raises (``_FAILURES`` when Redis fails)."""
        return await self._execute(args)

    async def _call(self, command: tuple[str | bytes, ...], last: int) -> Any:
        if self._evalsha:
            try:
                return await self._execute((*command, last))
            except NoScriptError:
                # Redis restarted, flushed its scripts or failed over: EVAL loads it again.
                return await self._execute((*lua.as_eval(command), last))
            except ResponseError as exc:
                if "unknown command" not in str(exc).lower():
                    raise
                self._evalsha = False  # a proxy that does not pass EVALSHA on
        return await self._execute((*lua.as_eval(command), last))

    async def _execute(self, args: tuple[str | bytes | int, ...]) -> Any:
        resp = self._resp
        if resp is not None:
            return await resp.call(args, self._timeout)
        task = asyncio.current_task()
        assert task is not None
        async with self._slots:  # a free connection first; the timeout starts once there is one
            deadline = _GraceTimeout(task, self._timeout)
            try:
                if self._cluster is not None:
                    await self._initialize_cluster()
                return await self._client.execute_command(*args)
            except asyncio.CancelledError:
                if deadline.fired and task.uncancel() == 0:
                    raise RedisTimeoutError(
                        f"Redis did not answer within {self._timeout * 1000:g} ms"
                    ) from None
                raise
            finally:
                deadline.cancel()

    async def _initialize_cluster(self) -> None:
        async with self._cluster_lock:
            if self._cluster is not None:
                await self._cluster.initialize()
                self._cluster = None

    def _failed(self, exc: BaseException) -> None:
        stats = self.stats
        stats.redis_errors += 1
        stats.last_error = type(exc).__name__
        stats.last_error_at = time.time()
        generation = lost_generation(exc)
        if generation is not None:
            if generation == self._counted_loss:
                return
            self._counted_loss = generation
        if self._breaker.failed():
            stats.breaker_trips += 1
            logger.warning(
                "Redis failed %s: %s; the breaker is open, on_failure=%s decides for %g s",
                type(exc).__name__,
                exc,
                self._on_failure,
                self._breaker.retry_in(),
            )

    def _fallback(self, plan: Plan) -> Decision:
        self.stats.degraded += 1
        mode = self._on_failure
        if mode == "closed":
            self.stats.refused += 1
            wait_ms = max(1, math.ceil(self._breaker.retry_in() * 1000))
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
    # call falls back at once and the breaker does the rest. The limiter times each call itself
    # (a busy loop must not count against Redis), so redis-py's own socket timeouts, which a
    # late loop trips just the same, are only a backstop well past it.
    backstop = max(1.0, 10 * timeout)
    options: dict[str, Any] = {
        "socket_timeout": backstop,
        "socket_connect_timeout": backstop,
        "retry": Retry(NoBackoff(), 1),
        "max_connections": REDIS_PY_CONNECTIONS,
    }
    client: RedisClient
    if settings.cluster:
        client = RedisCluster.from_url(settings.url, **options)
    elif settings.url.startswith("redis://") and os.environ.get(CLIENT_OVERRIDE_ENV) != "redis-py":
        # The lean client (gateway/limits/resp.py): measured faster end to end (the README's
        # Benchmark section, bench/redis_clients.py).
        client = RespClient(settings.url)
    else:  # rediss:// (TLS) and unix:// stay with redis-py
        client = Redis.from_url(settings.url, **options)
    return RedisLimiter(
        client,
        on_failure=settings.on_failure,
        timeout=timeout,
        breaker_failures=settings.breaker_failures,
        breaker_seconds=settings.breaker_seconds,
        local=local,
        stats=stats,
    )
