"""Active health checks (``gateway/upstream/health_checks.py``) against real HTTP servers.

Each target is a ``RawServer`` in the test's own loop, answering its health path with the status
the test sets (or never), and noting, as each check arrives, what the gateway believed of the
target at that moment: the verdicts are read exactly, check by check, with no sleep to guess.
The checks go through the real HTTP/1.1 pool (``Http1Client``) each target would use.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

from gateway.config.loader import parse_config_text
from gateway.limits import LocalLimiter
from gateway.runtime import Runtime, build_runtime
from gateway.upstream.health import HealthRegistry, TargetHealth
from gateway.upstream.health_checks import HealthChecker
from gateway.upstream.targets import UpstreamTarget
from gateway.upstream.transports.http1 import Http1Client
from tests.support.rawserver import RawConnection, RawServer

UPSTREAM_KEY = "sk-upstream-health-check-secret-42"


@dataclass
class Arrival:
    at: float
    down: bool  # the target's active verdict when this check arrived
    probation: bool
    request: bytes


@dataclass
class HealthPath:
    """A target's server: answers ``status``, or nothing at all while ``hang``."""

    status: int = 200
    hang: bool = False
    health: TargetHealth | None = None  # set once the runtime exists
    arrivals: list[Arrival] = field(default_factory=list)

    async def handle(self, connection: RawConnection) -> None:
        while (request := await connection.read_request()) is not None:
            health = self.health
            assert health is not None
            self.arrivals.append(
                Arrival(time.monotonic(), health.active_down, health.probation, request)
            )
            if self.hang:
                await connection.wait_eof()  # until the gateway gives up and closes
                return
            body = b'{"status": "ok"}'
            connection.write(
                b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (self.status, len(body), body)
            )

    def states(self) -> list[bool]:
        return [arrival.down for arrival in self.arrivals]

    async def wait_checks(self, count: int, within: float = 3.0) -> None:
        """Until ``count`` more checks have arrived."""
        wanted = len(self.arrivals) + count
        async with asyncio.timeout(within):
            while len(self.arrivals) < wanted:
                await asyncio.sleep(0.005)


def config_text(
    urls: list[str],
    *,
    check: str = "{path: /health, interval: 0.05, timeout: 0.3, unhealthy_after: 2, "
    "healthy_after: 2}",
) -> str:
    targets = "\n".join(
        f"      - {{name: t{i}, base_url: '{url}/v1'}}" for i, url in enumerate(urls, 1)
    )
    return f"""
upstreams:
  llm:
    targets:
{targets}
    auth: {{style: bearer, key: {UPSTREAM_KEY}}}
    headers: {{x-tenant: gateway-tests}}
    query: {{api-version: "2025-01-01"}}
    outlier: {{consecutive_failures: 1, base_ejection: 30}}
    {"health_check: " + check if check else ""}
routes:
  - {{name: chat, path: /v1/chat/completions, upstream: llm}}
"""


@dataclass
class Setup:
    paths: list[HealthPath]
    servers: list[RawServer]
    registry: HealthRegistry
    checker: HealthChecker

    def runtime(self, **kwargs: str) -> Runtime:
        urls = [server.url for server in self.servers]
        config = parse_config_text(config_text(urls, **kwargs))
        runtime = build_runtime(config, Http1Client, LocalLimiter(), health=self.registry)
        for path, target in zip(self.paths, runtime.upstreams["llm"].targets, strict=True):
            path.health = target.health
        return runtime


@asynccontextmanager
async def targets(count: int, clock: Callable[[], float] = time.monotonic) -> AsyncIterator[Setup]:
    paths = [HealthPath() for _ in range(count)]
    checker = HealthChecker()
    async with AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(RawServer(p.handle)) for p in paths]
        setup = Setup(paths, servers, HealthRegistry(clock=clock), checker)
        try:
            yield setup
        finally:
            await checker.stop()


def first(runtime: Runtime) -> UpstreamTarget:
    return runtime.upstreams["llm"].targets[0]


async def test_500s_mark_a_target_down_after_unhealthy_after_and_up_after_healthy_after() -> None:
    async with targets(2) as setup:
        runtime = setup.runtime()
        bad, good = setup.paths
        bad.status = 500
        setup.checker.start(runtime)
        await bad.wait_checks(4)
        # As each check arrived: up, up after one failure, down after the second.
        assert bad.states()[:4] == [False, False, True, True]
        assert runtime.upstreams["llm"].usable_targets() == 1
        assert not first(runtime).health.usable(time.monotonic())

        bad.status = 200
        seen = len(bad.arrivals)
        await bad.wait_checks(4)
        # The check that was on its way may still have failed; then two passes bring it back.
        after = bad.states()[seen:]
        assert after[-1] is False
        assert after.count(True) in (2, 3)
        assert after[after.index(False) :] == [False] * (len(after) - after.index(False))
        assert first(runtime).health.in_service()
        assert not any(good.states())  # the other target was never down


