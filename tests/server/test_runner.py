"""Serving: signals and shutdown of one process and of a supervisor with workers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.supervisors.multiprocess import Process

from gateway.server import runner
from gateway.server import server as server_module
from gateway.server import supervisor as supervisor_module
from tests.conftest import DEMO_KEY, UPSTREAM_KEY, gateway_config
from tests.support.admin import ADMIN_HEADERS
from tests.support.fakeupstream import FakeUpstream
from tests.support.gatewayproc import GatewayProcess, stop_process
from tests.support.ports import free_port

ENV = {"TEST_UPSTREAM_KEY": UPSTREAM_KEY}
AUTH = {"authorization": f"Bearer {DEMO_KEY}"}
CHAT = {"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}]}
NEW_ROUTE = (
    "  - {name: added, path: /v1/added, methods: [GET], upstream: fake, upstream_path: /models}\n"
)


def no_polling(config: str) -> str:
    """Reload only on SIGHUP, so a test knows what caused it."""
    return config.replace("server:\n", "server:\n  reload_interval: 0\n", 1)


def no_drain_delay(config: str) -> str:
    """Stop accepting at once on SIGTERM, as before server.drain_delay (tests/server/test_drain.py
    is about the delay)."""
    return config.replace("server:\n", "server:\n  drain_delay: 0\n", 1)


def with_route(config: str) -> str:
    return config.replace("routes:\n", "routes:\n" + NEW_ROUTE, 1)


def worker_pids(gateway: GatewayProcess, tries: int = 40) -> set[int]:
    """The pids of the workers answering, over fresh connections."""
    pids = set()
    for _ in range(tries):
        with httpx.Client() as client:
            # /readyz says only ready or not; the pid is in the admin API's health detail.
            pids.add(client.get(gateway.url + "/admin/health", headers=ADMIN_HEADERS).json()["pid"])
    return pids


def test_sighup_reloads_every_worker_in_place_without_dropping_a_request(
    upstream: FakeUpstream,
) -> None:
    config = no_drain_delay(no_polling(gateway_config(upstream.base_url)))
    with GatewayProcess(config, env=ENV, args=("--workers", "2")) as gateway:
        before = worker_pids(gateway)
        assert len(before) == 2
        stop = threading.Event()
        failures: list[str] = []

        def keep_alive_load() -> int:
            served = 0
            with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=5) as client:
                while not stop.is_set():
                    try:
                        response = client.post("/v1/chat/completions", json=CHAT)
                        if response.status_code != 200:
                            failures.append(str(response.status_code))
                        served += 1
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
            return served

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            loads = [pool.submit(keep_alive_load) for _ in range(4)]
            time.sleep(0.3)
            gateway.config_path.write_text(with_route(config))
            gateway.signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                codes = {
                    httpx.get(gateway.url + "/v1/added", headers=AUTH).status_code
                    for _ in range(10)
                }
                if codes == {200}:
                    break
                time.sleep(0.1)
            time.sleep(0.3)
            stop.set()
            served = sum(load.result() for load in loads)
        assert codes == {200}, "not every worker reloaded"
        assert failures == []
        assert served > 50
        assert worker_pids(gateway) == before  # reloaded in place, not restarted
        logs = gateway.logs()
        assert "Traceback" not in logs


def test_sighup_with_a_broken_file_keeps_every_worker_serving(upstream: FakeUpstream) -> None:
    config = no_drain_delay(no_polling(gateway_config(upstream.base_url)))
    with GatewayProcess(config, env=ENV, args=("--workers", "2")) as gateway:
        before = worker_pids(gateway)
        gateway.config_path.write_text(config + "\nroutes: [broken\n")
        gateway.signal(signal.SIGHUP)
        time.sleep(1.5)
        assert worker_pids(gateway) == before
        response = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=AUTH)
        assert response.status_code == 200
        logs = gateway.logs()
        assert "Traceback" not in logs
        assert logs.count("config reload refused") == 2  # once per worker


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_refuses_new_connections_at_once_and_drains_open_streams(
    upstream: FakeUpstream, workers: str
) -> None:
    config = no_drain_delay(gateway_config(upstream.base_url))
    with GatewayProcess(config, env=ENV, args=("--workers", workers)) as gateway:
        worker_pids(gateway)  # every worker is up
        result: dict[str, object] = {}

        def stream() -> None:
            body = {**CHAT, "stream": True}
            headers = {**AUTH, "x-fake-chunks": "8", "x-fake-interval-ms": "150"}
            with httpx.stream(
                "POST", gateway.url + "/v1/chat/completions", json=body, headers=headers
            ) as response:
                result["data"] = b"".join(response.iter_raw())

        streamer = threading.Thread(target=stream)
        streamer.start()
        time.sleep(0.4)
        gateway.signal(signal.SIGTERM)
        started = time.monotonic()
        refused_after = None
        while time.monotonic() - started < 2:
            try:
                with socket.create_connection(("127.0.0.1", gateway.port), timeout=0.5) as sock:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
                    sock.settimeout(0.5)
                    sock.recv(100)
            except (ConnectionRefusedError, ConnectionResetError):
                refused_after = time.monotonic() - started
                break
            except TimeoutError:
                pytest.fail("a connection was accepted during the drain and never served")
            time.sleep(0.02)
        streamer.join(10)
        assert refused_after is not None
        assert refused_after < 0.6
        data = result["data"]
        assert isinstance(data, bytes)
        assert data.rstrip().endswith(b"data: [DONE]")


def test_streams_cut_by_the_grace_period_log_one_warning(upstream: FakeUpstream) -> None:
    config = no_drain_delay(gateway_config(upstream.base_url))
    with GatewayProcess(config, env=ENV, args=("--graceful-timeout", "0.5")) as gateway:
        outcomes: list[str] = []

        def stream() -> None:
            body = {**CHAT, "stream": True}
            headers = {**AUTH, "x-fake-chunks": "50", "x-fake-interval-ms": "200"}
            try:
                with httpx.stream(
                    "POST", gateway.url + "/v1/chat/completions", json=body, headers=headers
                ) as response:
                    for _ in response.iter_raw():
                        pass
                outcomes.append("complete")
            except httpx.HTTPError:
                outcomes.append("cut")

        streams = [threading.Thread(target=stream) for _ in range(3)]
        for thread in streams:
            thread.start()
        time.sleep(0.5)
        gateway.signal(signal.SIGTERM)
        for thread in streams:
            thread.join(10)
        gateway.wait(10)
        assert outcomes == ["cut"] * 3
        logs = gateway.logs()
        assert logs.count("grace period over: cutting 3 open connection(s)") == 1
        assert "Traceback" not in logs
        assert " ERROR " not in logs


@pytest.mark.parametrize(
    "upstream_headers",
    [
        {"x-fake-hang-after": "1"},
        {"x-fake-hang": "1"},
    ],
    ids=["silent-after-one-event", "no-headers"],
)
def test_requests_on_a_silent_upstream_cut_by_the_grace_period_end_before_the_loop_closes(
    upstream: FakeUpstream, upstream_headers: dict[str, str]
) -> None:
    config = no_drain_delay(gateway_config(upstream.base_url))
    with GatewayProcess(config, env=ENV, args=("--graceful-timeout", "0.3")) as gateway:
        outcomes: list[str] = []

        def stream() -> None:
            body = {**CHAT, "stream": True}
            try:
                with httpx.stream(
                    "POST",
                    gateway.url + "/v1/chat/completions",
                    json=body,
                    headers={**AUTH, **upstream_headers},
                    timeout=10,
                ) as response:
                    for _ in response.iter_raw():
                        pass
                outcomes.append("complete")
            except httpx.HTTPError:
                outcomes.append("cut")

        streams = [threading.Thread(target=stream) for _ in range(3)]
        for thread in streams:
            thread.start()
        time.sleep(0.5)
        gateway.signal(signal.SIGTERM)
        for thread in streams:
            thread.join(10)
        gateway.wait(10)
        assert outcomes == ["cut"] * 3
        logs = gateway.logs()
        warnings = [line for line in logs.splitlines() if " WARNING " in line]
        assert warnings == [line for line in warnings if "grace period over: cutting 3" in line]
        assert len(warnings) == 1
        assert "Traceback" not in logs
        assert " ERROR " not in logs


class _Transport:
    def __init__(self, on_abort: Callable[[], None]) -> None:
        self.on_abort = on_abort

    def abort(self) -> None:
        self.on_abort()


class _Connection:
    def __init__(self, transport: _Transport) -> None:
        self.transport = transport


async def test_cutting_waits_for_requests_to_end_then_cancels_and_awaits_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server_module, "CUT_WAIT_SECONDS", 0.2)
    server = runner.GatewayServer(Config(app=None))  # type: ignore[arg-type]
    disconnected = asyncio.Event()
    ended: list[str] = []

    async def ends_on_disconnect() -> None:
        await disconnected.wait()
        await asyncio.sleep(0.05)  # tidying up after the client left
        ended.append("ended")

    async def never_ends() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise

    polite = asyncio.ensure_future(ends_on_disconnect())
    stuck = asyncio.ensure_future(never_ends())
    server.server_state.tasks.update({polite, stuck})
    server.server_state.connections.add(_Connection(_Transport(disconnected.set)))  # type: ignore[arg-type]
    started = time.monotonic()
    await server._cut_open_connections()
    # Both are over before shutdown goes on to the lifespan: none is left for the loop's close.
    assert polite.done()
    assert not polite.cancelled()
    assert stuck.cancelled()
    assert sorted(ended) == ["cancelled", "ended"]
    assert 0.2 <= time.monotonic() - started < 1


async def test_cutting_with_no_request_left_does_not_wait() -> None:
    server = runner.GatewayServer(Config(app=None))  # type: ignore[arg-type]
    started = time.monotonic()
    await server._cut_open_connections()
    assert time.monotonic() - started < 0.1


# Runs the CLI as `python -m gateway` does, and says when its arguments are parsed: from then on
# every SIGHUP lands in the gateway's own code, not in the interpreter's start.
_SERVE_AFTER_MARK = (
    "import sys\n"
    "from gateway.cli import parser\n"
    "args = parser().parse_args(sys.argv[1:])\n"
    "sys.stdout.write('parsed\\n')\n"
    "sys.stdout.flush()\n"
    "sys.exit(args.run(args))\n"
)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_sent_again_and_again_while_starting_does_not_kill_the_gateway(
    upstream: FakeUpstream, workers: str, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(no_drain_delay(no_polling(gateway_config(upstream.base_url))))
    port = free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-c", _SERVE_AFTER_MARK, "serve", "--config", str(config)),
            *("--host", "127.0.0.1", "--port", str(port), "--workers", workers),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, **ENV},
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"parsed\n"
        time.sleep(0.01)  # the few statements between the mark and the gateway's first line
        sent = 0
        ready = False
        deadline = time.monotonic() + 20
        while not ready and time.monotonic() < deadline and process.poll() is None:
            process.send_signal(signal.SIGHUP)
            sent += 1
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=0.2).status_code == 200
            except httpx.TransportError:
                time.sleep(0.01)
        assert process.poll() is None, f"exit code {process.returncode}"
        assert ready
        assert sent >= 3  # several landed while it started (a fast start takes ~5)
        if workers == "2":
            pids = {
                httpx.get(
                    f"http://127.0.0.1:{port}/admin/health", headers=ADMIN_HEADERS, timeout=5
                ).json()["pid"]
                for _ in range(40)
            }
            assert len(pids) == 2  # neither worker was killed and replaced
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, headers=AUTH, timeout=5
        )
        assert response.status_code == 200
    finally:
        stop_process(process)
        assert process.stdout is not None
        with process.stdout:
            logs = process.stdout.read().decode(errors="replace")
    assert "died" not in logs
    assert "Traceback" not in logs


class _FakeWorker:
    """A worker of the supervisor's restart logic: dies when told to, with an exit code."""

    count = 0

    def __init__(self) -> None:
        _FakeWorker.count += 1
        self.pid = _FakeWorker.count
        self.alive = True
        self.served = False
        self.exitcode: int | None = None

    def die(self, exitcode: int = 1) -> None:
        self.alive = False
        self.exitcode = exitcode

    def kill(self) -> None:
        pass

    def join(self) -> None:
        pass


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class _Supervisor(runner.Supervisor):
    """The supervisor's restart logic without processes or signal handlers."""

    def __init__(self, clock: _Clock, slots: int, first_start: bool) -> None:
        self.clock = clock
        self.config = Config(app=None)  # type: ignore[arg-type]
        self.should_exit = threading.Event()
        self.started: list[float] = []
        self.processes = [self._start_worker() for _ in range(slots)]  # type: ignore[misc]
        self.slots = [runner.WorkerSlot(first_start=first_start) for _ in range(slots)]

    def _start_worker(self) -> _FakeWorker:  # type: ignore[override]
        self.started.append(self.clock.now)
        return _FakeWorker()

    def _healthcheck(self, worker: Process) -> bool | None:
        fake: _FakeWorker = worker  # type: ignore[assignment]
        return fake.served if fake.alive else None

    def worker(self, index: int = 0) -> _FakeWorker:
        fake: _FakeWorker = self.processes[index]  # type: ignore[assignment]
        return fake


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    # The supervisor's clock only: its module's ``time`` name, not the time module itself.
    monkeypatch.setattr(supervisor_module, "time", fake)
    return fake


