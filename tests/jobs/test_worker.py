"""The workers: a lost lease stops a run without storing anything; a stop lets running jobs
finish within its grace and gives the jobs held but not begun back to the queue. The runs go
through a small ASGI app standing in for the relay, so that the test controls how long a run
takes and sees when one is cut."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from gateway.config.jobs import JobsSettings
from gateway.jobs.execution import JobRunner
from gateway.jobs.memory_store import MemoryStore
from gateway.jobs.model import Job, JobRequest, Status, new_job_id
from gateway.jobs.store import Claim, StoreSettings
from gateway.jobs.worker import JobWorkers
from gateway.types import Message, Receive, Scope, Send

LEASE = 0.3


@dataclass
class SlowRelay:
    """Answers every run after ``seconds``; records runs begun, finished and cut."""

    seconds: float
    begun: int = 0
    finished: int = 0
    cut: int = 0
    bodies: list[bytes] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.begun += 1
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cut += 1
            raise
        body = f"run {self.begun}".encode()
        self.bodies.append(body)
        start: Message = {"type": "http.response.start", "status": 200, "headers": []}
        await send(start)
        await send({"type": "http.response.body", "body": body})
        self.finished += 1


class Stalling:
    """A store whose takes and renewals fail while ``stalled``: what a worker sees when Redis
    is away for a moment (its lease then lapses, and another worker may take the job)."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.stalled = False
        # The job's status each time this store's worker went to finish it.
        self.finishing: list[Status] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)

    async def take(self, worker: str, block: float) -> Claim | None:
        if self.stalled:
            await asyncio.sleep(block)
            raise ConnectionError("the store is away")
        return await self.store.take(worker, block)

    async def renew(self, claim: Claim) -> Job | None:
        if self.stalled:
            raise ConnectionError("the store is away")
        return await self.store.renew(claim)

    async def finish(self, claim: Claim, *args: object) -> Job:
        before = await self.store.get(claim.job.id)
        assert before is not None
        self.finishing.append(before.status)
        return await self.store.finish(claim, *args)  # type: ignore[arg-type]


def a_job() -> Job:
    now = time.time()
    request = JobRequest("POST", "/v1/chat/completions", b"", (), b"{}")
    return Job(new_job_id(), "owner", None, Status.QUEUED, now, now + 60, request)


def settings(**changes: object) -> JobsSettings:
    return JobsSettings.model_validate({"lease": LEASE, **changes})


async def wait_until(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)


async def test_a_worker_that_lost_its_lease_stops_its_run_and_stores_nothing() -> None:
    store = MemoryStore(StoreSettings(lease=LEASE, max_attempts=5, retention=60))
    stalling = Stalling(store)
    # The first run would end before the second: without noticing the loss, the first worker
    # would store its outcome over the second's live run.
    first_relay, second_relay = SlowRelay(1.0), SlowRelay(1.5)
    first = JobWorkers(stalling, JobRunner(first_relay, 1 << 20), settings(), name="first")  # type: ignore[arg-type]
    second = JobWorkers(store, JobRunner(second_relay, 1 << 20), settings(), name="second")
    job = await store.submit(a_job())
    first.start()
    await wait_until(lambda: first_relay.begun == 1)
    stalling.stalled = True  # first's renewals fail: its lease lapses
    await asyncio.sleep(LEASE * 1.5)
    second.start()  # takes the lapsed job: another attempt
    await wait_until(lambda: second_relay.begun == 1)
    stalling.stalled = False  # first learns it lost the job at its next renewal
    # (its take, already waiting when the store went away, may have taken the job back once
    # its own lease lapsed: that run is cut as well)
    await wait_until(lambda: first_relay.cut >= 1 and first_relay.cut == first_relay.begun)
    await wait_until(lambda: second_relay.finished == 1)
    await asyncio.sleep(0.2)
    await first.stop()
    await second.stop()
    stored = await store.get(job.id)
    assert stored is not None
    assert stored.status is Status.COMPLETED
    assert stored.attempts >= 2
    assert stored.result is not None
    assert stored.result.body == second_relay.bodies[0]
    assert first_relay.finished == 0
    # The first worker never finished the job while another ran it (that would have stored a
    # cancel over a live run); at most it let go of it once it was over.
    assert all(status.terminal for status in stalling.finishing)


