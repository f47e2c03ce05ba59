"""Outlier ejections shared between replicas through Redis.

Each replica detects outliers on its own traffic (``upstream/health.py``); without sharing, a
target that fails for one replica keeps taking the others' requests until each has seen its own
``consecutive_failures``. With ``redis.url`` set, a background task per process makes one
replica's verdict everyone's, and keeps requests out of it: a request reads only local state,
never Redis. Every ``interval`` it:

1. writes the ejections this process made since its last round, one key per target,
   ``SET <key> "<until_unix_ms> <ejections>" PX <remaining ms>``, unless the last read found a
   longer one there; and deletes the key of a target this process saw recover (its probe or its
   active check passed while it was ejected, whoever ejected it);
2. reads every target's key with one ``MGET``: a key another replica wrote is adopted
   (``TargetHealth.adopt``); an adopted ejection whose key is gone is released
   (``TargetHealth.released``): its replica saw the target recover, or the ejection ran out;
   either way the target returns to service there, as Envoy's outlier detection returns a host
   once its ejection time is up (the ejecting replica still probes it first: ``health.py``).

**Keys.** ``gateway:outlier:{outlier}:<upstream>/<target>``. The hash tag ``{outlier}`` puts
every key in one Redis Cluster slot, so the one ``MGET`` is legal on a cluster (Redis Cluster
specification, "Hash tags"; multi-key commands need all their keys in one slot). The separator
between the names is ``/``, which a config name cannot hold (``:`` it can: ``a:b`` + ``c`` and
``a`` + ``b:c`` must not share a key).

**Clocks.** The shared value is wall-clock milliseconds (``time.time``): replicas share no
monotonic clock. Locally everything stays monotonic; only the remaining seconds cross over, so
clock skew between hosts shifts an adopted ejection by the skew, no more. The key's ``PX`` makes
Redis drop it when the ejection ends, so a replica that died never leaves a target out.

**Limits on adoption.** An adopted ejection counts against ``max_ejected_percent`` like a local
one: two replicas that each ejected a different target of two must not, by adopting each
other's, leave the upstream with none (Envoy's ``max_ejection_percent`` caps the share of a
cluster's hosts that are out at once). Upstreams with one target, or with ``outlier.enabled:
false``, are never ejected and are not shared.

**Redis failing** never reaches a request: a round that fails is logged once per outage (not
once per round), the ejections it did not write stay pending and are written by the first round
that succeeds, and adopted ejections run their local course meanwhile.

Races between replicas are settled by the last writer: two replicas ejecting one target within
one round each write theirs, and the readers keep the later end (``adopt`` never shortens).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from redis.exceptions import RedisClusterException, RedisError

from gateway.upstream.health import Clock, TargetHealth

if TYPE_CHECKING:
    from gateway.runtime import Runtime
    from gateway.upstream.group import UpstreamGroup
    from gateway.upstream.targets import UpstreamTarget

logger = logging.getLogger("gateway.health_sync")

DEFAULT_INTERVAL = 0.5
# The hash tag of every key: one Redis Cluster slot for them all (see the module docstring).
KEY_PREFIX = "gateway:outlier:{outlier}:"
# What a Redis that failed raises, with either client (gateway/limits/resp.py, redis-py).
_REDIS_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)


class SharedStore(Protocol):
    """One Redis command, under a timeout: ``RedisLimiter.execute`` (the limiter's client, lean
    or redis-py, single or Cluster)."""

    async def execute(self, *args: str | int) -> Any: ...


def shared_key(upstream: str, target: str) -> str:
    return f"{KEY_PREFIX}{upstream}/{target}"


def encode(until_ms: int, ejections: int) -> bytes:
    return b"%d %d" % (until_ms, ejections)


def decode(raw: object) -> tuple[int, int] | None:
    """``(until_unix_ms, ejections)``, or None for a missing or malformed value (a malformed one
    is ignored: it is not this gateway's, or not this version's)."""
    if isinstance(raw, str):
        raw = raw.encode()
    if not isinstance(raw, bytes):
        return None
    parts = raw.split(b" ")
    if len(parts) != 2 or not all(part.isdigit() for part in parts):
        return None
    return int(parts[0]), int(parts[1])


@dataclass(slots=True)
class _Shared:
    """What the sync knows of one target's key."""

    ejections: int = 0  # TargetHealth.ejected_total when last shared
    recoveries: int = 0  # TargetHealth.recoveries when last shared
    written: bytes | None = None  # the value this process wrote, while it may still be there
    seen: tuple[int, int] | None = None  # the value the last MGET read


