"""The webhook schedule: deliver each finished job's webhook, retry on the schedule, record it.

A loop polls the store for deliveries due (``due_deliveries`` leases each, so that no other
replica sends the same one meanwhile), sends them concurrently up to a bound, and records every
attempt on the job (``delivered``): delivered on a 2xx; failed for good on 410 Gone, on a URL
the key may no longer call, on a key that no longer exists, or when the schedule runs out;
otherwise pending, due again after the schedule's next step (Standard Webhooks, "Deliverability
and reliability"). Delivery is at least once: an attempt whose record is lost (the replica
stopped in between) is made again when its lease lapses, with the same ``webhook-id`` so that
the receiver can tell (spec: the id is the receiver's idempotency key).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from yarl import URL

from gateway.config.jobs import WebhookSettings
from gateway.jobs.hosts import WebhookHosts
from gateway.jobs.model import Delivery, Job, WebhookState
from gateway.jobs.store import JobStore
from gateway.jobs.webhooks import Attempt, WebhookSender, next_delay

__all__ = ["WebhookDeliveries", "message_id"]

logger = logging.getLogger("gateway.jobs.webhooks")

# Seconds a delivery lease outlasts one attempt's timeout: the store round trips before and
# after it, and a busy event loop.
_LEASE_MARGIN = 5.0
# Most seconds to wait in place for a first attempt not yet due (the schedule's first step);
# a longer wait leaves the job leased, and it comes back when the lease ends.
_WAIT_IN_PLACE = 2.0


def message_id(job: Job) -> str:
    """The ``webhook-id``: one per job and event, and a job ends once, so one per job. The
    same for every attempt (spec: "remains the same no matter how many times ... retried");
    no '.' in it (job ids are URL-safe base64), as the signature scheme requires."""
    return f"msg_{job.id}"


class WebhookDeliveries:
    def __init__(
        self,
        store: JobStore,
        sender: WebhookSender,
        settings: WebhookSettings,
        hosts_of: Callable[[str], WebhookHosts | None],
        payload: Callable[[Job], bytes],
        *,
        clock: Callable[[], float] = time.time,
        concurrency: int = 16,
        per_owner: int = 4,
        poll_interval: float = 0.2,
        jitter: Callable[[], float] | None = None,
    ) -> None:
        """``hosts_of`` gives the webhook_hosts of a key by name (None: the key is gone);
        ``payload`` the body for a job; ``jitter`` a draw in [0, 1) per retry (random);
        ``per_owner`` the attempts of one key's jobs in flight at once here, so that one key's
        slow receiver (a tarpit) cannot hold every slot: its other deliveries due wait out
        their lease (``timeout`` plus a margin) and come back then."""
        self._store = store
        self._sender = sender
        self._schedule = settings.schedule
        self._timeout = settings.timeout
        self._hosts_of = hosts_of
        self._payload = payload
        self._clock = clock
        self._concurrency = concurrency
        self._per_owner = per_owner
        self._owners: dict[str, int] = {}
        self._poll_interval = poll_interval
        # Jitter spreads retries; it needs no unpredictability, only spread.
        self._jitter = jitter or random.Random().random  # noqa: S311
        self.lease = settings.timeout + _LEASE_MARGIN
        self._loop: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        # Jobs with an attempt in flight here: one whose lease lapsed under a slow attempt may
        # be handed out again, and must not get a second attempt at once from this process.
        self._in_flight: set[str] = set()

    def start(self) -> None:
        """Start polling (in the running event loop)."""
        if self._loop is None or self._loop.done():
            self._loop = asyncio.get_running_loop().create_task(
                self._poll_forever(), name="webhook-deliveries"
            )

    async def stop(self, grace: float = 5.0) -> None:
        """Stop polling; attempts in flight get ``grace`` seconds to end and be recorded, then
        are cancelled (their leases lapse and they are made again later: at least once, the
        receiver deduplicates by webhook-id). Closes the sender."""
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
        running = set(self._running)
        if running:
            _, late = await asyncio.wait(running, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self._sender.aclose()

    async def _poll_forever(self) -> None:
        failures = 0
        while True:
            try:
                await self.poll()
            except Exception:
                # The store is unreachable (Redis down) or failed: the next poll tries again.
                # Said once with its cause, then every 300th failed poll (about a minute).
                if failures % 300 == 0:
                    logger.exception("webhook deliveries: polling the store failed")
                failures += 1
            else:
                if failures:
                    logger.info("webhook deliveries: the store answers again")
                failures = 0
            await asyncio.sleep(self._poll_interval)

    async def poll(self) -> int:
        """Take the deliveries due, as many as free slots allow, and start them; how many."""
        free = self._concurrency - len(self._running)
        if free <= 0:
            return 0
        jobs = await self._store.due_deliveries(self._clock(), self.lease, free)
        started = 0
        for job in jobs:
            if job.id in self._in_flight:
                continue
            owner = job.owner
            if self._owners.get(owner, 0) >= self._per_owner:
                continue  # leased: due again when the lease ends, after this key's own
            self._owners[owner] = self._owners.get(owner, 0) + 1
            self._in_flight.add(job.id)
            task = asyncio.get_running_loop().create_task(self._deliver_logged(job))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            started += 1
        return started

    async def _deliver_logged(self, job: Job) -> None:
        try:
            await self.deliver(job)
        except Exception:
            # Recording failed (the store): the lease lapses and the attempt is made again.
            logger.exception("webhook delivery for job %s failed", job.id)
        finally:
            self._in_flight.discard(job.id)
            left = self._owners[job.owner] - 1
            if left:
                self._owners[job.owner] = left
            else:
                del self._owners[job.owner]  # no entry kept for a key with nothing in flight

    async def deliver(self, job: Job) -> Job | None:
        """One attempt for ``job`` (as ``due_deliveries`` gave it), recorded; the job as stored
        after, or None when the attempt is not due yet or the job is gone."""
        number = len(job.deliveries) + 1
        now = self._clock()
        if number == 1 and job.finished_at is not None:
            wait = job.finished_at + self._schedule[0] - now
            if wait > _WAIT_IN_PLACE:
                return None  # leased meanwhile; back when the lease ends, nearer its time
            if wait > 0:
                await asyncio.sleep(wait)
                now = self._clock()
        url = job.webhook_url
        hosts = self._hosts_of(job.owner)
        if url is None or hosts is None:
            why = "the job has no webhook URL" if url is None else "the job's key no longer exists"
            return await self._record(job, Delivery(number, now, None, why, 0.0), final=True)
        try:
            body = self._payload(job)
        except Exception:
            logger.exception("webhook body for job %s could not be made", job.id)
            failed = Attempt(now, None, "the gateway could not make the webhook body", None, 0.0)
            return await self._settle(job, number, failed)
        attempt = await self._sender.send(url, hosts, message_id(job), body)
        return await self._settle(job, number, attempt)

    async def _settle(self, job: Job, number: int, attempt: Attempt) -> Job | None:
        delivery = Delivery(number, attempt.at, attempt.status, attempt.error, attempt.duration_ms)
        if attempt.ok:
            return await self._record(job, delivery, delivered=True)
        if attempt.final:
            return await self._record(job, delivery, final=True)
        delay = next_delay(self._schedule, number, attempt.retry_after, self._jitter())
        if delay is None:
            return await self._record(job, delivery, final=True)
        return await self._record(job, delivery, next_at=self._clock() + delay)

    async def _record(
        self,
        job: Job,
        delivery: Delivery,
        *,
        delivered: bool = False,
        final: bool = False,
        next_at: float | None = None,
    ) -> Job | None:
        if delivered:
            state = WebhookState.DELIVERED
        elif final:
            state = WebhookState.FAILED
        else:
            state = WebhookState.PENDING
        stored = await self._store.delivered(job.id, delivery, state, next_at)
        where = _where(job.webhook_url)
        answer = delivery.status if delivery.status is not None else delivery.error
        if state is WebhookState.DELIVERED:
            logger.info("webhook of job %s delivered to %s (%s)", job.id, where, answer)
        elif state is WebhookState.FAILED:
            logger.warning(
                "webhook of job %s to %s failed for good after %d attempt(s): %s",
                job.id,
                where,
                delivery.attempt,
                answer,
            )
        else:
            logger.info(
                "webhook of job %s to %s: attempt %d failed (%s); next in %.1f s",
                job.id,
                where,
                delivery.attempt,
                answer,
                (next_at or 0.0) - self._clock(),
            )
        return stored


def _where(url: str | None) -> str:
    """The receiver's scheme, host and port, for a log line: the path and query may carry a
    token (a URL is the client's, and clients put secrets in them)."""
    if url is None:
        return "(none)"
    try:
        parsed = URL(url)
        return f"{parsed.scheme}://{parsed.raw_host}:{parsed.port}"
    except (ValueError, TypeError):
        return "(invalid URL)"
