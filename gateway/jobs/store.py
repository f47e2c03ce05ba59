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


class JobStore(Protocol):
    async def submit(self, job: Job) -> Job:
        """Store ``job`` (``queued``) and queue it. When ``job.idempotency`` is set and the same
        owner already has a job with it (still retained), return that job and queue nothing."""
        ...

    async def get(self, job_id: str) -> Job | None: ...

    async def page(
        self, index: str, *, status: Status | None, limit: int, after: str | None
    ) -> tuple[list[Job], bool]:
        """Jobs of one index (``key:NAME`` or ``team:NAME``; every job is in its owner's and, when
        it has one, its team's), newest first, starting after the job id ``after``; and whether
        more follow."""
        ...

    async def cancel(self, job_id: str, now: float) -> Job | None:
        """Cancel: a ``queued`` job becomes ``cancelled`` at once and never runs; an
        ``in_progress`` one gets ``cancel_requested`` (its worker ends it, ``renew`` tells it);
        a finished one is left as it is. Returns the job as stored after, None if unknown."""
        ...

    async def take(self, worker: str, block: float) -> Claim | None:
        """The next job for ``worker`` to run, waiting up to ``block`` seconds for one: a queued
        job, first in first out, or one whose lease lapsed (its worker died). The job becomes
        ``in_progress`` with one more attempt, leased to ``worker``. Jobs that must not run are
        finished here and never returned: a cancelled one, one past ``expires_at``
        (``expired``), one already finished (by a worker that died before letting go of it),
        and one whose attempts reached ``max_attempts`` (``failed``, ``max_attempts_exceeded``:
        the dead letter)."""
        ...

    async def renew(self, claim: Claim) -> Job | None:
        """Extend the lease; return the job as stored now, so that the worker sees a
        ``cancel_requested`` or that it was finished elsewhere. None when it is gone."""
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
        kept for ``retention`` seconds."""
        ...

    async def due_deliveries(self, now: float, lease: float, limit: int) -> list[Job]:
        """Finished jobs whose webhook delivery is due, at most ``limit``, each leased for
        ``lease`` seconds so that no other replica delivers it meanwhile."""
        ...

    async def delivered(
        self, job_id: str, delivery: Delivery, state: WebhookState, next_at: float | None
    ) -> Job | None:
        """Record one delivery attempt; with ``state`` pending the next one is due at
        ``next_at``; delivered or failed ends the schedule."""
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
