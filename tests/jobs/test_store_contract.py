"""The job store contract (``gateway/jobs/store.py``) as a specification, held by every store.

Each test runs against the in-process store and the Redis one on a private redis-server, and
those that need not wait out a lease also on a Redis Cluster; with two replicas: for Redis two
stores with clients of their own on one server, in process the one store. Leases are 0.3 s and
retention 1 s (``conftest.SETTINGS``): Redis counts them on its own clock, so those tests wait
for real; the in-process store's clock is moved instead. The last tests are Redis's own: what
it leaves in Redis.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.jobs.memory_store import MemoryStore
from gateway.jobs.model import (
    Delivery,
    Job,
    JobError,
    JobRequest,
    JobResult,
    Status,
    WebhookState,
    new_job_id,
)
from gateway.jobs.redis_store import RedisStore
from gateway.jobs.store import (
    CANCELLED,
    EXPIRED,
    MAX_ATTEMPTS,
    JobStore,
    QueueFull,
    StoreSettings,
)
from tests.jobs.conftest import SETTINGS, Backend, FakeClock
from tests.support.redisserver import RedisServer

LEASE = SETTINGS.lease
# Past a lease, with room for a loaded machine's scheduling.
LAPSE = LEASE + 0.1
# Tests that wait out leases or retention, for Redis in real time: not repeated on the Cluster,
# where they would only test the same scripts again (which one slot makes run there at all is
# shown by the others).
WAITS = pytest.mark.parametrize("backend", ["memory", "redis"], indirect=True)
RESULT = JobResult(
    200,
    ((b"content-type", b"application/json"), (b"x-raw", bytes(range(128, 256)))),
    b'{"id": "chatcmpl-1"}' + bytes(range(256)),
)


def job(
    backend: Backend,
    *,
    owner: str = "alice",
    team: str | None = "research",
    webhook: str | None = None,
    idempotency: str | None = None,
    queue_for: float = 3600.0,
    age: float = 0.0,
    body: bytes = b'{"model": "gpt-4o", "messages": []}',
) -> Job:
    """A job as the endpoint makes it: queued, never run, with a request to replay."""
    now = backend.now() - age
    return Job(
        id=new_job_id(),
        owner=owner,
        team=team,
        status=Status.QUEUED,
        created_at=now,
        expires_at=now + queue_for,
        request=JobRequest(
            method="POST",
            path="/v1/chat/completions",
            query=b"stream=false",
            headers=((b"content-type", b"application/json"), (b"x-odd", b"\xff\x00")),
            body=body,
        ),
        metadata={"run": "42", "note": "caf\u00e9"},
        webhook_url=webhook,
        webhook_state=WebhookState.NONE if webhook is None else WebhookState.WAITING,
        idempotency=idempotency,
    )


def ids(jobs: list[Job]) -> list[str]:
    return [j.id for j in jobs]


def state_only(stored: Job) -> Job:
    """A job as ``renew`` gives it: no request body, no result."""
    return stored.but(request=dataclasses.replace(stored.request, body=b""), result=None)


def listed(stored: Job) -> Job:
    """A job as ``page`` gives it: no request body, no result body."""
    result = stored.result
    return stored.but(
        request=dataclasses.replace(stored.request, body=b""),
        result=None if result is None else dataclasses.replace(result, body=b""),
    )


def settings(**changes: Any) -> StoreSettings:
    return dataclasses.replace(SETTINGS, **changes)


async def status_of(store: JobStore, job_id: str) -> Status:
    stored = await store.get(job_id)
    assert stored is not None
    return stored.status


# -- submit, take ----------------------------------------------------------------------------


async def test_a_submitted_job_reads_back_as_submitted(backend: Backend) -> None:
    a, b = backend.replicas()
    submitted = job(backend, webhook="https://hooks.example/jobs", idempotency="ab" * 32)
    stored = await a.submit(submitted)
    assert stored == submitted
    assert await a.get(submitted.id) == submitted
    assert await b.get(submitted.id) == submitted  # the other replica sees it
    assert await a.get(new_job_id()) is None
    assert await a.depth() == 1


async def test_a_submitted_job_is_taken_once(backend: Backend) -> None:
    a, b = backend.replicas()
    submitted = await a.submit(job(backend))
    before = backend.now()
    claim = await b.take("worker-b", 0)
    assert claim is not None
    assert claim.job.id == submitted.id
    assert claim.job.status is Status.IN_PROGRESS
    assert claim.job.attempts == 1
    assert claim.job.started_at is not None
    assert before <= claim.job.started_at <= backend.now()
    assert claim.job == dataclasses.replace(
        submitted, status=Status.IN_PROGRESS, attempts=1, started_at=claim.job.started_at
    )
    assert await a.get(submitted.id) == claim.job
    assert await a.depth() == 0
    assert await a.take("worker-a", 0) is None
    assert await b.take("worker-b", 0) is None


async def test_take_is_first_in_first_out(backend: Backend) -> None:
    a, b = backend.replicas()
    submitted = [await a.submit(job(backend, owner=f"key{i}")) for i in range(4)]
    taken: list[str] = []
    for store in (b, a, b, a):
        claim = await store.take(f"worker-{len(taken)}", 0)
        assert claim is not None
        taken.append(claim.job.id)
    assert taken == ids(submitted)


async def test_take_waits_up_to_block_for_a_job(backend: Backend) -> None:
    a, b = backend.replicas()
    started = time.monotonic()
    assert await a.take("worker-a", 0.2) is None
    assert 0.15 <= time.monotonic() - started < 2.0

    waiting = asyncio.ensure_future(a.take("worker-a", 5.0))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    submitted = await b.submit(job(backend))
    started = time.monotonic()
    claim = await asyncio.wait_for(waiting, 5.0)
    assert claim is not None
    assert claim.job.id == submitted.id
    assert time.monotonic() - started < 1.0  # woken by the submit, not by the end of the wait


# -- leases ----------------------------------------------------------------------------------


@WAITS
async def test_a_lapsed_lease_lets_another_worker_take_the_job(backend: Backend) -> None:
    a, b = backend.replicas()
    submitted = await a.submit(job(backend))
    first = await a.take("worker-a", 0)
    assert first is not None
    await backend.advance(LEASE / 2)
    assert await b.take("worker-b", 0) is None  # leased
    await backend.advance(LAPSE)  # worker-a died: no renewal
    second = await b.take("worker-b", 0)
    assert second is not None
    assert second.job.id == submitted.id
    assert second.job.status is Status.IN_PROGRESS
    assert second.job.attempts == 2


@WAITS
async def test_a_lapsed_lease_not_yet_taken_is_renewed(backend: Backend) -> None:
    a, b = backend.replicas()
    await a.submit(job(backend))
    claim = await a.take("worker-a", 0)
    assert claim is not None
    await backend.advance(LAPSE)  # a long pause, nobody took it meanwhile
    renewed = await a.renew(claim)
    assert renewed is not None
    assert renewed.attempts == 1
    assert await b.take("worker-b", 0) is None  # the lease runs again from the renewal


@WAITS
async def test_renewal_keeps_a_long_job_from_a_second_worker(backend: Backend) -> None:
    a, b = backend.replicas()
    await a.submit(job(backend))
    claim = await a.take("worker-a", 0)
    assert claim is not None
    for _ in range(5):  # 5 x lease/3: well past one lease in all
        await backend.advance(LEASE / 3)
        renewed = await a.renew(claim)
        assert renewed is not None
        assert renewed.status is Status.IN_PROGRESS
        assert await b.take("worker-b", 0) is None
    await backend.advance(LAPSE)  # renewals stop: the worker died
    again = await b.take("worker-b", 0)
    assert again is not None
    assert again.job.attempts == 2


@WAITS
async def test_a_lapsed_workers_renewal_does_not_take_the_job_back(backend: Backend) -> None:
    a, b = backend.replicas()
    await a.submit(job(backend))
    stale = await a.take("worker-a", 0)
    assert stale is not None
    await backend.advance(LAPSE)
    current = await b.take("worker-b", 0)
    assert current is not None
    await backend.advance(LEASE / 2)
    seen = await a.renew(stale)  # worker-a was only slow: it sees the job run on elsewhere
    assert seen is not None
    assert seen.status is Status.IN_PROGRESS
    assert seen.attempts == 2
    # That renewal extended nothing: worker-b's lease lapses a lease after its take.
    await backend.advance(LEASE / 2 + 0.1)
    third = await b.take("worker-c", 0)
    assert third is not None
    assert third.job.attempts == 3


@WAITS
async def test_renew_of_a_job_gone_is_none(backend: Backend) -> None:
    a, _ = backend.replicas(StoreSettings(lease=LEASE, max_attempts=3, retention=0.3))
    await a.submit(job(backend, queue_for=0.1))
    claim = await a.take("worker-a", 0)
    assert claim is not None
    await a.finish(claim, Status.COMPLETED, RESULT, None, backend.now())
    await backend.advance(0.5)
    assert await a.renew(claim) is None


# -- release -------------------------------------------------------------------------------


async def test_a_released_job_is_taken_at_once_by_another_worker_without_an_attempt_counted(
    backend: Backend,
) -> None:
    """A worker that stops gives back a job it took and did not start: queued again as it was
    before the take, another worker takes it at once (no lease waited out, which the Redis
    runs would otherwise need: no time passes here), first, and that run is its first."""
    a, b = backend.replicas(settings(max_unfinished_per_key=2))
    digest = "3c" * 32
    submitted = await a.submit(
        job(backend, webhook="https://hooks.example/jobs", idempotency=digest)
    )
    later = await a.submit(job(backend))
    claim = await a.take("worker-a", 0)
    assert claim is not None
    assert claim.job.id == submitted.id
    assert await a.depth() == 1

    await a.release(claim)
    assert await b.get(submitted.id) == submitted  # queued, attempts 0, started_at None
    assert await b.status(submitted.id) is Status.QUEUED
    assert await b.depth() == 2
    page, _ = await b.page("key:alice", status=Status.QUEUED, limit=10, after=None)
    assert sorted(ids(page)) == sorted([submitted.id, later.id])
    # Still one job, still counted once: the idempotency key answers with it, and the key
    # has no room for a third job.
    assert await b.submit(job(backend, idempotency=digest)) == submitted
    with pytest.raises(QueueFull):
        await b.submit(job(backend))

    again = await b.take("worker-b", 0)
    assert again is not None
    assert again.job.id == submitted.id  # its place kept: before the job submitted after it
    assert again.token == claim.token  # the same queue entry
    assert again.job.attempts == 1
    assert again.job.status is Status.IN_PROGRESS
    assert again.job.started_at is not None
    assert await a.depth() == 1
    assert await a.renew(again) == state_only(again.job)
    done = await b.finish(again, Status.COMPLETED, RESULT, None, backend.now())
    assert done.attempts == 1
    assert ids(await a.due_deliveries(backend.now(), 30, 10)) == [submitted.id]
    await a.submit(job(backend))  # the finished job freed its place
    nxt = await a.take("worker-a", 0)
    assert nxt is not None
    assert nxt.job.id == later.id


@WAITS
async def test_release_of_a_claim_that_is_no_longer_ours_changes_nothing(
    backend: Backend,
) -> None:
    """A claim whose lease lapsed and whose job another worker took since, one whose job ended,
    and one whose job is gone: each release leaves the store as it was."""
    a, b = backend.replicas(settings(retention=0.3, max_unfinished_per_key=1))
    submitted = await a.submit(job(backend))
    stale = await a.take("worker-a", 0)
    assert stale is not None
    await backend.advance(LAPSE)
    current = await b.take("worker-b", 0)
    assert current is not None
    assert current.job.attempts == 2

    await a.release(stale)  # taken again since: worker-b's run now
    assert await a.get(submitted.id) == current.job
    assert await a.depth() == 0
    assert await b.take("worker-c", 0) is None  # worker-b's lease holds: nothing given back
    with pytest.raises(QueueFull):  # still counted, once
        await a.submit(job(backend))

    done = await b.finish(current, Status.COMPLETED, RESULT, None, backend.now())
    await b.release(current)  # ended
    await a.release(stale)
    assert await a.get(submitted.id) == done
    assert await a.depth() == 0
    assert await b.take("worker-c", 0) is None

    await backend.advance(0.4)  # past the retention: gone
    assert await a.get(submitted.id) is None
    await b.release(current)
    assert await a.get(submitted.id) is None
    fresh = await a.submit(job(backend))  # the bound counts nothing of it
    taken = await b.take("worker-c", 0)
    assert taken is not None
    assert taken.job.id == fresh.id


async def test_a_released_job_whose_cancel_was_asked_ends_cancelled(backend: Backend) -> None:
    """Queued again it would only wait for a take to cancel it: it ends now, as the cancel of a
    queued job does, and never runs."""
    a, b = backend.replicas(settings(max_unfinished_per_key=1))
    submitted = await a.submit(job(backend, webhook="https://hooks.example/jobs"))
    claim = await a.take("worker-a", 0)
    assert claim is not None
    asked = await b.cancel(submitted.id, backend.now())
    assert asked is not None
    assert asked.cancel_requested
    await a.release(claim)
    ended = await b.get(submitted.id)
    assert ended is not None
    assert ended.status is Status.CANCELLED
    assert ended.error == CANCELLED
    assert ended.attempts == 0  # as a queued job's cancel leaves it: it never ran
    assert ended.started_at is None
    assert ended.webhook_state is WebhookState.PENDING
    assert await a.depth() == 0
    assert await b.take("worker-b", 0) is None
    assert ids(await a.due_deliveries(backend.now(), 30, 10)) == [submitted.id]
    await a.submit(job(backend))  # its place is free


# -- finish --------------------------------------------------------------------------------


@WAITS
async def test_finish_stores_the_first_outcome_only(backend: Backend) -> None:
    a, b = backend.replicas()
    submitted = await a.submit(job(backend))
    stale = await a.take("worker-a", 0)
    assert stale is not None
    await backend.advance(LAPSE)
    current = await b.take("worker-b", 0)
    assert current is not None

    at = backend.now()
    done = await b.finish(current, Status.COMPLETED, RESULT, None, at)
    assert done.status is Status.COMPLETED
    assert done.result == RESULT  # byte for byte, headers and body
    assert done.error is None
    assert done.finished_at == at
    assert done.attempts == 2
    assert done.webhook_state is WebhookState.NONE

    late = await a.finish(stale, Status.FAILED, None, JobError("upstream_error", "502"), at + 1)
    assert late == done
    assert await a.get(submitted.id) == done
    seen = await a.renew(stale)  # what the slow worker's watch sees: finished elsewhere
    assert seen == state_only(done)
    assert await b.take("worker-b", 0) is None
    assert await a.depth() == 0


async def test_finish_records_a_failure(backend: Backend) -> None:
    a, _ = backend.replicas()
    await a.submit(job(backend))
    claim = await a.take("worker-a", 0)
    assert claim is not None
    error = JobError("result_too_large", "The answer was larger than 16 MiB.")
    failed = await a.finish(claim, Status.FAILED, None, error, backend.now())
    assert failed.status is Status.FAILED
    assert failed.error == error
    assert failed.result is None
    assert await a.get(claim.job.id) == failed
    with pytest.raises(ValueError, match="finishes"):
        await a.finish(claim, Status.IN_PROGRESS, None, None, backend.now())


@WAITS
async def test_a_job_finished_before_its_worker_let_go_is_not_run_again(
    backend: Backend,
) -> None:
    """Its outcome is stored but its queue entry was never let go (the finish that stored it
    did not name the entry: a worker of another version, or a crash between the two, which the
    stores' own finish makes one step). Taken again after the lease, it is let go, not run."""
    a, b = backend.replicas()
    submitted = await a.submit(job(backend))
    claim = await a.take("worker-a", 0)
    assert claim is not None
    elsewhere = dataclasses.replace(claim, token="0-1")  # no such entry
    done = await a.finish(elsewhere, Status.COMPLETED, RESULT, None, backend.now())
    await backend.advance(LAPSE)
    assert await b.take("worker-b", 0) is None
    assert await a.get(submitted.id) == done
    fresh = await a.submit(job(backend))  # and the queue goes on
    after = await b.take("worker-b", 0)
    assert after is not None
    assert after.job.id == fresh.id


@WAITS
async def test_max_attempts_dead_letters_the_job(backend: Backend) -> None:
    a, b = backend.replicas(StoreSettings(lease=LEASE, max_attempts=2, retention=1.0))
    submitted = await a.submit(job(backend, webhook="https://hooks.example/jobs"))
    for attempt in (1, 2):
        claim = await (a if attempt == 1 else b).take(f"worker-{attempt}", 0)
        assert claim is not None
        assert claim.job.attempts == attempt
        await backend.advance(LAPSE)  # each worker dies mid-run
    at = backend.now()
    assert await a.take("worker-3", 0) is None
    dead = await b.get(submitted.id)
    assert dead is not None
    assert dead.status is Status.FAILED
    assert dead.error == MAX_ATTEMPTS
    assert dead.attempts == 2
    assert dead.finished_at is not None
    assert at <= dead.finished_at <= backend.now()
    assert dead.webhook_state is WebhookState.PENDING
    assert ids(await a.due_deliveries(backend.now(), 30, 10)) == [submitted.id]


@WAITS
async def test_a_queued_job_past_its_deadline_expires(backend: Backend) -> None:
    a, b = backend.replicas()
    late = await a.submit(job(backend, queue_for=0.2, webhook="https://hooks.example/jobs"))
    timely = await a.submit(job(backend))
    await backend.advance(0.3)
    claim = await b.take("worker-b", 0)
    assert claim is not None
    assert claim.job.id == timely.id  # the expired one is skipped, not returned
    expired = await a.get(late.id)
    assert expired is not None
    assert expired.status is Status.EXPIRED
    assert expired.error == EXPIRED
    assert expired.attempts == 0
    assert expired.started_at is None
    assert expired.finished_at is not None
    assert expired.webhook_state is WebhookState.PENDING
    assert await a.depth() == 0


# -- cancel --------------------------------------------------------------------------------


async def test_cancel_of_a_queued_job_means_it_never_runs(backend: Backend) -> None:
    a, b = backend.replicas()
    doomed = await a.submit(job(backend, webhook="https://hooks.example/jobs"))
    other = await a.submit(job(backend))
    assert await a.depth() == 2
    at = backend.now()
    cancelled = await b.cancel(doomed.id, at)
    assert cancelled is not None
    assert cancelled.status is Status.CANCELLED
    assert cancelled.finished_at == at
    assert cancelled.webhook_state is WebhookState.PENDING
    assert await a.get(doomed.id) == cancelled
    assert await a.depth() == 1
    claim = await a.take("worker-a", 0)
    assert claim is not None
    assert claim.job.id == other.id
    assert await a.take("worker-a", 0) is None
    assert await a.cancel(doomed.id, at + 5) == cancelled  # finished: left as it is
    assert await a.cancel(new_job_id(), at) is None
    assert ids(await a.due_deliveries(at, 30, 10)) == [doomed.id]


async def test_cancel_of_a_running_job_is_seen_by_renew(backend: Backend) -> None:
    a, b = backend.replicas()
    await a.submit(job(backend))
    claim = await a.take("worker-a", 0)
    assert claim is not None
    assert claim.job.cancel_requested is False
    asked = await b.cancel(claim.job.id, backend.now())
    assert asked is not None
    assert asked.status is Status.IN_PROGRESS
    assert asked.cancel_requested is True
    renewed = await a.renew(claim)
    assert renewed is not None
    assert renewed.cancel_requested is True
    stopped = JobError("cancelled", "The job was cancelled while it ran.")
    ended = await a.finish(claim, Status.CANCELLED, None, stopped, backend.now())
    assert ended.status is Status.CANCELLED
    assert ended.error == stopped


@WAITS
async def test_a_cancelled_job_whose_worker_died_is_not_run_again(backend: Backend) -> None:
    a, b = backend.replicas()
    submitted = await a.submit(job(backend))
    claim = await a.take("worker-a", 0)
    assert claim is not None
    await b.cancel(submitted.id, backend.now())
    await backend.advance(LAPSE)  # worker-a died before its watch saw the cancel
    assert await b.take("worker-b", 0) is None
    assert await status_of(a, submitted.id) is Status.CANCELLED


# -- idempotency ---------------------------------------------------------------------------


async def test_the_same_idempotency_key_returns_the_same_job(backend: Backend) -> None:
    a, b = backend.replicas()
    digest = "0f" * 32
    first = await a.submit(job(backend, idempotency=digest))
    again = await b.submit(job(backend, idempotency=digest))
    assert again == first
    assert await a.depth() == 1
    # Another key's job with the same digest is its own.
    other = await a.submit(job(backend, owner="bob", idempotency=digest))
    assert other.id != first.id
    # A job that finished is still the answer while it is retained.
    claim = await a.take("worker-a", 0)
    assert claim is not None
    done = await a.finish(claim, Status.COMPLETED, RESULT, None, backend.now())
    assert await b.submit(job(backend, idempotency=digest)) == done


async def test_two_concurrent_submits_with_one_idempotency_key_make_one_job(
    backend: Backend,
) -> None:
    a, b = backend.replicas()
    digest = "7e" * 32
    made = await asyncio.gather(
        *(store.submit(job(backend, idempotency=digest)) for store in (a, b, a, b, a, b))
    )
    assert len({made_job.id for made_job in made}) == 1
    assert await a.depth() == 1
    page, more = await a.page("key:alice", status=None, limit=10, after=None)
    assert ids(page) == [made[0].id]
    assert not more


# -- pages ---------------------------------------------------------------------------------


async def test_page_is_newest_first_with_a_cursor_and_status_filter(backend: Backend) -> None:
    a, b = backend.replicas()
    made = [await a.submit(job(backend, age=10 - i)) for i in range(5)]  # oldest first
    newest = list(reversed(ids(made)))

    page, more = await b.page("key:alice", status=None, limit=2, after=None)
    assert (ids(page), more) == (newest[:2], True)
    page, more = await b.page("key:alice", status=None, limit=2, after=page[-1].id)
    assert (ids(page), more) == (newest[2:4], True)
    page, more = await b.page("key:alice", status=None, limit=2, after=page[-1].id)
    assert (ids(page), more) == (newest[4:], False)
    page, more = await b.page("key:alice", status=None, limit=5, after=None)
    assert (ids(page), more) == (newest, False)
    assert page[0] == listed(made[-1])

    # The oldest two run; one of them finishes.
    first = await a.take("worker-a", 0)
    second = await a.take("worker-a", 0)
    assert first is not None
    assert second is not None
    await a.finish(first, Status.COMPLETED, RESULT, None, backend.now())
    page, more = await b.page("key:alice", status=Status.QUEUED, limit=2, after=None)
    assert (ids(page), more) == (newest[:2], True)
    page, more = await b.page("key:alice", status=Status.QUEUED, limit=2, after=page[-1].id)
    assert (ids(page), more) == (newest[2:3], False)
    page, more = await b.page("key:alice", status=Status.COMPLETED, limit=2, after=None)
    assert (ids(page), more) == ([made[0].id], False)
    page, more = await b.page("key:alice", status=Status.IN_PROGRESS, limit=1, after=None)
    assert (ids(page), more) == ([made[1].id], False)
    page, more = await b.page("key:alice", status=Status.FAILED, limit=2, after=None)
    assert (page, more) == ([], False)

    assert await b.page("key:nobody", status=None, limit=2, after=None) == ([], False)
    assert await b.page("key:alice", status=None, limit=2, after=new_job_id()) == ([], False)


async def test_a_long_filtered_page_reads_past_many_jobs(backend: Backend) -> None:
    """The filter is applied after reading: a rare status far down the index is still found."""
    a, b = backend.replicas()
    rare = await a.submit(job(backend, age=1000))
    for i in range(150):
        await a.submit(job(backend, age=500 - i))
    claim = await a.take("worker-a", 0)
    assert claim is not None
    assert claim.job.id == rare.id
    page, more = await b.page("key:alice", status=Status.IN_PROGRESS, limit=5, after=None)
    assert (ids(page), more) == ([rare.id], False)
    page, more = await b.page("key:alice", status=None, limit=200, after=None)
    assert len(page) == 151
    assert not more


async def test_team_index(backend: Backend) -> None:
    a, b = backend.replicas()
    alice = await a.submit(job(backend, owner="alice", team="research", age=3))
    bob = await b.submit(job(backend, owner="bob", team="research", age=2))
    carol = await a.submit(job(backend, owner="carol", team=None, age=1))
    dave = await a.submit(job(backend, owner="dave", team="sales"))
    page, more = await a.page("team:research", status=None, limit=10, after=None)
    assert (ids(page), more) == ([bob.id, alice.id], False)
    assert ids((await b.page("team:sales", status=None, limit=10, after=None))[0]) == [dave.id]
    assert ids((await b.page("key:carol", status=None, limit=10, after=None))[0]) == [carol.id]
    assert ids((await b.page("key:bob", status=None, limit=10, after=None))[0]) == [bob.id]


# -- retention -----------------------------------------------------------------------------


@WAITS
async def test_finished_jobs_expire_after_retention(backend: Backend) -> None:
    a, b = backend.replicas()
    digest = "c3" * 32
    submitted = await a.submit(
        job(backend, idempotency=digest, webhook="https://hooks.example/jobs")
    )
    waiting = await a.submit(job(backend, age=-1))  # queued for an hour: it stays
    claim = await a.take("worker-a", 0)
    assert claim is not None
    await a.finish(claim, Status.COMPLETED, RESULT, None, backend.now())
    await backend.advance(SETTINGS.retention / 2)
    assert await b.get(submitted.id) is not None
    await backend.advance(SETTINGS.retention / 2 + 0.2)
    assert await b.get(submitted.id) is None
    page, more = await b.page("key:alice", status=None, limit=10, after=None)
    assert (ids(page), more) == ([waiting.id], False)
    assert await a.due_deliveries(backend.now(), 30, 10) == []
    # Its idempotency key went with it: the same key now makes a new job.
    again = await b.submit(job(backend, idempotency=digest))
    assert again.id != submitted.id
    assert await a.get(waiting.id) is not None


@WAITS
async def test_a_running_job_outlives_retention_while_renewed(backend: Backend) -> None:
    a, _ = backend.replicas(StoreSettings(lease=LEASE, max_attempts=3, retention=0.2))
    submitted = await a.submit(job(backend, queue_for=0.1))
    claim = await a.take("worker-a", 0)
    assert claim is not None
    for _ in range(6):  # 0.6 s: past the queue deadline and the retention, renewed
        await backend.advance(LEASE / 3)
        renewed = await a.renew(claim)
        assert renewed is not None
    done = await a.finish(claim, Status.COMPLETED, RESULT, None, backend.now())
    assert done.status is Status.COMPLETED
    assert await a.get(submitted.id) == done


# -- webhooks ------------------------------------------------------------------------------


async def finished_with_webhook(store: JobStore, backend: Backend) -> Job:
    submitted = await store.submit(job(backend, webhook="https://hooks.example/jobs"))
    assert submitted.webhook_state is WebhookState.WAITING
    claim = await store.take("worker", 0)
    assert claim is not None
    done = await store.finish(claim, Status.COMPLETED, RESULT, None, backend.now())
    assert done.webhook_state is WebhookState.PENDING
    return done


async def test_a_due_webhook_is_leased_to_one_replica(backend: Backend) -> None:
    a, b = backend.replicas()
    running = await a.submit(job(backend, webhook="https://hooks.example/jobs"))
    assert await a.take("worker", 0) is not None
    assert await a.due_deliveries(backend.now() + 10_000, 30, 10) == []  # not finished yet
    await a.cancel(running.id, backend.now())  # asked of a running job: not finished either
    assert await a.due_deliveries(backend.now() + 10_000, 30, 10) == []
    done = await finished_with_webhook(a, backend)
    plain = await a.submit(job(backend))  # no webhook: never due
    claim = await a.take("worker", 0)
    assert claim is not None
    await a.finish(claim, Status.COMPLETED, RESULT, None, backend.now())

    now = done.finished_at
    assert now is not None
    assert await a.due_deliveries(now - 1, 30, 10) == []  # due at its end, not before
    leased = await a.due_deliveries(now, 30, 10)
    assert leased == [done]
    assert await b.due_deliveries(now, 30, 10) == []
    assert await b.due_deliveries(now + 29, 30, 10) == []
    again = await b.due_deliveries(now + 31, 30, 10)  # the lease lapsed: that replica died
    assert ids(again) == [done.id]
    assert plain.id not in ids(again)


async def test_due_deliveries_takes_at_most_limit_oldest_first(backend: Backend) -> None:
    a, b = backend.replicas()
    first = await finished_with_webhook(a, backend)
    await backend.advance(0.01)
    second = await finished_with_webhook(a, backend)
    later = backend.now() + 1
    assert ids(await a.due_deliveries(later, 30, 1)) == [first.id]
    assert ids(await b.due_deliveries(later, 30, 1)) == [second.id]
    assert await a.due_deliveries(later, 30, 1) == []
    with pytest.raises(ValueError, match="lease"):
        await a.due_deliveries(later, 0, 1)


async def test_delivered_records_attempts_and_reschedules(backend: Backend) -> None:
    a, b = backend.replicas()
    done = await finished_with_webhook(a, backend)
    now = backend.now()
    assert ids(await a.due_deliveries(now, 30, 10)) == [done.id]

    refused = Delivery(attempt=1, at=now, status=None, error="connection refused", duration_ms=2.5)
    pending = await b.delivered(done.id, refused, WebhookState.PENDING, now + 5)
    assert pending is not None
    assert pending.deliveries == (refused,)
    assert pending.webhook_state is WebhookState.PENDING
    assert pending.result == RESULT  # the rest of the job as it was
    assert await a.due_deliveries(now + 4.9, 30, 10) == []  # the next attempt's time, not the
    # delivery lease, decides now
    assert ids(await a.due_deliveries(now + 5, 30, 10)) == [done.id]

    answered = Delivery(attempt=2, at=now + 5, status=204, error=None, duration_ms=41.25)
    delivered = await a.delivered(done.id, answered, WebhookState.DELIVERED, None)
    assert delivered is not None
    assert delivered.deliveries == (refused, answered)
    assert delivered.webhook_state is WebhookState.DELIVERED
    assert await b.get(done.id) == delivered
    assert await b.due_deliveries(now + 10_000, 30, 10) == []
    assert await a.delivered(new_job_id(), answered, WebhookState.FAILED, None) is None


async def test_a_failed_schedule_ends_the_deliveries(backend: Backend) -> None:
    a, _ = backend.replicas()
    done = await finished_with_webhook(a, backend)
    now = backend.now()
    gone = Delivery(attempt=1, at=now, status=410, error=None, duration_ms=3.0)
    failed = await a.delivered(done.id, gone, WebhookState.FAILED, None)
    assert failed is not None
    assert failed.webhook_state is WebhookState.FAILED
    assert await a.due_deliveries(now + 10_000, 30, 10) == []


# -- the queue's depth ---------------------------------------------------------------------


@WAITS
async def test_depth_counts_the_jobs_queued_and_not_yet_taken(backend: Backend) -> None:
    a, b = backend.replicas()
    assert await a.depth() == 0
    made = [await a.submit(job(backend)) for _ in range(3)]
    assert await b.depth() == 3
    claim = await b.take("worker-b", 0)
    assert claim is not None
    assert await a.depth() == 2
    await a.cancel(made[2].id, backend.now())
    assert await b.depth() == 1
    await backend.advance(LAPSE)  # a lapsed lease is not queued again: it is still running
    assert await a.depth() == 1


async def test_a_submitted_job_must_be_queued(backend: Backend) -> None:
    a, _ = backend.replicas()
    bad: Any = dataclasses.replace(job(backend), status=Status.COMPLETED)
    with pytest.raises(ValueError, match="queued"):
        await a.submit(bad)


# -- what renew and page leave out -----------------------------------------------------------

BIG = 1024 * 1024  # a request body worth not reading twice a second


async def test_renew_gives_the_state_without_request_body_or_result(backend: Backend) -> None:
    """The worker renews every held job every half second and reads only its status, attempts
    and cancel_requested: the bodies stay in the store."""
    a, b = backend.replicas()
    submitted = await a.submit(job(backend, body=b"x" * BIG))
    claim = await a.take("worker-a", 0)
    assert claim is not None
    assert claim.job.request.body == submitted.request.body  # the worker gets what to run
    renewed = await a.renew(claim)
    assert renewed == state_only(claim.job)
    assert renewed is not None
    assert renewed.request.body == b""
    asked = await b.cancel(submitted.id, backend.now())
    assert asked is not None
    assert await a.renew(claim) == state_only(asked)
    done = await b.finish(claim, Status.COMPLETED, RESULT, None, backend.now())
    seen = await a.renew(claim)
    assert seen == state_only(done)
    assert seen is not None
    assert seen.result is None
    assert (seen.status, seen.attempts, seen.cancel_requested) == (Status.COMPLETED, 1, True)
    assert await a.get(submitted.id) == done  # get stays complete
    assert done.request.body == submitted.request.body


async def test_a_page_leaves_out_request_and_result_bodies(backend: Backend) -> None:
    a, b = backend.replicas()
    finished = await a.submit(job(backend, body=b"y" * BIG, age=2))
    queued = await a.submit(job(backend, body=b"z" * BIG, age=1))
    claim = await a.take("worker-a", 0)
    assert claim is not None
    done = await a.finish(claim, Status.COMPLETED, RESULT, None, backend.now())
    page, more = await b.page("key:alice", status=None, limit=10, after=None)
    assert (ids(page), more) == ([queued.id, finished.id], False)
    assert page == [listed(queued), listed(done)]
    assert page[1].result == JobResult(RESULT.status, RESULT.headers, b"")  # status, headers
    assert all(listed_job.request.body == b"" for listed_job in page)
    page, _ = await b.page("key:alice", status=Status.COMPLETED, limit=1, after=None)
    assert page == [listed(done)]
    assert await b.get(finished.id) == done  # get has the bodies


async def test_status_reads_a_jobs_status(backend: Backend) -> None:
    a, b = backend.replicas()
    assert await a.status(new_job_id()) is None
    submitted = await a.submit(job(backend))
    assert await b.status(submitted.id) is Status.QUEUED
    claim = await a.take("worker-a", 0)
    assert claim is not None
    assert await b.status(submitted.id) is Status.IN_PROGRESS
    await a.finish(claim, Status.FAILED, None, JobError("upstream_error", "502"), backend.now())
    assert await b.status(submitted.id) is Status.FAILED


# -- the bound on a key's jobs not finished ----------------------------------------------------


async def test_submit_refuses_a_key_with_max_unfinished_jobs(backend: Backend) -> None:
    a, b = backend.replicas(settings(max_unfinished_per_key=2))
    digest = "5a" * 32
    first = await a.submit(job(backend, idempotency=digest))
    second = await b.submit(job(backend))
    with pytest.raises(QueueFull) as refused:
        await a.submit(job(backend))
    assert (refused.value.owner, refused.value.limit) == ("alice", 2)
    # An idempotent resubmission is answered, not refused.
    assert await b.submit(job(backend, idempotency=digest)) == first
    # Another key has its own bound; nothing of the refused job was stored.
    await a.submit(job(backend, owner="bob"))
    assert await a.depth() == 3
    page, _ = await a.page("key:alice", status=None, limit=10, after=None)
    assert sorted(ids(page)) == sorted([first.id, second.id])

    # A running job still counts; a finished one does not.
    claim = await a.take("worker-a", 0)
    assert claim is not None
    assert claim.job.id == first.id
    with pytest.raises(QueueFull):
        await b.submit(job(backend))
    await a.finish(claim, Status.COMPLETED, RESULT, None, backend.now())
    third = await b.submit(job(backend))
    with pytest.raises(QueueFull):
        await a.submit(job(backend))
    # Nor does a cancelled one.
    await a.cancel(third.id, backend.now())
    await a.submit(job(backend))
    with pytest.raises(QueueFull):
        await a.submit(job(backend))
    # The finished job's key, still retained, answers a resubmission with the same key.
    assert (await b.submit(job(backend, idempotency=digest))).id == first.id


async def test_concurrent_submits_stop_at_the_bound(backend: Backend) -> None:
    a, b = backend.replicas(settings(max_unfinished_per_key=3))
    made = await asyncio.gather(
        *(store.submit(job(backend, owner="carol")) for store in (a, b) * 4),
        return_exceptions=True,
    )
    assert sum(isinstance(outcome, Job) for outcome in made) == 3
    assert sum(isinstance(outcome, QueueFull) for outcome in made) == 5


@WAITS
async def test_jobs_the_store_ends_or_loses_give_back_their_place(backend: Backend) -> None:
    """Every way a job stops counting: expired or dead-lettered by a take, and a record that
    expired unfinished (nobody took it; its worker died and nobody took over; its worker
    finished too late), which a take or that finish meets. Each frees one place, once."""
    a, b = backend.replicas(settings(retention=0.3, max_attempts=1, max_unfinished_per_key=1))

    async def full() -> bool:
        try:
            extra = await a.submit(job(backend, queue_for=0.05))
        except QueueFull:
            return True
        await a.cancel(extra.id, backend.now())
        return False

    # Expired in the queue, met by a take.
    await a.submit(job(backend, queue_for=0.1))
    assert await full()
    await backend.advance(0.15)
    assert await b.take("worker-b", 0) is None
    assert not await full()

    # Dead-lettered: its one attempt's worker died.
    await a.submit(job(backend))
    assert await b.take("worker-b", 0) is not None
    await backend.advance(LAPSE)
    assert await b.take("worker-b", 0) is None
    assert not await full()

    # Its record expired queued, unseen (queue deadline plus retention): a take meets its entry.
    lost = await a.submit(job(backend, queue_for=0.05))
    await backend.advance(0.5)
    assert await a.get(lost.id) is None
    assert await b.take("worker-b", 0) is None
    assert not await full()

    # Its record expired while its worker was away past lease and retention.
    await a.submit(job(backend, queue_for=0.05))
    abandoned = await b.take("worker-b", 0)
    assert abandoned is not None
    await backend.advance(LEASE + 0.3 + 0.2)
    assert await a.get(abandoned.job.id) is None
    assert await b.take("worker-c", 0) is None
    assert not await full()

    # The same, but its worker came back and finished: the finish meets its entry.
    await a.submit(job(backend, queue_for=0.05))
    slow = await b.take("worker-b", 0)
    assert slow is not None
    await backend.advance(LEASE + 0.3 + 0.2)
    done = await b.finish(slow, Status.COMPLETED, RESULT, None, backend.now())
    assert done.status is Status.COMPLETED
    assert await a.get(slow.job.id) is None
    assert not await full()
    assert await b.take("worker-c", 0) is None
    # Counted once each: exactly one place now.
    await a.submit(job(backend))
    assert await full()


# -- webhooks pending past the retention ---------------------------------------------------


@WAITS
async def test_a_pending_webhook_keeps_its_record_past_the_retention(backend: Backend) -> None:
    """The default schedule reaches its 8th attempt at ~31.6 h, past a 24 h retention: while a
    delivery is pending the record (and its idempotency key) lives until a retention after the
    next attempt is due, and after a delivery lease ends."""
    retention = 0.5
    a, b = backend.replicas(settings(retention=retention))
    digest = "9d" * 32
    submitted = await a.submit(
        job(backend, webhook="https://hooks.example/jobs", idempotency=digest)
    )
    claim = await a.take("worker-a", 0)
    assert claim is not None
    await a.finish(claim, Status.COMPLETED, RESULT, None, backend.now())
    start = backend.now()
    assert ids(await b.due_deliveries(start, 1.0, 10)) == [submitted.id]  # leased for 1 s
    await backend.advance(retention + 0.2)
    assert await a.get(submitted.id) is not None  # the lease's end plus the retention
    now = backend.now()
    refused = Delivery(attempt=1, at=now, status=503, error=None, duration_ms=1.0)
    next_at = now + 0.6
    assert await b.delivered(submitted.id, refused, WebhookState.PENDING, next_at) is not None
    await backend.advance(retention + 0.4)  # past the lease's end plus the retention
    assert backend.now() > start + 1.0 + retention
    kept = await a.get(submitted.id)
    assert kept is not None
    assert kept.deliveries == (refused,)
    assert (await b.submit(job(backend, idempotency=digest))).id == submitted.id
    assert backend.now() >= next_at
    assert ids(await a.due_deliveries(backend.now(), 0.1, 10)) == [submitted.id]
    await backend.advance(0.1 + retention + 0.2)
    assert await a.get(submitted.id) is None  # the schedule keeps it, no longer


# -- the in-process store's retention heap -------------------------------------------------


async def test_renewals_do_not_grow_the_retention_heap() -> None:
    """A run that outlives its queue deadline moves its record's end on every renewal; the heap
    that finds the next end must not gain an item per renewal (one job-hour left 7,142)."""
    clock = FakeClock(time.time())
    kept = settings(retention=3600.0)
    store = MemoryStore(kept, clock=clock)
    submitted = await store.submit(
        Job(
            id=new_job_id(),
            owner="alice",
            team=None,
            status=Status.QUEUED,
            created_at=clock.now,
            expires_at=clock.now + 0.1,
            request=JobRequest("POST", "/v1/chat/completions", b"", (), b"{}"),
        )
    )
    claim = await store.take("worker", 0)
    assert claim is not None
    for _ in range(1000):
        clock.now += LEASE / 3
        assert await store.renew(claim) is not None
    assert len(store._ending) <= 3
    clock.now += LEASE + kept.retention - 0.01
    assert await store.get(submitted.id) is not None  # renewed: kept a lease + retention
    clock.now += 0.02
    assert await store.get(submitted.id) is None
    assert store._ending == []


# -- taking lapsed leases among many held ----------------------------------------------------


@WAITS
async def test_a_lapsed_lease_among_many_held_is_taken_in_a_few_bounded_takes(
    backend: Backend,
) -> None:
    """Each take looks at a bounded number of leases (Redis: at most 10 XAUTOCLAIM calls of 10
    entries each), going on where the last look stopped, so the one lapsed lease behind 299
    held ones is still reached in a few takes."""
    held = 300
    a, b = backend.replicas(settings(lease=1.0, retention=60.0))
    for i in range(held):
        await a.submit(job(backend, owner=f"key{i}"))
    claims = []
    for _ in range(held):
        claim = await a.take("worker-a", 0)
        assert claim is not None
        claims.append(claim)
    await backend.advance(1.2)
    for claim in claims[:-1]:  # the newest one's worker died
        assert await a.renew(claim) is not None
    look = Redis.from_url(backend.url) if backend.url is not None else None
    try:
        if look is not None:
            await look.config_resetstat()
        takes = 0
        taken = None
        while taken is None and takes < 10:
            taken = await b.take("worker-b", 0)
            takes += 1
        assert taken is not None
        assert taken.job.id == claims[-1].job.id
        assert taken.job.attempts == 2
        assert takes <= math.ceil(held / 100) + 1
        if look is not None:
            stats = await look.info("commandstats")
            calls = stats.get("cmdstat_xautoclaim", {}).get("calls", 0)
            assert calls <= 10 * takes  # before: the whole pending list on every take
    finally:
        if look is not None:
            await look.aclose()


# -- Redis only ----------------------------------------------------------------------------


async def test_a_redis_store_that_never_saw_a_job_writes_nothing(
    redis_server: RedisServer,
) -> None:
    """A gateway with Redis and no job leaves no key behind (the stream and its group come with
    the first submit), and a worker waiting meanwhile is woken by that submit."""
    backend = Backend("redis", redis_server.url)
    look = Redis.from_url(redis_server.url)
    try:
        # A long lease: the wait is not cut short by the look for lapsed leases.
        a, b = backend.replicas(StoreSettings(lease=10, max_attempts=3, retention=60))
        assert await a.take("worker-a", 0.2) is None
        assert await a.take("worker-a", 0) is None
        assert await a.depth() == 0
        assert await a.get(new_job_id()) is None
        assert await a.page("key:alice", status=None, limit=5, after=None) == ([], False)
        assert await a.due_deliveries(backend.now(), 30, 10) == []
        assert await look.keys("*") == []

        waiting = asyncio.ensure_future(a.take("worker-a", 5.0))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        submitted = await b.submit(job(backend))
        claim = await asyncio.wait_for(waiting, 5.0)
        assert claim is not None
        assert claim.job.id == submitted.id
        assert time.monotonic() - started < 2.0  # woken, not found at the end of the wait
    finally:
        await look.aclose()
        await backend.aclose()


async def test_workers_gone_for_long_are_forgotten_by_the_group(
    redis_server: RedisServer,
) -> None:
    """Every gateway process is a new consumer: one that holds nothing and has not read for
    ``forget_consumers_after`` is removed, so the group does not grow with every restart."""
    look = Redis.from_url(redis_server.url)
    backend = Backend("redis", redis_server.url)
    settings = StoreSettings(lease=30, max_attempts=3, retention=60)
    store = RedisStore(Redis.from_url(redis_server.url), settings, forget_consumers_after=0.2)
    try:
        await store.submit(job(backend))
        await store.submit(job(backend))
        gone = await store.take("worker-gone", 0)  # a process that stopped after its run
        assert gone is not None
        await store.finish(gone, Status.COMPLETED, RESULT, None, backend.now())
        holding = await store.take("worker-holding", 0)  # one that died holding a job
        assert holding is not None
        await asyncio.sleep(0.3)
        assert await store.take("worker-new", 0) is None
        consumers = await look.xinfo_consumers("{gateway:jobs}:queue", "workers")
        names = {consumer["name"] for consumer in consumers}
        assert b"worker-gone" not in names
        assert b"worker-holding" in names  # its pending entry keeps it
    finally:
        await store.aclose()
        await look.aclose()


async def test_renew_page_and_status_read_no_body_from_redis(redis_server: RedisServer) -> None:
    """The request body has a field of its own, so RENEW and PAGE leave it (and the result's
    body) in Redis: what Redis sends for them is small however large the bodies."""
    backend = Backend("redis", redis_server.url)
    look = Redis.from_url(redis_server.url)
    big = 8 * 1024 * 1024
    result = JobResult(200, RESULT.headers, b"r" * big)

    async def sent(step: Any) -> int:
        before = (await look.info("stats"))["total_net_output_bytes"]
        await step
        after = (await look.info("stats"))["total_net_output_bytes"]
        return int(after) - int(before)

    try:
        a, _ = backend.replicas()
        submitted = await a.submit(job(backend, body=b"b" * big))
        key = f"{{gateway:jobs}}:job:{submitted.id}"
        blob = await look.hget(key, "job")
        assert blob is not None
        stored = Job.loads(blob)
        assert stored.request.body == b""  # not in the record's JSON
        assert await look.hget(key, "body") == submitted.request.body
        claim = await a.take("worker-a", 0)
        assert claim is not None
        assert await sent(a.renew(claim)) < 64 * 1024
        await a.finish(claim, Status.COMPLETED, result, None, backend.now())
        assert await sent(a.renew(claim)) < 64 * 1024
        page = a.page("key:alice", status=None, limit=20, after=None)
        assert await sent(page) < 64 * 1024
        assert await sent(a.status(submitted.id)) < 16 * 1024
        full = await a.get(submitted.id)
        assert full is not None
        assert full.request.body == submitted.request.body
        assert full.result == result
    finally:
        await look.aclose()
        await backend.aclose()


async def test_a_record_written_with_its_body_in_the_json_still_reads(
    redis_server: RedisServer,
) -> None:
    """A job stored before the body had its own field (the whole Job.dumps() in ``job``) reads
    back whole with get, and without its body with renew."""
    backend = Backend("redis", redis_server.url)
    look = Redis.from_url(redis_server.url)
    try:
        a, _ = backend.replicas()
        submitted = await a.submit(job(backend))
        key = f"{{gateway:jobs}}:job:{submitted.id}"
        await look.hset(key, "job", submitted.dumps())
        await look.hdel(key, "body")
        assert await a.get(submitted.id) == submitted
        claim = await a.take("worker-a", 0)
        assert claim is not None
        assert claim.job.request.body == submitted.request.body
        renewed = await a.renew(claim)
        assert renewed is not None
        assert renewed.request.body == b""
    finally:
        await look.aclose()
        await backend.aclose()