class HealthSync:
    """The background task that shares ejections (see the module docstring). ``runtime`` gives
    the current snapshot (``Gateway.current_runtime``): the targets, and their groups for
    ``max_ejected_percent``. Start it in the lifespan, ``await stop()`` at shutdown."""

    def __init__(
        self,
        store: SharedStore,
        runtime: Callable[[], Runtime | None],
        *,
        interval: float = DEFAULT_INTERVAL,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
    ) -> None:
        self._store = store
        self._runtime = runtime
        self._interval = interval
        self._clock = clock
        self._wall = wall
        # Per target's health (by identity: a reload that keeps a target keeps its health).
        self._shared: dict[TargetHealth, _Shared] = {}
        self._task: asyncio.Task[None] | None = None
        # For the admin API's health detail: whether Redis is failing now, and how often it did.
        self.failing = False
        self.errors = 0
        self.last_error: str | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="health-sync")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.tick()
            await asyncio.sleep(max(0.0, self._interval - (loop.time() - started)))

    async def tick(self) -> bool:
        """One round: write, then read. False when Redis failed (the round is retried whole by
        the next one)."""
        runtime = self._runtime()
        if runtime is None:
            return True
        shared = [
            (group, target)
            for group in runtime.upstreams.values()
            if len(group.targets) > 1 and group.config.outlier.enabled
            for target in group.targets
        ]
        self._shared = {t.health: self._shared.get(t.health) or _Shared() for _, t in shared}
        if not shared:
            return True
        try:
            await self._write(shared)
            replies = await self._store.execute(
                "MGET", *(shared_key(group.name, target.target) for group, target in shared)
            )
            for (group, target), raw in zip(shared, replies, strict=True):
                self._read(group, target, raw)
        except Exception as exc:
            self._failed(exc)
            return False
        if self.failing:
            self.failing = False
            logger.info("sharing upstream ejections through Redis works again")
        return True

    async def _write(self, shared: list[tuple[UpstreamGroup, UpstreamTarget]]) -> None:
        for group, target in shared:
            health = target.health
            state = self._shared[health]
            ejected, recovered = health.ejected_total, health.recoveries
            if ejected == state.ejections and recovered == state.recoveries:
                continue
            key = shared_key(group.name, target.target)
            now = self._clock()
            remaining = health.ejected_until - now
            if (
                ejected != state.ejections
                and health.probation
                and not health.adopted
                and remaining > 0
            ):
                until_ms = round((self._wall() + remaining) * 1000)
                if state.seen is None or state.seen[0] < until_ms:
                    value = encode(until_ms, health.ejections)
                    await self._store.execute(
                        "SET", key, value.decode(), "PX", max(1, math.ceil(remaining * 1000))
                    )
                    state.written = value
            elif recovered != state.recoveries:
                await self._store.execute("DEL", key)
                state.written = None
                state.seen = None
            # Only once Redis has it: a round that failed leaves it for the next.
            state.ejections, state.recoveries = ejected, recovered

    def _read(self, group: UpstreamGroup, target: UpstreamTarget, raw: object) -> None:
        health = target.health
        state = self._shared[health]
        if isinstance(raw, str):
            raw = raw.encode()
        found = decode(raw)
        state.seen = found
        if raw is None:
            state.written = None
            if health.adopted and health.probation:
                health.released()
                logger.info(
                    "upstream target '%s' is back in service: the ejection another replica "
                    "shared has ended",
                    target.label,
                )
            return
        if found is None or raw == state.written:
            return  # not ours to read, or this process's own
        until_ms, ejections = found
        remaining = until_ms / 1000 - self._wall()
        if remaining <= 0:
            return
        if not health.probation and not group.may_eject():
            return  # max_ejected_percent: this upstream has as many targets out as it may
        adopted = health.adopted
        health.adopt(remaining, ejections)
        if health.adopted and not adopted:
            logger.info(
                "upstream target '%s' ejected for %.3g s by another replica",
                target.label,
                remaining,
            )

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        self.last_error = type(exc).__name__
        if self.failing:
            return  # once per outage
        self.failing = True
        if isinstance(exc, _REDIS_FAILURES):
            logger.warning(
                "sharing upstream ejections through Redis failed (%s: %s); each replica keeps "
                "its own until Redis answers again (retried every %g s)",
                type(exc).__name__,
                exc,
                self._interval,
            )
        else:  # a fault of the gateway's own: the traceback says where
            logger.exception("sharing upstream ejections through Redis failed")
