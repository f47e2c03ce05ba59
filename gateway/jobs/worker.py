"""The workers of one gateway process: take jobs from the store, run them, store the outcome.

Bounds (``jobs.concurrency``, ``jobs.per_key_concurrency``) are per process: at most
``concurrency`` jobs run at once, at most ``per_key_concurrency`` of one key; the process holds
at most twice ``concurrency`` jobs taken from the queue (the ones beyond wait here for their
key's turn, their leases kept), so a burst of one key's jobs cannot take every slot from the
others' for long, and a burst of jobs cannot take more upstream connections than the bound.

While a job is held (waiting or running) its lease is renewed every third of ``jobs.lease`` (at
most every half second), which is also how a cancel reaches it: ``renew`` returns the job as
stored, and a ``cancel_requested`` there cancels the run, closing its upstream request. A run
the limits refused waits the time they said and runs again, lease kept: a queued job waits for
capacity instead of failing with 429.

What a stop costs: jobs running get ``jobs.shutdown_grace`` to finish; jobs held but not
begun are given back to the queue at once (``release``), so another replica takes them without
waiting out their leases, and without counting an attempt for a run that never began (else a
few rolling deploys could dead-letter a job that never ran).

What a crash costs: a process that dies mid-run leaves its jobs' leases to lapse; another
worker takes them again (at-least-once runs). ``finish`` stores the first outcome only, so a job
whose answer was stored is never stored twice, and a job taken again after its outcome was
stored is not run again (docs/jobs.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from gateway.config.jobs import JobsSettings
from gateway.jobs.execution import JobRunner, Outcome
from gateway.jobs.model import Job, Status
from gateway.jobs.store import CANCELLED, Claim, JobStore

logger = logging.getLogger("gateway.jobs")

# How long one ``take`` blocks for a job before looking again whether to stop.
_TAKE_BLOCK = 1.0
# After the store failed (Redis down): wait before asking again, so a fault is not a busy loop.
_STORE_PAUSE = 1.0
_STORE_PAUSE_MAX = 10.0
# How long a stop waits, past the grace, for the store to take back the jobs not begun: a store
# that is away leaves them to their leases, as before there was a release.
_RELEASE_WAIT = 1.0


class _Verdict(Enum):
    ENDED = "ended"  # cancelled, or finished (or gone) elsewhere
    LOST = "lost"  # the lease lapsed and another worker took the job


def _verdict(claim: Claim, job: Job | None) -> _Verdict | None:
    """Whether a held job must stop, from what ``renew`` says of it now."""
    if job is None or job.status.terminal or job.cancel_requested:
        return _Verdict.ENDED
    if job.attempts != claim.job.attempts:
        return _Verdict.LOST
    return None


@dataclass(slots=True)
class _Held:
    """A job this process took, and whether its run began (the runner was called): what
    decides whether a stop gives it back to the queue."""

    claim: Claim
    began: bool = False


def worker_name() -> str:
    """This process's consumer name in the queue: host, pid and a random part, unique even when
    a restarted container gets the same pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


