"""The jobs of one gateway process: its store, workers, webhook deliveries and submitter.

Made in the app's lifespan from the config the gateway starts with (the ``jobs`` section and
where Redis is); a reload does not change them (restart to apply, like ``server`` and
``redis``). Jobs live in Redis when the config has a Redis URL (or ``jobs.store: redis``), durable
across replicas; else in this process, lost on restart (docs/jobs.md).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway.config.model import GatewayConfig
from gateway.jobs.delivery import WebhookDeliveries
from gateway.jobs.execution import JobRunner
from gateway.jobs.hosts import WebhookHosts
from gateway.jobs.memory_store import MemoryStore
from gateway.jobs.model import Job
from gateway.jobs.redis_store import RedisStore
from gateway.jobs.signing import load_secrets
from gateway.jobs.store import JobStore, StoreSettings
from gateway.jobs.submission import Submitter
from gateway.jobs.views import webhook_payload
from gateway.jobs.webhooks import WebhookSender
from gateway.jobs.worker import JobWorkers
from gateway.runtime import Runtime
from gateway.types import ASGIApp

logger = logging.getLogger("gateway.jobs")

# How long a blocking read of the queue may take on Redis: the worker blocks a second at a
# time, and the socket timeout must outlast it.
_REDIS_SOCKET_TIMEOUT = 10.0


def uses_redis(config: GatewayConfig) -> bool:
    store = config.jobs.store
    return store == "redis" or (store == "auto" and config.redis.url is not None)


def build_store(config: GatewayConfig, clock: Callable[[], float] = time.time) -> JobStore:
    jobs = config.jobs
    settings = StoreSettings(
        lease=jobs.lease,
        max_attempts=jobs.max_attempts,
        retention=jobs.retention,
        max_unfinished_per_key=jobs.max_queued_per_key,
    )
    url = config.redis.url
    if not uses_redis(config) or url is None:
        return MemoryStore(settings, clock=clock)
    # A client of its own: the queue's blocking reads must not hold the limiter's connections.
    options: dict[str, Any] = {
        "socket_timeout": _REDIS_SOCKET_TIMEOUT,
        "socket_connect_timeout": 5.0,
    }
    client: Redis | RedisCluster
    if config.redis.cluster:
        client = RedisCluster.from_url(url, **options)
    else:
        client = Redis.from_url(url, **options)
    return RedisStore(client, settings, clock=clock)


class JobService:
    def __init__(
        self,
        config: GatewayConfig,
        relay: ASGIApp,
        runtime: Callable[[], Runtime | None],
        *,
        clock: Callable[[], float] = time.time,
        on_finish: Callable[[Job], None] | None = None,
    ) -> None:
        self.settings = config.jobs
        self._runtime = runtime
        self.store = build_store(config, clock)
        # A malformed secret stops the start with a message naming the variable: deliveries
        # signed with a key nobody can verify would all be refused by their receivers.
        name = config.jobs.webhooks.secret_env
        secrets = load_secrets(os.environ.get(name, ""), f"environment variable {name}")
        self.submitter = Submitter(
            self.store, config.jobs, webhooks_signed=secrets is not None, clock=clock
        )
        self.workers = JobWorkers(
            self.store,
            JobRunner(relay, config.jobs.max_result_bytes),
            config.jobs,
            clock=clock,
            on_finish=on_finish,
        )
        self.deliveries: WebhookDeliveries | None = None
        if secrets is not None:
            self.deliveries = WebhookDeliveries(
                self.store,
                WebhookSender(secrets, config.jobs.webhooks.timeout),
                config.jobs.webhooks,
                self._hosts_of,
                webhook_payload,
                clock=clock,
            )

    def _hosts_of(self, owner: str) -> WebhookHosts | None:
        runtime = self._runtime()
        principal = runtime.keys.named(owner) if runtime is not None else None
        if principal is None:
            return None
        return self.submitter.hosts_for(principal.config.webhook_hosts)

    async def queued(self) -> int | None:
        """The queue's depth, or None when the store cannot say now (Redis away)."""
        try:
            return await self.store.depth()
        except Exception:
            logger.warning("reading the job queue's depth failed")
            return None

    def start(self) -> None:
        self.workers.start()
        if self.deliveries is not None:
            self.deliveries.start()

    async def stop(self) -> None:
        await self.workers.stop(self.settings.shutdown_grace)
        if self.deliveries is not None:
            await self.deliveries.stop()
        await self.store.aclose()