async def test_stop_gives_running_jobs_their_grace_and_leaves_the_rest() -> None:
    store = MemoryStore(StoreSettings(lease=LEASE, max_attempts=5, retention=60))
    relay = SlowRelay(0.3)
    workers = JobWorkers(store, JobRunner(relay, 1 << 20), settings(concurrency=1), name="w")
    running, held = await store.submit(a_job()), await store.submit(a_job())
    workers.start()
    await wait_until(lambda: relay.begun == 1)
    await workers.stop(grace=2.0)
    finished = await store.get(running.id)
    waiting = await store.get(held.id)
    assert finished is not None
    assert finished.status is Status.COMPLETED
    assert relay.begun == 1  # the held job was not started by a stopping process
    assert waiting is not None
    assert waiting.status is Status.QUEUED  # given back, its take not counted
    assert waiting.attempts == 0


async def test_stop_cuts_what_outlives_the_grace() -> None:
    store = MemoryStore(StoreSettings(lease=LEASE, max_attempts=5, retention=60))
    relay = SlowRelay(5.0)
    workers = JobWorkers(store, JobRunner(relay, 1 << 20), settings(), name="w")
    job = await store.submit(a_job())
    workers.start()
    await wait_until(lambda: relay.begun == 1)
    started = time.monotonic()
    await workers.stop(grace=0.2)
    assert time.monotonic() - started < 1.0
    assert relay.cut == 1
    stored = await store.get(job.id)
    assert stored is not None
    assert stored.status is Status.IN_PROGRESS


async def test_stop_releases_held_jobs_to_another_worker_at_once() -> None:
    """A job held but not begun when its process stops goes back to the queue at once: another
    worker runs it well within a lease, as its first attempt (the stop counts none), while the
    stopping process's running job still has its grace."""
    lease = 30.0  # what the second worker would wait for without the release
    store = MemoryStore(StoreSettings(lease=lease, max_attempts=5, retention=60))
    first_relay, second_relay = SlowRelay(1.0), SlowRelay(0.05)
    first = JobWorkers(
        store,
        JobRunner(first_relay, 1 << 20),
        settings(lease=lease, concurrency=1),  # holds two jobs, runs one
        name="first",
    )
    second = JobWorkers(
        store, JobRunner(second_relay, 1 << 20), settings(lease=lease), name="second"
    )
    running, held = await store.submit(a_job()), await store.submit(a_job())
    first.start()
    await wait_until(lambda: first_relay.begun == 1)
    deadline = time.monotonic() + 5.0
    while await store.status(held.id) is not Status.IN_PROGRESS:  # taken, waiting for a slot
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    second.start()  # finds nothing to take: both jobs are the first's
    await asyncio.sleep(0.1)
    assert second_relay.begun == 0

    started = time.monotonic()
    stopping = asyncio.ensure_future(first.stop(grace=5.0))
    await wait_until(lambda: second_relay.finished == 1, timeout=2.0)
    assert time.monotonic() - started < 1.0  # well under a lease
    assert first_relay.finished == 0  # given back at the start of the stop, not after the grace
    assert not stopping.done()
    await stopping
    await second.stop()

    assert first_relay.begun == 1  # the held job was never started by the stopping process
    ran = await store.get(held.id)
    assert ran is not None
    assert ran.status is Status.COMPLETED
    assert ran.attempts == 1  # the first's take of it is not counted
    assert ran.result is not None
    assert ran.result.body == second_relay.bodies[0]
    finished = await store.get(running.id)
    assert finished is not None
    assert finished.status is Status.COMPLETED  # within its grace
    assert finished.attempts == 1
