"""Active health checks: each target of an upstream with ``health_check`` is asked on its own,
on a schedule, whether it is well (docs/resilience.md; Envoy's and Caddy's active health checks).

Every ``interval`` seconds a target gets ``GET <its base_url><path>`` (plus the upstream's
configured query, as its requests carry it), through its own pool (its TLS settings, its egress
proxy) and with its own credentials (``added_headers``): an upstream behind a key answers its
health path only to that key. A check passes when a response with one of ``status`` comes within
``timeout``, connecting included. At most 64 KiB of its body is read, so the connection goes
back to the pool; a longer body closes it rather than be read.

**Verdicts.** ``unhealthy_after`` failed checks in a row mark a target down
(``TargetHealth.checked(False)``, a warning in the log); ``healthy_after`` passes in a row bring
it back (an info line). A new target starts healthy, and a kept one where its last verdict left
it: a gateway that starts, or reloads, must not turn traffic away (and fail ``/readyz``) before
the first check has even answered; a target that is down in fact is found out by then. While a
target is up, every passing check is reported too, not only a change of verdict: it is what ends
an outlier ejection's probation once the ejection time is over (``health.py``: with an active
check, probes are the check's job, not traffic's).

**Schedule.** One task per target: a target that hangs until its timeout never delays another's
check. A check that overruns its interval is followed by the next one at once, never by a pile of
them. The verdicts (and their counts) belong to the target's health, so a reload that keeps a
target keeps where its checks stood; ``follow`` restarts the tasks on every new snapshot (its
pools, its settings), and a target whose upstream lost its ``health_check`` is no longer held down
by a verdict nothing would lift.

Nothing here ever raises into a request: a check that fails in any way is a failed check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.config.model import Timeouts
from gateway.config.resilience import HealthCheck
from gateway.upstream.health import TargetHealth
from gateway.upstream.seam import (
    OutboundRequest,
    UpstreamConnectError,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
)
from gateway.upstream.targets import UpstreamTarget

if TYPE_CHECKING:
    from gateway.runtime import Runtime

logger = logging.getLogger("gateway.health_checks")

# The most of a check's response body that is read (and the connection kept); beyond, it is
# closed: a health path is small, and a check must not read a whole model list forever.
CHECK_BODY_BYTES = 64 * 1024
# Sent unless the upstream configures its own: an upstream's access log tells checks apart.
USER_AGENT = "llm-gateway-health-check"


@dataclass(slots=True)
class _Verdict:
    """Where a target's checks stand."""

    healthy: bool
    passes: int = 0  # in a row
    fails: int = 0  # in a row


def check_request(target: UpstreamTarget, check: HealthCheck) -> OutboundRequest:
    headers = list(target.added_headers)
    if b"user-agent" not in target.added_names:
        headers.insert(0, ("user-agent", USER_AGENT))
    return OutboundRequest(
        method="GET",
        url=target.url(check.path, b""),
        headers=tuple(headers),
        body=b"",
        timeouts=Timeouts(connect=check.timeout, read=check.timeout),
    )


async def check_once(target: UpstreamTarget, request: OutboundRequest, check: HealthCheck) -> str:
    """One check: ``""`` when it passed, else why it failed (a status or a failure kind, never
    a URL)."""
    try:
        # The whole exchange, connecting included, has ``timeout`` (the pool's own timeouts
        # bound each wait; this bounds their sum).
        async with asyncio.timeout(check.timeout):
            response = await target.client.send(request)
            try:
                await _drain(response)
            except BaseException:
                response.close()
                raise
    except (TimeoutError, UpstreamTimeout):
        return "timeout"
    except UpstreamConnectError:
        return "connect"
    except UpstreamError:
        return "protocol"
    except Exception as exc:  # a fault in the client itself: still only a failed check
        logger.debug("health check of '%s' failed in the client", target.label, exc_info=True)
        return type(exc).__name__
    if response.status not in check.status:
        return f"status {response.status}"
    return ""


async def _drain(response: UpstreamResponse) -> None:
    read = 0
    while chunk := await response.read_chunk():
        read += len(chunk)
        if read > CHECK_BODY_BYTES:
            response.close()
            return
    response.release()


def judge(target: UpstreamTarget, check: HealthCheck, verdict: _Verdict, failure: str) -> None:
    """Count one check's outcome and tell the target's health what it changes."""
    health = target.health
    if failure:
        verdict.passes = 0
        verdict.fails += 1
        if verdict.healthy and verdict.fails >= check.unhealthy_after:
            verdict.healthy = False
            health.checked(False)
            logger.warning(
                "upstream target '%s' is down: %d health checks failed in a row (last: %s)",
                target.label,
                verdict.fails,
                failure,
            )
        return
    verdict.fails = 0
    verdict.passes += 1
    if not verdict.healthy:
        if verdict.passes < check.healthy_after:
            return
        verdict.healthy = True
        logger.info(
            "upstream target '%s' is up again: %d health checks passed",
            target.label,
            verdict.passes,
        )
    if health.checked(True):
        logger.info(
            "upstream target '%s' is back in service: a health check passed after its ejection",
            target.label,
        )


class HealthChecker:
    """Checks for every target of the current snapshot's checked upstreams. ``start`` in the
    lifespan, ``follow`` on each reload, ``await stop()`` at shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        # By target health (identity): kept across snapshots with the health itself.
        self._verdicts: dict[TargetHealth, _Verdict] = {}

    def start(self, runtime: Runtime) -> None:
        self.follow(runtime)

    def follow(self, runtime: Runtime) -> None:
        """Check what ``runtime`` says, with its pools; the previous snapshot's checks stop."""
        for task in self._tasks:
            task.cancel()  # they end on their own; ``stop`` awaits what is left
        loop = asyncio.get_running_loop()
        verdicts: dict[TargetHealth, _Verdict] = {}
        for group in runtime.upstreams.values():
            check = group.config.health_check
            for target in group.targets:
                health = target.health
                if check is None:
                    health.unchecked()
                    continue
                verdict = self._verdicts.get(health) or _Verdict(healthy=not health.active_down)
                verdicts[health] = verdict
                task = loop.create_task(
                    self._watch(target, check, verdict), name=f"health-check {target.label}"
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        self._verdicts = verdicts

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @staticmethod
    async def _watch(target: UpstreamTarget, check: HealthCheck, verdict: _Verdict) -> None:
        loop = asyncio.get_running_loop()
        request = check_request(target, check)
        due = loop.time()
        while True:
            try:
                judge(target, check, verdict, await check_once(target, request, check))
            except Exception:  # a fault of the gateway's own: keep checking, say where
                logger.exception("health check of upstream target '%s' failed", target.label)
            due = max(due + check.interval, loop.time())
            await asyncio.sleep(due - loop.time())
