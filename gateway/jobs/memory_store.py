"""Jobs in this process: the store without Redis (lost on restart, never shared).

It keeps the contract of ``RedisStore`` step for step, so that the same tests hold for both
(``tests/jobs/test_store_contract.py``): a FIFO queue of entries, leases that lapse (in one
process only a worker task that died leaves one behind), records that end ``retention`` seconds
after their job (lazily, on the next call; no background task), an idempotency index, the
``key:``/``team:`` indexes newest first, a count of each key's jobs not finished yet, and a
delivery schedule with leases.

Every method changes state without awaiting in between, so each change is atomic for asyncio;
``take`` waits for a submit on an ``asyncio.Event``. All times come from ``clock`` (tests move
it); only ``take``'s wait is real time.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from gateway.jobs.model import Delivery, Job, JobError, JobResult, Status, WebhookState
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

__all__ = ["MemoryStore"]


@dataclass(slots=True)
class _Lease:
    entry: int  # the queue entry: the claim's token, and the order lapsed jobs are taken in
    attempt: int  # the run it is for: a claim of an earlier run renews nothing
    until: float


class MemoryStore:
    def __init__(self, settings: StoreSettings, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._clock = clock
        self._jobs: dict[str, Job] = {}
        # When each record goes (the Redis store's TTL), and a heap to find the next. The heap
        # holds, for each record, an item no later than its time: a time that moves later (every
        # renewal of a long run moves it) changes ``_ends`` only, and the heap item, once due, is
        # pushed again at the record's time then; only a time that moves earlier pushes. So the
        # heap keeps a couple of items per record however often a run renews.
        self._ends: dict[str, float] = {}
        self._ending: list[tuple[float, str]] = []
        # The queue: entries in submission order. A job's entry lives while it is queued or
        # running; a popped entry whose job has another entry (or none) is skipped.
        self._entry_numbers = itertools.count(1)
        self._queue: collections.deque[tuple[int, str]] = collections.deque()
        self._entries: dict[str, int] = {}
        self._queued: set[str] = set()
        self._leases: dict[str, _Lease] = {}
        self._idempotent: dict[tuple[str, str], str] = {}
        # owner -> jobs not finished yet (queued or running), for max_unfinished_per_key; an
        # owner at zero has no entry.
        self._unfinished: dict[str, int] = {}
        # index -> [(created_at, id)] ascending; pages read it from the end.
        self._indexes: dict[str, list[tuple[float, str]]] = {}
        # The delivery schedule: id -> due time, and a heap of those with stale items skipped.
        self._due: dict[str, float] = {}
        self._schedule: list[tuple[float, str]] = []
        self._arrived = asyncio.Event()

    # -- the contract ----------------------------------------------------------------------

    async def submit(self, job: Job) -> Job:
        if job.status is not Status.QUEUED:
            raise ValueError(f"a submitted job is queued, not {job.status}")
        self._purge()
        if job.idempotency is not None:
            existing = self._idempotent.get((job.owner, job.idempotency))
            if existing is not None and existing in self._jobs:
                return self._jobs[existing]
        if job.id in self._jobs:
            raise ValueError(f"job id in use: {job.id}")
        limit = self._settings.max_unfinished_per_key
        if self._unfinished.get(job.owner, 0) >= limit:
            raise QueueFull(job.owner, limit)
        job = fresh(job)
        now = self._clock()
        self._jobs[job.id] = job
        self._end_at(job.id, now + max(job.expires_at - now, 0.0) + self._settings.retention)
        entry = next(self._entry_numbers)
        self._queue.append((entry, job.id))
        self._entries[job.id] = entry
        self._queued.add(job.id)
        for index in indexes(job):
            bisect.insort(self._indexes.setdefault(index, []), (job.created_at, job.id))
        if job.idempotency is not None:
            self._idempotent[(job.owner, job.idempotency)] = job.id
        self._unfinished[job.owner] = self._unfinished.get(job.owner, 0) + 1
        self._arrived.set()
        return job

    async def get(self, job_id: str) -> Job | None:
        self._purge()
        return self._jobs.get(job_id)

    async def status(self, job_id: str) -> Status | None:
        self._purge()
        job = self._jobs.get(job_id)
        return None if job is None else job.status

    async def page(
        self, index: str, *, status: Status | None, limit: int, after: str | None
    ) -> tuple[list[Job], bool]:
        """Newest first (by ``created_at``, then id, as Redis orders a sorted set); an ``after``
        no longer in the index (its job expired) gives an empty page."""
        self._purge()
        entries = self._indexes.get(index, [])
        position = len(entries)
        if after is not None:
            job = self._jobs.get(after)
            if job is None:
                return [], False
            position = bisect.bisect_left(entries, (job.created_at, after))
            if position == len(entries) or entries[position][1] != after:
                return [], False
        jobs: list[Job] = []
        for _, job_id in reversed(entries[:position]):
            job = self._jobs[job_id]
            if status is not None and job.status is not status:
                continue
            if len(jobs) == limit:
                return jobs, True
            jobs.append(_listed(job))
        return jobs, False

    async def cancel(self, job_id: str, now: float) -> Job | None:
        self._purge()
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if job.status is Status.QUEUED:
            return self._end(job, Status.CANCELLED, None, CANCELLED, now)
        if job.status is Status.IN_PROGRESS and not job.cancel_requested:
            job = self._jobs[job_id] = job.but(cancel_requested=True)
        return job

    async def take(self, worker: str, block: float) -> Claim | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(block, 0.0)
        while True:
            claim = self._take_now()
            if claim is not None:
                return claim
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            if self._leases:  # wake when the next lease lapses, as Redis's take would see it
                lapse = min(lease.until for lease in self._leases.values()) - self._clock()
                remaining = min(remaining, max(lapse, 0.001))
            self._arrived.clear()
            # The wait ends by an arrival or by its time; either way the loop looks again.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()

    async def renew(self, claim: Claim) -> Job | None:
        """Only the current run's lease is renewed: a claim whose lease lapsed and whose job was
        taken again since gets the job as stored, and the lease stays with the new run."""
        now = self._purge()
        job = self._jobs.get(claim.job.id)
        if job is None:
            return None
        lease = self._leases.get(job.id)
        if (
            job.status is Status.IN_PROGRESS
            and lease is not None
            and lease.attempt == claim.job.attempts
        ):
            lease.until = now + self._settings.lease
            self._extend(job.id, now + self._settings.lease + self._settings.retention)
        return _state_only(job)

    async def release(self, claim: Claim) -> None:
        now = self._purge()
        job = self._jobs.get(claim.job.id)
        lease = None if job is None else self._leases.get(job.id)
        if (
            job is None
            or lease is None
            or job.status is not Status.IN_PROGRESS
            or lease.attempt != claim.job.attempts
        ):
            return  # gone, ended, or taken again since its lease lapsed: another run's now
        # As before the take: this run never began.
        job = job.but(attempts=claim.job.attempts - 1, started_at=None)
        if job.cancel_requested:
            # Queued again it would only wait for a take to cancel it: end it now, as cancel()
            # ends a queued job.
            self._end(job, Status.CANCELLED, None, CANCELLED, now)
            return
        del self._leases[job.id]
        self._jobs[job.id] = job.but(status=Status.QUEUED)
        # Back in its place: the queue is in entry order (entries are taken from its front, so
        # every entry taken is older than those still in it), and it goes before the jobs
        # submitted after it, as the Redis store's pending entry does.
        bisect.insort(self._queue, (lease.entry, job.id))
        self._queued.add(job.id)
        self._arrived.set()

    async def finish(
        self,
        claim: Claim,
        status: Status,
        result: JobResult | None,
        error: JobError | None,
        now: float,
    ) -> Job:
        if not status.terminal:
            raise ValueError(f"a job finishes completed, failed, cancelled or expired: {status}")
        self._purge()
        job = self._jobs.get(claim.job.id)
        if job is None:
            # Gone (it outlived its retention unrenewed): nothing is stored; the caller gets the
            # outcome as it would have been stored.
            return claim.job.but(
                status=status,
                result=result,
                error=error,
                finished_at=now,
                webhook_state=WebhookState.NONE,
            )
        if job.status.terminal:
            return job  # the first outcome stays
        return self._end(job, status, result, error, now)

    async def due_deliveries(self, now: float, lease: float, limit: int) -> list[Job]:
        if lease <= 0:
            raise ValueError("a delivery lease is a positive number of seconds")
        self._purge()
        jobs: list[Job] = []
        while self._schedule and len(jobs) < limit and self._schedule[0][0] <= now:
            due, job_id = heapq.heappop(self._schedule)
            if self._due.get(job_id) != due:
                continue  # stale: rescheduled or ended since
            job = self._jobs.get(job_id)
            if job is None or job.webhook_state is not WebhookState.PENDING:
                del self._due[job_id]
                continue
            self._schedule_at(job_id, now + lease)
            # Due again when the lease ends: the record lives a retention past that.
            self._extend(job_id, now + lease + self._settings.retention)
            jobs.append(job)
        return jobs

    async def delivered(
        self, job_id: str, delivery: Delivery, state: WebhookState, next_at: float | None
    ) -> Job | None:
        self._purge()
        job = self._jobs.get(job_id)
        if job is None:
            self._due.pop(job_id, None)
            return None
        job = self._jobs[job_id] = job.but(
            deliveries=(*job.deliveries, delivery), webhook_state=state
        )
        if state is not WebhookState.PENDING:
            self._due.pop(job_id, None)
        elif next_at is not None:
            self._schedule_at(job_id, next_at)
            # A schedule may reach past the retention (8 attempts span ~31.6 h by default): the
            # record lives until a retention after the next attempt.
            self._extend(job_id, next_at + self._settings.retention)
        # Pending without a time: the schedule stays as due_deliveries left it (due again when
        # its delivery lease ends), as in the Redis store.
        return job

    async def depth(self) -> int:
        self._purge()
        return len(self._queued)

    async def aclose(self) -> None:
        return None

    # -- the steps -------------------------------------------------------------------------

    def _take_now(self) -> Claim | None:
        now = self._purge()
        # Lapsed leases first (Redis: XAUTOCLAIM before XREADGROUP), oldest entry first.
        lapsed = sorted(
            (lease.entry, job_id) for job_id, lease in self._leases.items() if lease.until <= now
        )
        for entry, job_id in lapsed:
            claim = self._start(job_id, entry, now)
            if claim is not None:
                return claim
        while self._queue:
            entry, job_id = self._queue.popleft()
            if self._entries.get(job_id) != entry:
                continue  # its job was cancelled, or its record ended
            claim = self._start(job_id, entry, now)
            if claim is not None:
                return claim
        return None

    def _start(self, job_id: str, entry: int, now: float) -> Claim | None:
        """Run the job of an entry just taken, or finish it here when it must not run."""
        job = self._jobs.get(job_id)
        if job is None or job.status.terminal:
            self._let_go(job_id)
            return None
        if job.cancel_requested:  # its worker died after the cancel reached the store
            self._end(job, Status.CANCELLED, None, CANCELLED, now)
            return None
        if job.status is Status.QUEUED and now >= job.expires_at:
            self._end(job, Status.EXPIRED, None, EXPIRED, now)
            return None
        if job.attempts >= self._settings.max_attempts:  # the dead letter
            self._end(job, Status.FAILED, None, MAX_ATTEMPTS, now)
            return None
        job = self._jobs[job_id] = job.but(
            status=Status.IN_PROGRESS, attempts=job.attempts + 1, started_at=now
        )
        self._queued.discard(job_id)
        self._leases[job_id] = _Lease(entry, job.attempts, now + self._settings.lease)
        self._extend(job_id, now + self._settings.lease + self._settings.retention)
        return Claim(job=job, token=str(entry))

    def _end(
        self,
        job: Job,
        status: Status,
        result: JobResult | None,
        error: JobError | None,
        now: float,
    ) -> Job:
        hooked = job.webhook_url is not None
        self._finished(job.owner)
        job = self._jobs[job.id] = job.but(
            status=status,
            result=result,
            error=error,
            finished_at=now,
            webhook_state=WebhookState.PENDING if hooked else WebhookState.NONE,
        )
        if hooked:
            self._schedule_at(job.id, now)
        self._let_go(job.id)
        # A retention from now; a webhook's first delivery is due now, and each pending one
        # after moves the end on (``due_deliveries``, ``delivered``).
        self._end_at(job.id, self._clock() + self._settings.retention)
        return job

    def _finished(self, owner: str) -> None:
        """One of ``owner``'s jobs ended (or its record went unfinished)."""
        left = self._unfinished.get(owner, 0) - 1
        if left > 0:
            self._unfinished[owner] = left
        else:
            self._unfinished.pop(owner, None)

    def _let_go(self, job_id: str) -> None:
        """The job's entry and lease go (XACK + XDEL)."""
        self._entries.pop(job_id, None)
        self._leases.pop(job_id, None)
        self._queued.discard(job_id)

    def _schedule_at(self, job_id: str, due: float) -> None:
        self._due[job_id] = due
        heapq.heappush(self._schedule, (due, job_id))

    # -- retention -------------------------------------------------------------------------

    def _end_at(self, job_id: str, at: float) -> None:
        """The record goes at ``at``: earlier or later than before."""
        before = self._ends.get(job_id)
        self._ends[job_id] = at
        if before is None or at < before:
            heapq.heappush(self._ending, (at, job_id))
        # Later: the heap's item for the record is earlier still, and moves on when due.

    def _extend(self, job_id: str, at: float) -> None:
        """The record goes no earlier than ``at`` (it has a time, so a heap item, already)."""
        if self._ends[job_id] < at:
            self._ends[job_id] = at

    def _purge(self) -> float:
        """Drop the records whose time is up; return the clock's time."""
        now = self._clock()
        while self._ending and self._ending[0][0] <= now:
            _, job_id = heapq.heappop(self._ending)
            at = self._ends.get(job_id)
            if at is None:
                continue  # dropped already, by another item of the same record
            if at <= now:
                self._drop(job_id)
            else:
                heapq.heappush(self._ending, (at, job_id))  # its time moved on since
        return now

    def _drop(self, job_id: str) -> None:
        job = self._jobs.pop(job_id)
        del self._ends[job_id]
        if not job.status.terminal:
            self._finished(job.owner)  # gone unfinished: it no longer counts
        self._let_go(job_id)
        self._due.pop(job_id, None)
        for index in indexes(job):
            entries = self._indexes[index]
            position = bisect.bisect_left(entries, (job.created_at, job_id))
            del entries[position]
            if not entries:
                del self._indexes[index]
        key = (job.owner, job.idempotency) if job.idempotency is not None else None
        if key is not None and self._idempotent.get(key) == job_id:
            del self._idempotent[key]


# What renew and page give: copies without the bodies, though reading them costs nothing in
# process, so that code tested against this store does not come to rely on bodies the Redis
# store does not read for them.


def _state_only(job: Job) -> Job:
    """The job as ``renew`` returns it: request body empty, no result."""
    return job.but(request=replace(job.request, body=b""), result=None)


def _listed(job: Job) -> Job:
    """The job as ``page`` returns it: request body and result body empty."""
    result = job.result
    return job.but(
        request=replace(job.request, body=b""),
        result=None if result is None else replace(result, body=b""),
    )


# Shared with the Redis store, which must agree on both.