async def test_a_hanging_target_times_out_and_never_delays_another_targets_checks() -> None:
    async with targets(2) as setup:
        runtime = setup.runtime()
        hung, healthy = setup.paths
        hung.hang = True
        started = time.monotonic()
        setup.checker.start(runtime)
        async with asyncio.timeout(3):
            while not first(runtime).health.active_down:
                await asyncio.sleep(0.01)
        took = time.monotonic() - started
        assert took >= 2 * 0.3  # two checks timed out (0.3 s each) before it was down
        assert len(hung.arrivals) in (2, 3)  # one check at a time: no pile of hung checks
        # Meanwhile the other target was checked on its own schedule, every 0.05 s.
        gaps = [b.at - a.at for a, b in zip(healthy.arrivals, healthy.arrivals[1:], strict=False)]
        assert len(healthy.arrivals) >= 6
        assert max(gaps) < 0.2, gaps
        assert runtime.upstreams["llm"].targets[1].health.in_service()


async def test_a_check_carries_the_targets_credentials_headers_and_query() -> None:
    async with targets(1) as setup:
        runtime = setup.runtime()
        setup.checker.start(runtime)
        await setup.paths[0].wait_checks(2)
        head = setup.paths[0].arrivals[0].request.split(b"\r\n\r\n")[0].decode("latin-1")
        lines = head.split("\r\n")
        assert lines[0] == "GET /v1/health?api-version=2025-01-01 HTTP/1.1"
        assert f"authorization: Bearer {UPSTREAM_KEY}" in lines
        assert "x-tenant: gateway-tests" in lines
        assert "user-agent: llm-gateway-health-check" in lines
        # Both checks on one kept-alive connection: the body was read and the connection reused.
        assert len(setup.servers[0].connections) == 1


async def test_an_ejected_target_comes_back_only_on_a_check_that_passes_after_its_ejection() -> (
    None
):
    class Clock:
        now = 1000.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()
    async with targets(2, clock) as setup:
        check = (
            "{path: /health, interval: 0.05, timeout: 0.3, unhealthy_after: 5, healthy_after: 1}"
        )
        runtime = setup.runtime(check=check)
        target = first(runtime)
        health = target.health
        assert health.actively_checked
        group = runtime.upstreams["llm"]
        assert health.failed(False, group.may_eject) == 30.0  # ejected by traffic, for 30 s
        setup.checker.start(runtime)

        path = setup.paths[0]
        await path.wait_checks(3)  # passing checks, but within the ejection
        assert health.probation
        assert not health.usable(clock())
        assert health.returns_at(clock()) is None  # only a check can bring it back

        path.status = 503
        await path.wait_checks(1)  # every passing check before it has been judged
        clock.now += 31  # the ejection is over: the next passing check decides
        await path.wait_checks(3)
        assert health.probation
        assert not health.active_down

        path.status = 200
        await path.wait_checks(2)
        assert not health.probation
        assert health.in_service()
        assert health.recoveries == 1
        assert [a.probation for a in path.arrivals][-1] is False


async def test_the_checker_follows_each_reload_and_a_removed_check_lifts_its_verdict() -> None:
    async with targets(1) as setup:
        path = setup.paths[0]
        path.status = 500
        setup.checker.start(setup.runtime())
        await path.wait_checks(3)
        health = path.health
        assert health is not None
        assert health.active_down

        ready = "{path: /ready, interval: 0.05, timeout: 0.3, unhealthy_after: 2, healthy_after: 1}"
        setup.checker.follow(setup.runtime(check=ready))
        path.status = 200
        await path.wait_checks(3)
        assert path.health is health  # the same target: what was learnt is kept
        assert not health.active_down
        assert path.arrivals[-1].request.startswith(b"GET /v1/ready?")  # the new snapshot's

        path.status = 500
        await path.wait_checks(3)
        assert health.active_down
        setup.checker.follow(setup.runtime(check=""))  # the check is gone from the config
        assert not health.active_down
        assert not health.actively_checked
        count = len(path.arrivals)
        await asyncio.sleep(0.2)
        assert len(path.arrivals) == count  # and nothing checks it any more
