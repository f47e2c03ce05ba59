"""Jobs in Redis, shared by every replica: a Redis Streams queue with one consumer group.

Keys: all behind the hash tag ``{<prefix>}``, one Cluster slot (why: ``redis_scripts.py``, with
the job hash's fields); what each holds and how long: docs/jobs.md ("Redis keys").

Leases are the consumer group's pending entries: ``take`` claims entries idle longer than a
lease (XAUTOCLAIM, a bounded number of pending entries per call, from where this store's last
look stopped) before reading new ones (XREADGROUP), and ``renew`` resets an entry's idle time
(XCLAIM to its own consumer). ``release`` gives a job back by setting its entry's idle time to
a lease (XCLAIM ... IDLE): the entry keeps its place in the stream, and the next look for lapsed
leases that reaches it, any replica's, claims it. A replica blocked in XREADGROUP meanwhile is
not woken (only XADD wakes it): it looks at its next take, and a worker's take blocks a second
at a time. The store uses the caller's clock for the times it writes (``started_at``, expiry
against ``expires_at``) and Redis's own for leases and retention.

The client must be a redis-py asyncio ``Redis`` or ``RedisCluster`` made with
``decode_responses=False`` (results are bytes). The store owns it: ``aclose`` closes it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from gateway.jobs import redis_scripts, redis_webhook_scripts
from gateway.jobs.model import (
    Delivery,
    Job,
    JobError,
    JobResult,
    Status,
    WebhookState,
)
from gateway.jobs.redis_records import (
    headers_json,
    job_of,
    stream_entries,
    text,
)
from gateway.jobs.store import (
    CANCELLED,
    EXPIRED,
    MAX_ATTEMPTS,
    Claim,
    QueueFull,
    StoreSettings,
    fresh,
    indexes,
)

__all__ = ["RedisStore"]

_GROUP = "workers"
# Records read per script call when paging: enough for a page and the look past it, bounded so
# that a filtered page over a long index never holds Redis in one long script.
_PAGE_BATCH = 100
# How long before the client's own socket timeout a blocking read returns (see _block_ms).
_SOCKET_MARGIN = 0.25
# XAUTOCLAIM calls per take at most, each looking at up to 10 pending entries (TAKE): the work
# of a take stays bounded however many jobs the replicas hold. Each take goes on from where
# this store's last one stopped, and a worker with room takes at least once a second (its take
# blocks a second at a time), so a lapsed lease is reached within about pending / 100 takes.
_CLAIM_CALLS = 10


class RedisStore:
    def __init__(
        self,
        client: Redis | RedisCluster,
        settings: StoreSettings,
        *,
        prefix: str = "gateway:jobs",
        clock: Callable[[], float] = time.time,
        forget_consumers_after: float = 3600.0,
    ) -> None:
        """``forget_consumers_after``: seconds after which a consumer (a worker) that holds no
        entry and has not read is removed from the group (see FORGET_CONSUMERS)."""
        if "{" in prefix or "}" in prefix:
            raise ValueError("the prefix becomes the keys' hash tag: it may hold no braces")
        if client.get_encoder().decode_responses:
            raise ValueError("the jobs store needs a client with decode_responses=False")
        self._client = client
        self._settings = settings
        self._clock = clock
        self._tag = "{" + prefix + "}"
        self._stream = f"{self._tag}:queue"
        self._queued = f"{self._tag}:queued"
        self._webhooks = f"{self._tag}:webhooks"
        self._unfinished = f"{self._tag}:unfinished"
        # Where this store's next look for lapsed leases starts (TAKE's XAUTOCLAIM cursor):
        # each take goes on from the last, so every pending entry is reached in turn.
        self._claim_cursor = "0-0"
        self._lease_ms = max(1, math.ceil(settings.lease * 1000))
        self._retention_ms = max(1, math.ceil(settings.retention * 1000))
        self._keep_ms = self._lease_ms + self._retention_ms
        self._submit = client.register_script(redis_scripts.SUBMIT)
        self._take = client.register_script(redis_scripts.TAKE)
        self._renew = client.register_script(redis_scripts.RENEW)
        self._release = client.register_script(redis_scripts.RELEASE)
        self._finish = client.register_script(redis_scripts.FINISH)
        self._cancel = client.register_script(redis_scripts.CANCEL)
        self._due = client.register_script(redis_webhook_scripts.DUE)
        self._delivered = client.register_script(redis_webhook_scripts.DELIVERED)
        self._page = client.register_script(redis_scripts.PAGE)
        self._forget = client.register_script(redis_scripts.FORGET_CONSUMERS)
        self._forget_after_ms = max(1, math.ceil(forget_consumers_after * 1000))
        self._forget_every = forget_consumers_after / 4
        self._next_forget = 0.0  # the event loop's time of the next clean-up of the group
        self._ready = False
        self._ready_lock = asyncio.Lock()
        self._uninitialized = client if isinstance(client, RedisCluster) else None
        self._socket_timeout = _socket_timeout(client)

    # -- keys ------------------------------------------------------------------------------

    def _job_key(self, job_id: str) -> str:
        return f"{self._tag}:job:{job_id}"

    def _index_key(self, index: str) -> str:
        return f"{self._tag}:index:{index}"

    def _idem_key(self, owner: str, idempotency: str) -> str:
        # The digest is hex, so the last ':' separates it even when the owner holds one.
        return f"{self._tag}:idem:{owner}:{idempotency}"

    # -- the consumer group ----------------------------------------------------------------

    async def _ensure_group(self) -> None:
        """Make the stream and its group (XGROUP CREATE ... MKSTREAM), once per store."""
        if self._ready:
            return
        async with self._ready_lock:
            if self._ready:
                return
            try:
                # From id 0, so that jobs submitted before the group was made are delivered.
                await self._client.xgroup_create(self._stream, _GROUP, id="0", mkstream=True)
            except ResponseError as error:
                if "BUSYGROUP" not in str(error):  # made already, by this or another replica
                    raise
            self._ready = True

    async def _connected(self) -> None:
        """redis-py's cluster client initializes lazily, and commands racing that first
        initialization fail (connections are swapped under them): every call waits for it once,
        first (as the limiter does)."""
        if self._uninitialized is None:
            return
        async with self._ready_lock:
            if self._uninitialized is not None:
                await self._uninitialized.initialize()
                self._uninitialized = None

    async def _queue_ready(self, block_ms: int | None) -> bool:
        """Whether the queue exists (and then its group). A gateway whose jobs store never saw a
        job writes nothing to Redis: until some replica submits one, ``take`` waits for the
        stream to appear with XREAD BLOCK, which, unlike XGROUP CREATE MKSTREAM, makes no key.
        From id 0-0, so that an entry added between the EXISTS and the XREAD ends the wait."""
        if self._ready:
            return True
        if await self._client.exists(self._stream):
            await self._ensure_group()
            return True
        if block_ms is not None:
            await self._client.xread({self._stream: "0-0"}, count=1, block=block_ms)
        return False

    async def _script(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a script that uses the consumer group, making the group again if it is gone
        (the stream was deleted, or Redis restarted without persistence)."""
        try:
            return await script(keys=keys, args=args)
        except ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
        self._ready = False
        await self._ensure_group()
        return await script(keys=keys, args=args)

    # -- the contract ----------------------------------------------------------------------

    async def submit(self, job: Job) -> Job:
        if job.status is not Status.QUEUED:
            raise ValueError(f"a submitted job is queued, not {job.status}")
        job = fresh(job)
        await self._connected()
        await self._ensure_group()
        now = self._clock()
        # A job nobody takes still ends: its queue deadline, then the retention.
        queued_for = max(job.expires_at - now, 0.0) + self._settings.retention
        ttl_ms = max(1, math.ceil(queued_for * 1000))
        idem = (
            self._idem_key(job.owner, job.idempotency)
            if job.idempotency is not None
            else f"{self._tag}:idem:"
        )
        keys = [self._job_key(job.id), self._stream, self._queued, idem, self._unfinished]
        keys += [self._index_key(index) for index in indexes(job)]
        limit = self._settings.max_unfinished_per_key
        reply = await self._submit(
            keys=keys,
            args=[
                self._tag,
                job.id,
                job.but(request=replace(job.request, body=b"")).dumps(),
                repr(job.created_at),
                repr(job.expires_at),
                ttl_ms,
                "1" if job.webhook_url is not None else "",
                job.webhook_state.value,
                "1" if job.idempotency is not None else "",
                job.request.body,
                job.owner,
                limit,
            ],
        )
        outcome = int(reply[0])
        if outcome == 0:
            return job_of(reply[1])
        if outcome == 2:
            raise QueueFull(job.owner, limit)
        return job

    async def get(self, job_id: str) -> Job | None:
        await self._connected()
        found = await self._client.hgetall(self._job_key(job_id))
        return job_of(found) if found else None

    async def status(self, job_id: str) -> Status | None:
        await self._connected()
        found = await self._client.hget(self._job_key(job_id), "status")
        return None if found is None else Status(text(found))

    async def page(
        self, index: str, *, status: Status | None, limit: int, after: str | None
    ) -> tuple[list[Job], bool]:
        """Newest first from the index's sorted set. The status filter is applied after
        reading the index: batches of ids are read until the page is full (and one more match
        shows that more follow) or the index ends, so a rare status can cost a walk of the index
        (in batches, each one short script). An ``after`` no longer in the index (its job
        expired) gives an empty page."""
        await self._connected()
        key = self._index_key(index)
        jobs: list[Job] = []
        cursor = after or ""
        batch = min(max(limit + 1, 10), _PAGE_BATCH)
        wanted = "" if status is None else status.value
        while True:
            want = limit - len(jobs) + 1  # one more than the page: whether more follow
            reply = await self._page(keys=[key], args=[self._tag, cursor, batch, want, wanted])
            if not reply:  # the cursor is not in the index (expired, even between two batches)
                return jobs, False
            ended, last, records = int(reply[0]) == 1, text(reply[1]), reply[2:]
            for record in records:
                if len(jobs) == limit:
                    return jobs, True
                jobs.append(job_of(record, bodies=False))
            if ended:
                return jobs, False
            cursor = last or cursor

    async def cancel(self, job_id: str, now: float) -> Job | None:
        await self._connected()
        reply = await self._cancel(
            keys=[
                self._job_key(job_id),
                self._stream,
                self._queued,
                self._webhooks,
                self._unfinished,
            ],
            args=[
                self._tag,
                job_id,
                repr(now),
                self._retention_ms,
                CANCELLED.code,
                CANCELLED.message,
            ],
        )
        return job_of(reply) if reply else None

    async def take(self, worker: str, block: float) -> Claim | None:
        await self._connected()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(block, 0.0)
        while True:
            if not await self._queue_ready(self._block_ms(deadline - loop.time())):
                if deadline - loop.time() <= 0:
                    return None
                continue
            if loop.time() >= self._next_forget:
                self._next_forget = loop.time() + self._forget_every
                await self._script(
                    self._forget, [self._stream], [self._tag, _GROUP, self._forget_after_ms]
                )
            claim = await self._take_one(worker, "lapsed", "", "")
            if claim is not None:
                return claim
            remaining = deadline - loop.time()
            entries = await self._read(worker, self._block_ms(remaining))
            for entry, job_id in entries:
                claim = await self._take_one(worker, "entry", entry, job_id)
                if claim is not None:
                    return claim
            if not entries and deadline - loop.time() <= 0:
                return None

    def _block_ms(self, remaining: float) -> int | None:
        """XREADGROUP's BLOCK for a wait of ``remaining`` seconds: None (do not block) when no
        time is left; at most a lease, so that a lease lapsing meanwhile is seen; and short of
        the client's socket timeout, which would otherwise end a quiet wait as an error."""
        if remaining <= 0:
            return None
        wait = min(remaining, self._settings.lease)
        if self._socket_timeout is not None:
            wait = min(wait, max(self._socket_timeout - _SOCKET_MARGIN, 0.01))
        return max(1, math.ceil(wait * 1000))

    async def _read(self, worker: str, block_ms: int | None) -> list[tuple[str, str]]:
        try:
            reply = await self._client.xreadgroup(
                _GROUP, worker, {self._stream: ">"}, count=1, block=block_ms
            )
        except ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            self._ready = False
            return []
        return stream_entries(reply)

    async def _take_one(self, worker: str, mode: str, entry: str, job_id: str) -> Claim | None:
        settings = self._settings
        lapsed = mode == "lapsed"
        reply = await self._script(
            self._take,
            [self._stream, self._queued, self._webhooks, self._unfinished],
            [
                self._tag,
                _GROUP,
                worker,
                repr(self._clock()),
                self._lease_ms,
                settings.max_attempts,
                self._retention_ms,
                self._keep_ms,
                EXPIRED.code,
                EXPIRED.message,
                MAX_ATTEMPTS.code,
                MAX_ATTEMPTS.message,
                mode,
                entry,
                job_id,
                CANCELLED.code,
                CANCELLED.message,
                self._claim_cursor if lapsed else "",
                _CLAIM_CALLS,
            ],
        )
        if lapsed:
            self._claim_cursor = text(reply[0])
        if len(reply) == 1:
            return None
        return Claim(job=job_of(reply[2]), token=text(reply[1]))

    async def renew(self, claim: Claim) -> Job | None:
        await self._connected()
        reply = await self._script(
            self._renew,
            [self._job_key(claim.job.id), self._stream],
            [self._tag, _GROUP, claim.token, claim.job.attempts, self._keep_ms],
        )
        return job_of(reply, bodies=False) if reply else None

    async def release(self, claim: Claim) -> None:
        await self._connected()
        job_id = claim.job.id
        await self._script(
            self._release,
            [self._job_key(job_id), self._stream, self._queued, self._webhooks, self._unfinished],
            [
                self._tag,
                _GROUP,
                claim.token,
                job_id,
                claim.job.attempts,
                self._lease_ms,
                repr(self._clock()),
                self._retention_ms,
                CANCELLED.code,
                CANCELLED.message,
            ],
        )

    async def finish(
        self,
        claim: Claim,
        status: Status,
        result: JobResult | None,
        error: JobError | None,
        now: float,
    ) -> Job:
        await self._connected()
        if not status.terminal:
            raise ValueError(f"a job finishes completed, failed, cancelled or expired: {status}")
        job_id = claim.job.id
        reply = await self._script(
            self._finish,
            [self._job_key(job_id), self._stream, self._queued, self._webhooks, self._unfinished],
            [
                self._tag,
                _GROUP,
                claim.token,
                job_id,
                status.value,
                repr(now),
                self._retention_ms,
                "1" if result is not None else "",
                result.status if result is not None else "",
                headers_json(result.headers) if result is not None else "",
                result.body if result is not None else b"",
                "1" if error is not None else "",
                error.code if error is not None else "",
                error.message if error is not None else "",
            ],
        )
        if reply:
            return job_of(reply)
        # The record is gone (it outlived its retention unrenewed): nothing is stored, and the
        # caller gets the outcome it asked for, as it would have been stored.
        return claim.job.but(
            status=status,
            result=result,
            error=error,
            finished_at=now,
            webhook_state=WebhookState.NONE,
        )

    async def due_deliveries(self, now: float, lease: float, limit: int) -> list[Job]:
        await self._connected()
        if lease <= 0:
            raise ValueError("a delivery lease is a positive number of seconds")
        if limit <= 0:
            return []
        keep_ms = max(1, math.ceil(lease * 1000)) + self._retention_ms
        reply = await self._due(
            keys=[self._webhooks], args=[self._tag, repr(now), repr(now + lease), limit, keep_ms]
        )
        return [job_of(record) for record in reply]

    async def delivered(
        self, job_id: str, delivery: Delivery, state: WebhookState, next_at: float | None
    ) -> Job | None:
        await self._connected()
        entry = [delivery.attempt, delivery.at, delivery.status, delivery.error]
        entry.append(delivery.duration_ms)
        # Redis counts the TTL on its own clock: the wait until next_at, on ours, plus the
        # retention.
        keep_ms = ""
        if next_at is not None:
            keep_ms = str(max(0, math.ceil((next_at - self._clock()) * 1000)) + self._retention_ms)
        reply = await self._delivered(
            keys=[self._job_key(job_id), self._webhooks],
            args=[
                self._tag,
                job_id,
                orjson.dumps(entry),
                state.value,
                "" if next_at is None else repr(next_at),
                keep_ms,
            ],
        )
        return job_of(reply) if reply else None

    async def depth(self) -> int:
        await self._connected()
        count = await self._client.scard(self._queued)
        return int(count)

    async def aclose(self) -> None:
        await self._client.aclose()


def _socket_timeout(client: Redis | RedisCluster) -> float | None:
    """The client's socket timeout, which a blocking read must stay short of."""
    if isinstance(client, RedisCluster):
        kwargs = client.nodes_manager.connection_kwargs
    else:
        kwargs = client.connection_pool.connection_kwargs
    value = kwargs.get("socket_timeout")
    return float(value) if value else None
