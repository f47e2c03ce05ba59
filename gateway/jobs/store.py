"""Where jobs live: the contract every store keeps (in process, or Redis across replicas).

A store keeps the records, the queue, the leases of running jobs and the webhook schedule, and
makes each change of a job's state one atomic step, so that two replicas never both finish a
job and a replica that dies mid-run loses nothing: its lease lapses and another worker takes the
job again (at-least-once runs; ``finish`` stores the first outcome only, docs/jobs.md).

Two stores keep it: ``memory_store.MemoryStore`` (one process, lost on restart) and
``redis_store.RedisStore`` (Redis Streams with a consumer group; durable across replicas).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from redis.exceptions import RedisError

from gateway.jobs.model import Delivery, Job, JobError, JobResult, Status, WebhookState


@dataclass(frozen=True, slots=True)
class Claim:
    """A job leased to one worker: ``job`` as it was when taken (``in_progress``, the attempt
    counted), ``token`` the store's handle on its queue entry."""

    job: Job
    token: str


@dataclass(frozen=True, slots=True)
class StoreSettings:
    lease: float  # seconds a taken job stays with its worker without a renewal
    max_attempts: int  # runs begun before the job fails for good (dead letter)
    retention: float  # seconds a finished job stays readable
    # Jobs one key may have not finished yet (queued or running) before ``submit`` refuses
    # another (``jobs.max_queued_per_key``). The default is for stores built without a config
    # (tests, benches): high enough never to be what they measure.
    max_unfinished_per_key: int = 10_000

    def __post_init__(self) -> None:
        if self.max_unfinished_per_key < 1:
            raise ValueError("max_unfinished_per_key is at least 1")


class QueueFull(Exception):
    """``submit`` refused a job: its owner already has ``limit`` jobs not finished yet."""

    def __init__(self, owner: str, limit: int) -> None:
        super().__init__(f"key {owner!r} already has {limit} jobs queued or running")
        self.owner = owner
        self.limit = limit


