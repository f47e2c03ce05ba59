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

**Budgets** (``reserve``) follow the same rules as admissions. **Usage and spend** of a request
settled while Redis fails (or is skipped) are not lost: they wait in this process (up to
``MAX_PENDING`` requests, then the oldest are dropped and counted) and are added once Redis
answers a settle again, each in its own period, so the shared totals still add up; a call that
timed out after Redis ran it may so be counted twice (at least once, never lost while few
wait). Token-bucket corrections are not kept: by then the buckets have moved on.
"""

from __future__ import annotations

import asyncio
import collections
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

from gateway.accounting.budgets import SpendDecision, SpendPlan
from gateway.accounting.ledger import Entry
from gateway.config.model import RedisSettings
from gateway.limits import lua
from gateway.limits.breaker import Breaker, GraceTimeout
from gateway.limits.buckets import Bucket, Decision, Plan, Scheduled
from gateway.limits.limiter import BreakerState, Limiter, LimiterStats
from gateway.limits.local_limiter import LocalLimiter
from gateway.limits.resp import RespClient, lost_generation

logger = logging.getLogger("gateway.limits")

OnFailure = Literal["open", "closed", "local"]
RedisClient = Redis | RedisCluster | RespClient

# What a call to Redis raises when Redis fails (an error, a lost connection, no answer in time).
FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)
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
# Settled requests whose usage and spend wait for Redis to answer again, at most.
MAX_PENDING = 10_000
# The admin API's reads of usage counters: many at once, and no request waits on them.
READ_TIMEOUT_SECONDS = 5.0
_READ_BATCH = 500


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
        # Usage and spend to add once Redis answers again: (entry, spend correction for Redis).
        self._pending: collections.deque[tuple[Entry, int]] = collections.deque()
        self._flushing: asyncio.Task[None] | None = None

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
        except FAILURES as exc:
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

    async def settle(
        self, decision: Decision | None, actual_tokens: int | None, entry: Entry | None = None
    ) -> None:
        command: tuple[str, ...] = ()
        delta = 0
        if decision is not None and actual_tokens is not None and decision.allowed:
            plan = decision.plan
            delta = actual_tokens - plan.tokens
            if decision.degraded:  # admitted by the local limiter: correct it there
                self._local.settle_now(plan, delta)
            elif delta:
                command = plan.buckets.settle_command
        spend = 0
        if entry is not None:
            spend = entry.shared_spend_correction
            if entry.reserved_locally:  # the local copy held the reservation: correct it
                self._local.ledger.apply(entry.spend_only(), entry.spend_correction)
            if not entry.usage_keys and not (spend and entry.spend_keys):
                entry = None  # nothing for Redis (a local reservation given back)
        if entry is None and not command:
            return
        # A bucket correction alone is not worth a probe (the reservation stands); usage is:
        # without budgets or limits, settles are the only calls that would find Redis back.
        if not (self._breaker.allow() if entry is not None else self._breaker.state == "closed"):
            if entry is not None:
                self._keep(entry, spend)  # it waits for Redis; the bucket correction is dropped
            return
        try:
            await self._call(lua.settle_call(command, delta, entry, spend))
        except FAILURES as exc:
            self._failed(exc)
            if entry is not None and not _refused(exc):
                self._keep(entry, spend)
            return
        self._breaker.succeeded()
        if command:
            self._local.settle_now(decision.plan, delta)  # type: ignore[union-attr]
        if entry is not None and entry.spend_keys and not entry.reserved_locally:
            # Keep the fallback's copy of the budgets in step, as for buckets.
            self._local.ledger.apply(entry.spend_only(), spend)
        if self._pending and self._flushing is None:
            self._flushing = asyncio.ensure_future(self._flush())

    async def reserve(self, plan: SpendPlan) -> SpendDecision:
        if not self._breaker.allow():
            return self._spend_fallback(plan)
        ttls = plan.ttls
        command = lua.spend_command(plan.keys, plan.limits, ttls)
        try:
            reply = await self._call((*command, str(plan.reserve)))
        except FAILURES as exc:
            self._failed(exc)
            return self._spend_fallback(plan)
        self._breaker.succeeded()
        spent = tuple(int(value) for value in reply[1:])
        self._local.ledger.observe(plan.keys, spent, ttls)  # where a fallback would continue
        return SpendDecision(plan, bool(reply[0]), spent)

    async def release(self, decision: SpendDecision) -> None:
        if decision.allowed and decision.plan.reserve:
            await self.settle(None, None, decision.release())

    async def read_hashes(self, keys: Sequence[str]) -> list[dict[str, int]]:
        replies = await self._read([("HGETALL", key) for key in keys])
        return [_hash(reply) for reply in replies]

    async def read_counters(self, keys: Sequence[str]) -> list[int]:
        replies = await self._read([("GET", key) for key in keys])
        return [int(reply) if reply is not None else 0 for reply in replies]

    async def _read(self, commands: Sequence[tuple[str, ...]]) -> list[Any]:
        """Run many reads, ``_READ_BATCH`` at a time (pipelined on the lean client; redis-py's
        Cluster client sends each to its key's node)."""
        out: list[Any] = []
        for start in range(0, len(commands), _READ_BATCH):
            batch = commands[start : start + _READ_BATCH]
            out += await asyncio.gather(
                *(self._execute(command, READ_TIMEOUT_SECONDS) for command in batch)
            )
        return out

    def _keep(self, entry: Entry, spend: int) -> None:
        """Keep a settled request's usage and spend until Redis answers again."""
        pending = self._pending
        pending.append((entry, spend))
        if len(pending) > MAX_PENDING:
            pending.popleft()
            self.stats.usage_dropped += 1
        self.stats.usage_pending = len(pending)

    async def _flush(self) -> None:
        """Add what waited, oldest first, one call each (each entry is in one hash slot); stop
        at the first failure, which keeps the rest for the next time Redis answers."""
        pending = self._pending
        try:
            while pending and self._breaker.state == "closed":
                entry, spend = pending[0]
                try:
                    await self._call(lua.settle_call((), 0, entry, spend))
                except FAILURES as exc:
                    self._failed(exc)
                    if not _refused(exc):
                        return
                pending.popleft()
                self.stats.usage_pending = len(pending)
        finally:
            self._flushing = None

    def _spend_fallback(self, plan: SpendPlan) -> SpendDecision:
        self.stats.degraded += 1
        mode = self._on_failure
        if mode == "closed":
            wait_ms = max(1, math.ceil(self._breaker.retry_in() * 1000))
            return SpendDecision(
                plan, False, degraded=True, unavailable=True, retry_after_ms=wait_ms
            )
        return self._local.ledger.reserve(plan, force=mode == "open", degraded=True)

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
        except FAILURES as exc:
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
            except FAILURES as exc:
                self._failed(exc)
            else:
                return [float(level) for level in reply]
        return list(self._local.levels(buckets))

    async def aclose(self) -> None:
        if self._flushing is not None:
            self._flushing.cancel()
        await self._client.aclose()

    async def execute(self, *args: str | int) -> Any:
        """One command on the limiter's client, under its timeout, for the gateway's other
        shared state (``upstream/health_sync.py``). Neither the breaker nor the limiter's
        counters see it: how Redis serves that state must not change how requests are
        limited. Raises what ``_execute`` raises (``FAILURES`` when Redis fails)."""
        return await self._execute(args)

    async def _call(self, command: tuple[str | bytes, ...], *last: int) -> Any:
        """``EVALSHA`` ``command`` (and ``last``, its per-call arguments), or ``EVAL`` when Redis
        does not have the script."""
        if self._evalsha:
            try:
                return await self._execute((*command, *last))
            except NoScriptError:
                # Redis restarted, flushed its scripts or failed over: EVAL loads it again.
                return await self._execute((*lua.as_eval(command), *last))
            except ResponseError as exc:
                if "unknown command" not in str(exc).lower():
                    raise
                self._evalsha = False  # a proxy that does not pass EVALSHA on
        return await self._execute((*lua.as_eval(command), *last))

    async def _execute(
        self, args: tuple[str | bytes | int, ...], within: float | None = None
    ) -> Any:
        """One command, failed with a timeout error unless Redis answers ``within`` seconds (the
        limiter's timeout by default)."""
        timeout = self._timeout if within is None else within
        resp = self._resp
        if resp is not None:
            return await resp.call(args, timeout)
        task = asyncio.current_task()
        assert task is not None
        async with self._slots:  # a free connection first; the timeout starts once there is one
            deadline = GraceTimeout(task, timeout)
            try:
                if self._cluster is not None:
                    await self._initialize_cluster()
                return await self._client.execute_command(*args)
            except asyncio.CancelledError:
                if deadline.fired and task.uncancel() == 0:
                    raise RedisTimeoutError(
                        f"Redis did not answer within {timeout * 1000:g} ms"
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
        generation = lost_generation(exc)
        if generation is not None:
            if generation == self._counted_loss:
                # An echo: another call in flight on a connection whose loss is counted
                # already. Its cause (a timeout, say) stays the last error the operator sees.
                return
            self._counted_loss = generation
        stats.last_error = type(exc).__name__
        stats.last_error_at = time.time()
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


def _refused(exc: BaseException) -> bool:
    """Redis ran the script and it failed (an error reply, not a failing Redis): trying the same
    call again would fail the same way."""
    if isinstance(exc, ResponseError):
        logger.warning("Redis refused a settlement, dropped: %s", exc)
        return True
    return False


def _hash(reply: Any) -> dict[str, int]:
    """An ``HGETALL`` reply (redis-py: a dict; the lean client: a flat list) as text -> int."""
    if isinstance(reply, dict):
        items = list(reply.items())
    else:
        items = list(zip(reply[::2], reply[1::2], strict=True))
    out: dict[str, int] = {}
    for name, value in items:
        key = name.decode() if isinstance(name, bytes) else str(name)
        out[key] = int(value)
    return out


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