class JobWorkers:
    def __init__(
        self,
        store: JobStore,
        runner: JobRunner,
        settings: JobsSettings,
        *,
        name: str | None = None,
        clock: Callable[[], float] = time.time,
        on_finish: Callable[[Job], None] | None = None,
    ) -> None:
        self._store = store
        self._runner = runner
        self._settings = settings
        self.name = name or worker_name()
        self._clock = clock
        self._on_finish = on_finish
        self._held = asyncio.Semaphore(2 * settings.concurrency)
        self._running = asyncio.Semaphore(settings.concurrency)
        self._per_key: dict[str, asyncio.Semaphore] = {}
        self._per_key_users: dict[str, int] = {}
        # Each held job's task, and the job.
        self._tasks: dict[asyncio.Task[None], _Held] = {}
        self._loop: asyncio.Task[None] | None = None
        self._stopping = False
        self._renew_every = min(settings.lease / 3, 0.5)
        # Jobs running now in this process (the metrics' gauge).
        self.running = 0

    def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.ensure_future(self._take_loop())

    async def stop(self, grace: float = 0.0) -> None:
        """Stop taking jobs; give the running ones ``grace`` seconds to finish, then cut them
        (their leases lapse and another replica runs them again, an attempt counted: they
        began). Jobs held but not begun go back to the queue at once, their attempt not counted,
        for another replica to take now; in process the queue goes with the process."""
        loop, self._loop = self._loop, None
        # From here no run begins: ``_work`` looks at this between its last check and the
        # runner, with no await in between, so the jobs not begun now never will be.
        self._stopping = True
        # No await until the jobs not begun are known and cancelled: a task that saw
        # ``_stopping`` first would end on its own, and its job never be given back. The take
        # loop is cancelled at once (waiting out its take would add up to a second to every
        # stop): a take cut short in Redis leaves at worst one job to its lease (docs/jobs.md).
        if loop is not None:
            loop.cancel()
        unbegun = [(task, held) for task, held in self._tasks.items() if not held.began]
        for task, _ in unbegun:
            # Nothing of it is lost: it waits for a slot or a renewal, or stores the cancel of a
            # job cancelled before it began, which the release stores as well. Out of the held
            # tasks, so that a second stop does not give the claim back twice (by then another
            # worker may run the job under the same attempt count).
            del self._tasks[task]
            task.cancel()
        # Given back before the grace, not after it: another replica may run them meanwhile.
        releasing = asyncio.gather(*(self._release(held.claim) for _, held in unbegun))
        if loop is not None:
            await asyncio.gather(loop, return_exceptions=True)
        if self._tasks and grace > 0:
            await asyncio.wait(list(self._tasks), timeout=grace)
        tasks = [*self._tasks, *(task for task, _ in unbegun)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            async with asyncio.timeout(_RELEASE_WAIT):
                await releasing
        except TimeoutError:
            logger.warning("the store did not take back the jobs held: their leases lapse")

    async def _release(self, claim: Claim) -> None:
        try:
            await self._store.release(claim)
        except Exception:
            # The store is away: the lease lapses and another worker takes the job then,
            # counting one more attempt (as a stop did before there was a release).
            logger.exception("giving job %s back to the queue failed", claim.job.id)

    async def _take_loop(self) -> None:
        failures = 0
        while not self._stopping:
            await self._held.acquire()
            if self._stopping:
                self._held.release()
                return
            try:
                claim = await self._store.take(self.name, _TAKE_BLOCK)
            except asyncio.CancelledError:
                self._held.release()
                raise
            except Exception as exc:
                self._held.release()
                # An outage is said once, with its cause; then every sixtieth failed try while
                # it lasts (about every ten minutes once the back-off reaches ten seconds).
                if failures == 0:
                    logger.exception("taking a job from the store failed; retrying")
                elif failures % 60 == 0:
                    logger.warning("the job store still fails (%s)", type(exc).__name__)
                failures += 1
                await asyncio.sleep(min(_STORE_PAUSE * failures, _STORE_PAUSE_MAX))
                continue
            if failures:
                logger.info("the job store answers again")
                failures = 0
            if claim is None:
                self._held.release()
                continue
            if self._stopping:
                # Taken while the process stops: back to the queue, for another replica.
                self._held.release()
                await self._release(claim)
                return
            held = _Held(claim)
            task = asyncio.ensure_future(self._hold(held))
            self._tasks[task] = held
            task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    async def _hold(self, held: _Held) -> None:
        claim = held.claim
        owner = claim.job.owner
        gate = self._per_key.get(owner)
        if gate is None:
            gate = self._per_key[owner] = asyncio.Semaphore(self._settings.per_key_concurrency)
        self._per_key_users[owner] = self._per_key_users.get(owner, 0) + 1
        work = asyncio.ensure_future(self._work(held, gate))
        watch = asyncio.ensure_future(self._watch(claim, work))
        try:
            outcome = await work
            if outcome is None:
                return  # another worker runs it now: its outcome is the one to store
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # The process stops: a job not begun was given back by ``stop``; a run cut
                # keeps its lease, and is taken again when it lapses.
                raise
            verdict = watch.result() if watch.done() and not watch.cancelled() else None
            if verdict is _Verdict.LOST:
                return  # another worker runs it now: its outcome is the one to store
            # The job was cancelled, or finished elsewhere (then ``finish`` changes nothing and
            # only lets go of the queue entry).
            outcome = Outcome(Status.CANCELLED, None, CANCELLED)
        finally:
            watch.cancel()
            users = self._per_key_users[owner] - 1
            if users:
                self._per_key_users[owner] = users
            else:
                # No module-level growth: a key with nothing held has no gate left behind.
                del self._per_key_users[owner], self._per_key[owner]
            self._held.release()
        await self._finish(claim, outcome)

    async def _work(self, held: _Held, gate: asyncio.Semaphore) -> Outcome | None:
        """The run's outcome; None when another worker took the job meanwhile, or the process
        stops before it started."""
        claim = held.claim
        async with gate, self._running:
            self.running += 1
            try:
                while True:
                    # The wait for a slot (or for capacity) may have been long: a job cancelled
                    # meanwhile must not reach the upstream at all.
                    verdict = await self._called_off(claim)
                    if verdict is _Verdict.LOST or self._stopping:
                        return None  # not started: ``stop`` gives it back
                    if verdict is _Verdict.ENDED:
                        return Outcome(Status.CANCELLED, None, CANCELLED)
                    # Begun: a stop leaves it its grace and never gives it back. No await since
                    # the look at ``_stopping``: a stop sees it begun, or it never begins.
                    held.began = True
                    outcome = await self._runner.run(claim.job)
                    if outcome.wait is None:
                        return outcome
                    if self._clock() + outcome.wait > claim.job.expires_at:
                        # Waited for capacity as long as a job may wait (jobs.queue_timeout):
                        # it ends with the limits' refusal as its answer.
                        return outcome
                    # The limits refused the run for now: wait for capacity, keep the lease. A
                    # stop meanwhile gives it back (no run is under way while it waits).
                    held.began = False
                    await asyncio.sleep(outcome.wait)
            finally:
                self.running -= 1

    async def _called_off(self, claim: Claim) -> _Verdict | None:
        try:
            job = await self._store.renew(claim)
        except Exception:
            return None  # the store is away: run it; at-least-once allows the rare rerun
        return _verdict(claim, job)

    async def _watch(self, claim: Claim, work: asyncio.Task[Outcome | None]) -> _Verdict | None:
        """Renew the lease until the work ends; cancel the work when the job was cancelled,
        finished elsewhere, or taken by another worker (this one's lease lapsed: a stall)."""
        failing = False
        while not work.done():
            await asyncio.sleep(self._renew_every)
            try:
                job = await self._store.renew(claim)
            except Exception:
                # Redis away for a moment: the lease may lapse and the job run twice, which
                # at-least-once allows; the run goes on. Said once per job and outage.
                if not failing:
                    logger.warning("renewing the lease of job %s failed", claim.job.id)
                failing = True
                continue
            failing = False
            verdict = _verdict(claim, job)
            if verdict is not None:
                work.cancel()
                return verdict
        return None

    async def _finish(self, claim: Claim, outcome: Outcome) -> None:
        now = self._clock()
        for attempt in range(3):
            try:
                job = await self._store.finish(
                    claim, outcome.status, outcome.result, outcome.error, now
                )
            except Exception:
                # Not stored: after a short wait try again; in the end the lease lapses and
                # another worker runs the job again (at-least-once).
                logger.exception("storing the outcome of job %s failed", claim.job.id)
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            # Counted once: only the finish that stored this outcome (a job finished elsewhere
            # keeps its own end time).
            if self._on_finish is not None and job.finished_at == now:
                self._on_finish(job)
            return