class JobStore(Protocol):
    async def submit(self, job: Job) -> Job:
        """Store ``job`` (``queued``) and queue it. When ``job.idempotency`` is set and the same
        owner already has a job with it (still retained), return that job and queue nothing.
        Raises ``QueueFull`` (and stores nothing) when the owner already has
        ``max_unfinished_per_key`` jobs not finished (queued or in progress); an idempotent
        resubmission is answered before that count is looked at."""
        ...

    async def get(self, job_id: str) -> Job | None:
        """The job as stored, complete: request body and result included."""
        ...

    async def status(self, job_id: str) -> Status | None:
        """The job's status alone, None if unknown: what a poll waiting for the end reads
        (no record is read whole)."""
        ...

    async def page(
        self, index: str, *, status: Status | None, limit: int, after: str | None
    ) -> tuple[list[Job], bool]:
        """Jobs of one index (``key:NAME`` or ``team:NAME``; every job is in its owner's and, when
        it has one, its team's), newest first, starting after the job id ``after``; and whether
        more follow. Result bodies and request bodies are left out (empty: ``b""``; a result's
        status and headers are kept); ``get()`` has them."""
        ...

    async def cancel(self, job_id: str, now: float) -> Job | None:
        """Cancel: a ``queued`` job becomes ``cancelled`` at once and never runs; an
        ``in_progress`` one gets ``cancel_requested`` (its worker ends it, ``renew`` tells it);
        a finished one is left as it is. Returns the job as stored after, None if unknown."""
        ...

    async def take(self, worker: str, block: float) -> Claim | None:
        """The next job for ``worker`` to run, waiting up to ``block`` seconds for one: a queued
        job, first in first out, or one whose lease lapsed (its worker died; a store may look
        through the leases a bounded number per call, so a lapsed one can wait a few calls).
        The job becomes
        ``in_progress`` with one more attempt, leased to ``worker``. Jobs that must not run are
        finished here and never returned: a cancelled one, one past ``expires_at``
        (``expired``), one already finished (by a worker that died before letting go of it),
        and one whose attempts reached ``max_attempts`` (``failed``, ``max_attempts_exceeded``:
        the dead letter)."""
        ...

    async def renew(self, claim: Claim) -> Job | None:
        """Extend the lease; return the job as stored now, its request body empty (``b""``) and
        its result None, so that the worker sees a ``cancel_requested`` or that it was finished
        elsewhere (status, attempts, cancel_requested) without the bodies being read every
        renewal. None when it is gone."""
        ...

    async def release(self, claim: Claim) -> None:
        """Give a taken job that did not start back to the queue at once (its worker stops
        before running it): ``queued`` again, the attempt of this take not counted (``attempts``
        as before it, ``started_at`` cleared), takeable by any worker now rather than when the lease
        would have lapsed, in its place in the queue (ahead of the jobs submitted after it).
        Without this each stop of a process holding the job would count an attempt for a run
        that never began, and a few rolling deploys would dead-letter it.

        A job whose cancel was asked meanwhile is not queued again but ends ``cancelled`` (its
        attempt not counted either), as a queued job's cancel ends it. A no-op when the claim
        is no longer the current run's (its lease lapsed and the job was taken again: attempts
        differ), when the job ended, or when it is gone. A claim given back is spent: its worker
        uses it no more (once another worker took the job again, the attempts are the same as
        the claim's, and the store could not tell a second release of it from that worker's)."""
        ...

    async def finish(
        self,
        claim: Claim,
        status: Status,
        result: JobResult | None,
        error: JobError | None,
        now: float,
    ) -> Job:
        """Store the outcome, once: only a job not finished yet changes (a second finish of the
        same job, by a worker whose lease had lapsed, changes nothing and returns what is
        stored). The queue entry goes; a webhook, if the job has one, is due now; the record is
        kept for ``retention`` seconds (longer while its webhook is pending, see
        ``delivered``)."""
        ...

    async def due_deliveries(self, now: float, lease: float, limit: int) -> list[Job]:
        """Finished jobs whose webhook delivery is due, at most ``limit``, each leased for
        ``lease`` seconds so that no other replica delivers it meanwhile (and kept at least
        until that lease ends plus ``retention``). Complete jobs: the webhook carries the
        result."""
        ...

    async def delivered(
        self, job_id: str, delivery: Delivery, state: WebhookState, next_at: float | None
    ) -> Job | None:
        """Record one delivery attempt; with ``state`` pending the next one is due at
        ``next_at``, and the record (with its idempotency key) is kept at least until
        ``next_at`` + ``retention``, so that a schedule longer than the retention still finds
        it; delivered or failed ends the schedule."""
        ...

    async def depth(self) -> int:
        """Jobs queued and not yet taken."""
        ...

    async def aclose(self) -> None: ...


# The error codes a store itself finishes a job with.
MAX_ATTEMPTS = JobError(
    "max_attempts_exceeded",
    "The job was started the maximum number of times without finishing (its gateway replica "
    "stopped each time); it will not run again.",
)
EXPIRED = JobError("expired", "The job waited in the queue past its deadline and never ran.")
CANCELLED = JobError("cancelled", "The job was cancelled.")


# -- what every store does the same way -----------------------------------------------------

# What a store that cannot be reached raises (redis-py's errors, sockets): callers answer 503
# rather than 500. The in-process store raises none of them.
STORE_FAILURES = (RedisError, OSError)


def fresh(job: Job) -> Job:
    """A job as submitted: nothing run, nothing delivered; its webhook waits if it has one."""
    return job.but(
        started_at=None,
        finished_at=None,
        attempts=0,
        cancel_requested=False,
        result=None,
        error=None,
        webhook_state=WebhookState.NONE if job.webhook_url is None else WebhookState.WAITING,
        deliveries=(),
    )


def indexes(job: Job) -> list[str]:
    """Every job is in its owner's index and, when it has one, its team's."""
    names = [f"key:{job.owner}"]
    if job.team is not None:
        names.append(f"team:{job.team}")
    return names
