"""The webhook schedule end to end: a real store, the real sender, a real receiver.

Each test finishes a job in a ``MemoryStore`` (real clock), runs ``WebhookDeliveries`` with a
short schedule, and reads what the receiver got and what the job records. The receiver
verifies every signature with the reference ``standardwebhooks`` library.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import orjson
import pytest

from gateway.config.jobs import WebhookSettings
from gateway.jobs.delivery import WebhookDeliveries, message_id
from gateway.jobs.hosts import WebhookHosts
from gateway.jobs.memory_store import MemoryStore
from gateway.jobs.model import Job, JobRequest, JobResult, Status, WebhookState, new_job_id
from gateway.jobs.signing import WebhookSecrets, new_secret
from gateway.jobs.store import StoreSettings
from gateway.jobs.webhooks import WebhookSender
from tests.support.ports import free_port
from tests.support.webhookreceiver import Reply, WebhookReceiver

SECRET = new_secret()
POLL = 0.05  # the loop's poll interval here; the gateway's is 0.2 s


def payload(job: Job) -> bytes:
    return orjson.dumps({"type": f"job.{job.status.value}", "data": {"id": job.id}})


class Harness:
    def __init__(self, store: MemoryStore, deliveries: WebhookDeliveries) -> None:
        self.store = store
        self.deliveries = deliveries

    async def finished_job(self, url: str, owner: str = "app") -> Job:
        """A job submitted with webhook ``url``, run and completed: its webhook is due now."""
        now = time.time()
        job = Job(
            id=new_job_id(),
            owner=owner,
            team=None,
            status=Status.QUEUED,
            created_at=now,
            expires_at=now + 60,
            request=JobRequest("POST", "/v1/chat/completions", b"", (), b"{}"),
            webhook_url=url,
        )
        await self.store.submit(job)
        claim = await self.store.take("worker-1", 0)
        assert claim is not None
        return await self.store.finish(
            claim, Status.COMPLETED, JobResult(200, (), b"{}"), None, now
        )

    async def settled(self, job: Job, timeout: float = 5.0) -> Job:
        """The job once its webhook is delivered or failed for good."""
        async with asyncio.timeout(timeout):
            while True:
                stored = await self.store.get(job.id)
                assert stored is not None
                if stored.webhook_state in (WebhookState.DELIVERED, WebhookState.FAILED):
                    return stored
                await asyncio.sleep(0.01)


@asynccontextmanager
async def running(
    schedule: tuple[float, ...],
    hosts: Callable[[str], WebhookHosts | None],
    *,
    timeout: float = 2.0,
    concurrency: int = 16,
    per_owner: int = 4,
) -> AsyncIterator[Harness]:
    settings = WebhookSettings(schedule=schedule, timeout=timeout)
    store = MemoryStore(StoreSettings(lease=5.0, max_attempts=3, retention=60.0))
    sender = WebhookSender(WebhookSecrets.parse(SECRET), settings.timeout)
    deliveries = WebhookDeliveries(
        store,
        sender,
        settings,
        hosts,
        payload,
        concurrency=concurrency,
        per_owner=per_owner,
        poll_interval=POLL,
        jitter=lambda: 0.0,
    )
    deliveries.start()
    try:
        yield Harness(store, deliveries)
    finally:
        await deliveries.stop()
        await store.aclose()


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver([SECRET]) as started:
        yield started


def local(receiver: WebhookReceiver) -> Callable[[str], WebhookHosts | None]:
    hosts = WebhookHosts.parse([f"127.0.0.1:{receiver.port}"])
    return lambda owner: hosts


def gaps(receiver: WebhookReceiver) -> list[float]:
    times = [request.at for request in receiver.received]
    return [later - earlier for earlier, later in itertools.pairwise(times)]


async def test_a_receiver_that_fails_twice_gets_one_success_after_two_retries(
    receiver: WebhookReceiver,
) -> None:
    receiver.script(Reply(500), Reply(500), Reply(200))
    async with running((0, 0.2, 0.2), local(receiver)) as harness:
        job = await harness.finished_job(receiver.url())
        done = await harness.settled(job)
    assert done.webhook_state is WebhookState.DELIVERED
    assert [d.attempt for d in done.deliveries] == [1, 2, 3]
    assert [d.status for d in done.deliveries] == [500, 500, 200]
    assert all(d.error is None and d.duration_ms > 0 for d in done.deliveries)
    assert len(receiver.received) == 3  # exactly one success: nothing after it
    assert all(request.verified_with == (SECRET,) for request in receiver.received)
    ids = {request.headers["webhook-id"] for request in receiver.received}
    assert ids == {message_id(job)}  # one message, however many attempts
    for gap in gaps(receiver):
        assert 0.2 <= gap < 0.2 + POLL + 0.35  # the step, plus a poll and the scheduler
    assert orjson.loads(receiver.received[0].body)["data"]["id"] == job.id


async def test_410_stops_the_schedule(receiver: WebhookReceiver) -> None:
    receiver.script(Reply(410))
    async with running((0, 0.05, 0.05, 0.05), local(receiver)) as harness:
        job = await harness.finished_job(receiver.url())
        done = await harness.settled(job)
        await asyncio.sleep(0.3)  # time for three more steps, were the schedule still on
    assert done.webhook_state is WebhookState.FAILED
    assert [d.status for d in done.deliveries] == [410]
    assert len(receiver.received) == 1


async def test_retry_after_is_honoured(receiver: WebhookReceiver) -> None:
    receiver.script(Reply(429, {"Retry-After": "1"}), Reply(200))
    async with running((0, 0.05, 2.0), local(receiver)) as harness:
        job = await harness.finished_job(receiver.url())
        done = await harness.settled(job)
    assert [d.status for d in done.deliveries] == [429, 200]
    (gap,) = gaps(receiver)
    assert 1.0 <= gap < 1.0 + POLL + 0.4  # not at the schedule's 0.05 s: no sooner than asked


async def test_retry_after_is_capped_at_the_longest_step(receiver: WebhookReceiver) -> None:
    receiver.script(Reply(503, {"Retry-After": "86400"}), Reply(200))
    async with running((0, 0.2, 0.3), local(receiver)) as harness:
        job = await harness.finished_job(receiver.url())
        done = await harness.settled(job)
    assert [d.status for d in done.deliveries] == [503, 200]
    (gap,) = gaps(receiver)
    assert 0.3 <= gap < 0.3 + POLL + 0.4


async def test_the_schedule_runs_out_as_failed(receiver: WebhookReceiver) -> None:
    receiver.script(Reply(500), Reply(502), Reply(404))
    async with running((0, 0.05, 0.05), local(receiver)) as harness:
        job = await harness.finished_job(receiver.url())
        done = await harness.settled(job)
        await asyncio.sleep(0.2)
    assert done.webhook_state is WebhookState.FAILED
    assert [d.status for d in done.deliveries] == [500, 502, 404]
    assert len(receiver.received) == 3


async def test_a_timeout_is_a_failed_attempt_recorded_on_the_job(
    receiver: WebhookReceiver,
) -> None:
    receiver.script(Reply(200, delay=3.0), Reply(200))
    async with running((0, 0.05), local(receiver), timeout=0.3) as harness:
        job = await harness.finished_job(receiver.url())
        done = await harness.settled(job)
    first, second = done.deliveries
    assert first.status is None
    assert first.error == "no answer within 0.3 s"
    assert 250 <= first.duration_ms < 1500
    assert second.status == 200
    assert done.webhook_state is WebhookState.DELIVERED


async def test_redirects_are_not_followed_and_retried(receiver: WebhookReceiver) -> None:
    receiver.script(Reply(302, {"Location": receiver.url("/elsewhere")}), Reply(200))
    async with running((0, 0.05), local(receiver)) as harness:
        job = await harness.finished_job(receiver.url())
        done = await harness.settled(job)
    assert [d.status for d in done.deliveries] == [302, 200]
    assert [request.path for request in receiver.received] == ["/hook", "/hook"]


async def test_a_key_that_no_longer_exists_fails_the_delivery(receiver: WebhookReceiver) -> None:
    async with running((0, 0.05), lambda owner: None) as harness:
        job = await harness.finished_job(receiver.url())
        done = await harness.settled(job)
    assert done.webhook_state is WebhookState.FAILED
    (delivery,) = done.deliveries
    assert delivery.status is None
    assert delivery.error == "the job's key no longer exists"
    assert receiver.received == []


async def test_a_url_the_key_may_no_longer_call_fails_at_once(receiver: WebhookReceiver) -> None:
    # The key's webhook_hosts changed since the job was submitted: '*' does not reach loopback.
    star = WebhookHosts.parse(["*"])
    async with running((0, 0.05, 0.05), lambda owner: star) as harness:
        job = await harness.finished_job(f"https://127.0.0.1:{receiver.port}/hook")
        done = await harness.settled(job)
    assert done.webhook_state is WebhookState.FAILED
    (delivery,) = done.deliveries
    assert delivery.error is not None
    assert "loopback" in delivery.error
    assert receiver.received == []


async def test_the_recorded_error_leaves_out_the_query_string() -> None:
    port = free_port()
    hosts = WebhookHosts.parse([f"127.0.0.1:{port}"])
    async with running((0, 0.05), lambda owner: hosts) as harness:
        job = await harness.finished_job(f"http://127.0.0.1:{port}/hook?token=s3cret")
        done = await harness.settled(job)
    assert done.webhook_state is WebhookState.FAILED
    assert len(done.deliveries) == 2
    for delivery in done.deliveries:
        assert delivery.status is None
        assert delivery.error is not None
        assert "s3cret" not in delivery.error


async def test_the_first_attempt_waits_for_the_first_step(receiver: WebhookReceiver) -> None:
    async with running((0.4,), local(receiver)) as harness:
        job = await harness.finished_job(receiver.url())
        done = await harness.settled(job)
    assert done.finished_at is not None
    assert done.deliveries[0].at >= done.finished_at + 0.4


async def test_deliveries_run_concurrently(receiver: WebhookReceiver) -> None:
    receiver.script(*[Reply(200, delay=0.4)] * 4)
    async with running((0,), local(receiver), concurrency=4) as harness:
        started = time.monotonic()
        jobs = [await harness.finished_job(receiver.url()) for _ in range(4)]
        for job in jobs:
            assert (await harness.settled(job)).webhook_state is WebhookState.DELIVERED
        elapsed = time.monotonic() - started
    assert elapsed < 4 * 0.4  # one after another would take 1.6 s
    assert len({request.headers["webhook-id"] for request in receiver.received}) == 4


async def test_stop_ends_the_loop_and_closes_the_sender(receiver: WebhookReceiver) -> None:
    async with running((0, 0.05), local(receiver)) as harness:
        pass
    job = await harness.finished_job(receiver.url())
    await asyncio.sleep(0.2)
    stored = await harness.store.get(job.id)
    assert stored is not None
    assert stored.webhook_state is WebhookState.PENDING
    assert receiver.received == []


async def test_one_keys_slow_receiver_cannot_hold_every_slot() -> None:
    async with (
        WebhookReceiver([SECRET], default=Reply(delay=1.5)) as tarpit,
        WebhookReceiver([SECRET]) as prompt,
    ):
        hosts = WebhookHosts.parse([f"127.0.0.1:{tarpit.port}", f"127.0.0.1:{prompt.port}"])
        async with running((0, 60), lambda owner: hosts, concurrency=4, per_owner=2) as harness:
            for _ in range(8):
                await harness.finished_job(tarpit.url(), owner="slow")
            await asyncio.sleep(POLL * 3)  # the slow key's deliveries are under way
            started = time.monotonic()
            job = await harness.finished_job(prompt.url(), owner="quick")
            await prompt.wait_for(1, timeout=1.0)
            waited = time.monotonic() - started
            settled = await harness.settled(job)
            await asyncio.sleep(0.2)
            # The slow key never had more than its share in flight.
            assert len(tarpit.received) == 2
    assert waited < 0.5
    assert settled.webhook_state is WebhookState.DELIVERED