def test_restart_delays_double_from_one_second_up_to_thirty() -> None:
    delays = [runner.restart_delay(failures) for failures in range(1, 9)]
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert runner.restart_delay(10_000) == 30


def test_a_worker_that_keeps_dying_is_restarted_with_backoff_and_one_warning_per_streak(
    clock: _Clock, caplog: pytest.LogCaptureFixture
) -> None:
    supervisor = _Supervisor(clock, slots=2, first_start=False)
    caplog.set_level(logging.DEBUG, logger="gateway.server")
    starts_before = len(supervisor.started)
    for _ in range(7):
        supervisor.worker().die(STARTUP_FAILURE)  # a replacement failing to start: retried
        supervisor.keep_subprocess_alive()
        for _ in range(400):  # 40 s of the supervisor's 0.1 s ticks
            clock.now += 0.1
            supervisor.keep_subprocess_alive()
            if len(supervisor.started) > starts_before:
                break
        starts_before = len(supervisor.started)
    gaps = [
        round(b - a) for a, b in zip(supervisor.started[2:], supervisor.started[3:], strict=False)
    ]
    assert gaps == [2, 4, 8, 16, 30, 30]
    assert round(supervisor.started[2] - 1000.0) == 1
    assert not supervisor.should_exit.is_set()
    assert supervisor.worker(1).pid == 2  # the other slot's worker was left alone
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1

    # A worker that serves ends the streak: the next failure warns again and waits 1 s.
    supervisor.worker().served = True
    supervisor.keep_subprocess_alive()
    supervisor.worker().die()
    supervisor.keep_subprocess_alive()
    before = len(supervisor.started)
    clock.now += 1.05
    supervisor.keep_subprocess_alive()
    assert len(supervisor.started) == before + 1
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_a_worker_failing_to_start_when_the_supervisor_starts_stops_it(clock: _Clock) -> None:
    supervisor = _Supervisor(clock, slots=2, first_start=True)
    supervisor.worker().die(STARTUP_FAILURE)
    supervisor.keep_subprocess_alive()
    assert supervisor.should_exit.is_set()
    assert supervisor.startup_failed
    assert len(supervisor.started) == 2


def test_a_worker_that_served_then_died_is_replaced_not_fatal(clock: _Clock) -> None:
    supervisor = _Supervisor(clock, slots=1, first_start=True)
    supervisor.worker().served = True
    supervisor.keep_subprocess_alive()
    supervisor.worker().die(STARTUP_FAILURE)
    supervisor.keep_subprocess_alive()
    clock.now += 1.05
    supervisor.keep_subprocess_alive()
    assert not supervisor.should_exit.is_set()
    assert len(supervisor.started) == 2
