"""Graceful drain on SIGTERM: unready first, still serving for ``server.drain_delay``, then no new
connections, open streams finishing within ``server.graceful_timeout``, the rest cut, exit 0.

Real gateway processes against the fake upstream, whose streams are paced by ``x-fake-chunks``
and ``x-fake-interval-ms``. Every wait is a poll with a deadline; the margins are wide, as the
gateway, the fake upstream and the clients share two CPUs.
"""

from __future__ import annotations

import logging
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from uvicorn.config import Config

from gateway.cli import parser
from gateway.config.model import GatewayConfig
from gateway.config.settings import ServerSettings
from gateway.server import runner
from gateway.server import supervisor as supervisor_module
from tests.conftest import DEMO_KEY, UPSTREAM_KEY, gateway_config
from tests.support.fakeupstream import FakeUpstream
from tests.support.gatewayproc import GatewayProcess
from tests.support.rawhttp import connect, is_closed

ENV = {"TEST_UPSTREAM_KEY": UPSTREAM_KEY}
AUTH = {"authorization": f"Bearer {DEMO_KEY}"}
CHAT = {"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}]}
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n"


def with_server(config: str, **settings: float) -> str:
    lines = "".join(f"  {name}: {value}\n" for name, value in settings.items())
    return config.replace("server:\n", "server:\n" + lines, 1)


@dataclass
class Stream:
    """A paced chat stream read in its own thread, on its own connection."""

    url: str
    chunks: int
    interval_ms: int
    data: bytes = b""
    error: BaseException | None = None
    ended_at: float | None = None
    first_bytes: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Stream:
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        headers = {
            **AUTH,
            "x-fake-chunks": str(self.chunks),
            "x-fake-interval-ms": str(self.interval_ms),
        }
        try:
            with httpx.stream(
                "POST",
                self.url + "/v1/chat/completions",
                json={**CHAT, "stream": True},
                headers=headers,
                timeout=30,
            ) as response:
                assert response.status_code == 200, response.status_code
                for part in response.iter_raw():
                    self.data += part
                    self.first_bytes.set()
        except BaseException as exc:  # recorded for the test to judge
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.first_bytes.set()

    def join(self, deadline: float) -> None:
        assert self.thread is not None
        self.thread.join(max(deadline - time.monotonic(), 0.0))
        assert not self.thread.is_alive(), "the stream is still open"

    @property
    def complete(self) -> bool:
        """Ended cleanly, with the final event: what a client takes for a whole answer."""
        return self.error is None and self.data.rstrip().endswith(b"data: [DONE]")


def open_streams(url: str, count: int, chunks: int, interval_ms: int) -> list[Stream]:
    """``count`` streams, each open and past its first event."""
    streams = [Stream(url, chunks, interval_ms).start() for _ in range(count)]
    deadline = time.monotonic() + 15
    for stream in streams:
        assert stream.first_bytes.wait(max(deadline - time.monotonic(), 0.0))
        assert stream.error is None, repr(stream.error)
    return streams


def readyz(url: str) -> int:
    """/readyz's status, over a new connection."""
    return httpx.get(url + "/readyz", timeout=5, headers={"connection": "close"}).status_code


def wait_for_readyz(url: str, status: int, deadline: float) -> float:
    """When /readyz (over new connections) first answered ``status``."""
    while time.monotonic() < deadline:
        if readyz(url) == status:
            return time.monotonic()
        time.sleep(0.01)
    pytest.fail(f"/readyz did not answer {status} in time")


def accepts(port: int) -> bool:
    """Whether a new connection is accepted and served (False: refused)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(HEALTHZ.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            sock.settimeout(5)
            answer = sock.recv(100)
    except (ConnectionRefusedError, ConnectionResetError):
        return False
    except TimeoutError:
        pytest.fail("a connection was accepted and never served")
    # Accepted by the kernel just before the socket closed, then dropped: refused all the same.
    return answer.startswith(b"HTTP/1.1 200")


def wait_for_refusal(port: int, deadline: float) -> float:
    """When new connections were first refused."""
    while time.monotonic() < deadline:
        if not accepts(port):
            return time.monotonic()
        time.sleep(0.01)
    pytest.fail("new connections were still accepted")


def get_on(sock: socket.socket) -> bytes:
    """One GET /healthz on a kept-alive connection: the whole response."""
    sock.sendall(HEALTHZ)
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(4096)
    return head


def wait_exit(gateway: GatewayProcess, deadline: float) -> tuple[int, float]:
    """The gateway's exit code and when it was seen to exit."""
    code = gateway.wait(max(deadline - time.monotonic(), 0.1))
    return code, time.monotonic()


def clean(logs: str) -> None:
    assert "Traceback" not in logs
    assert " ERROR " not in logs


# -- one process ------------------------------------------------------------------------------


def test_sigterm_turns_readyz_503_serves_through_the_delay_and_lets_20_streams_finish(
    upstream: FakeUpstream,
) -> None:
    delay, grace = 1.0, 3.0
    config = with_server(
        gateway_config(upstream.base_url), drain_delay=delay, graceful_timeout=grace
    )
    with GatewayProcess(config, env=ENV) as gateway:
        kept_alive = connect(gateway.port)
        assert get_on(kept_alive).startswith(b"HTTP/1.1 200")
        # 16 events 150 ms apart: over 2 s each, past the delay, well within the grace.
        streams = open_streams(gateway.url, 20, chunks=14, interval_ms=150)

        gateway.signal(signal.SIGTERM)
        sent = time.monotonic()
        unready_at = wait_for_readyz(gateway.url, 503, sent + delay)
        # Still accepting, still serving: a new connection, and a kept-alive one.
        response = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=AUTH)
        assert response.status_code == 200
        assert get_on(kept_alive).startswith(b"HTTP/1.1 200")
        refused_at = wait_for_refusal(gateway.port, sent + delay + 5)
        # Idle kept-alive connections are told to go once the listening socket is closed.
        assert is_closed(kept_alive, wait=3)
        kept_alive.close()

        for stream in streams:
            stream.join(sent + delay + grace + 5)
        code, exited_at = wait_exit(gateway, sent + delay + grace + 5)
        logs = gateway.logs()

    assert sent < unready_at < refused_at
    assert refused_at - sent >= delay - 0.05, "the listening socket closed before drain_delay"
    assert [stream.complete for stream in streams] == [True] * 20, [
        repr(stream.error) or stream.data[-60:] for stream in streams if not stream.complete
    ]
    assert all(stream.ended_at is not None for stream in streams)
    assert max(stream.ended_at or 0.0 for stream in streams) < sent + delay + grace
    assert code == 0
    assert exited_at - sent < delay + grace + 3
    assert "draining: /readyz now answers 503" in logs
    # Streams were still open when the socket closed, and finished in the grace period.
    still_open = re.search(r"(\d+) open connection\(s\) get up to 3.0s to finish", logs)
    assert still_open is not None
    assert int(still_open.group(1)) >= 1
    assert any((stream.ended_at or 0.0) > refused_at for stream in streams)
    assert "every open request finished" in logs
    assert "cutting" not in logs
    clean(logs)


def test_a_stream_still_open_when_the_grace_period_ends_is_cut_not_ended(
    upstream: FakeUpstream,
) -> None:
    # The config's values are overridden by the flags: the cut comes 1.5 s after SIGTERM.
    config = with_server(gateway_config(upstream.base_url), drain_delay=20, graceful_timeout=20)
    flags = ("--drain-delay", "0.5", "--graceful-timeout", "1")
    with GatewayProcess(config, env=ENV, args=flags) as gateway:
        long = open_streams(gateway.url, 1, chunks=100, interval_ms=100)[0]  # about 10 s
        short = open_streams(gateway.url, 1, chunks=6, interval_ms=100)[0]  # under 1 s
        gateway.signal(signal.SIGTERM)
        sent = time.monotonic()
        long.join(sent + 10)
        short.join(sent + 10)
        code, _ = wait_exit(gateway, sent + 10)
        logs = gateway.logs()

    assert short.complete
    assert not long.complete
    # The chunked body stops without its last chunk: the client knows it was cut.
    assert isinstance(long.error, httpx.RemoteProtocolError | httpx.ReadError), repr(long.error)
    assert b"data: " in long.data
    assert b"[DONE]" not in long.data
    assert long.ended_at is not None
    assert 1.5 - 0.05 <= long.ended_at - sent < 1.5 + 3
    assert code == 0
    assert logs.count("grace period over: cutting 1 open connection(s)") == 1
    clean(logs)


def test_a_second_sigterm_ends_the_delay_and_a_sigint_then_cuts_open_streams(
    upstream: FakeUpstream,
) -> None:
    config = with_server(gateway_config(upstream.base_url), drain_delay=60, graceful_timeout=60)
    with GatewayProcess(config, env=ENV) as gateway:
        stream = open_streams(gateway.url, 1, chunks=200, interval_ms=100)[0]  # about 20 s
        gateway.signal(signal.SIGTERM)
        wait_for_readyz(gateway.url, 503, time.monotonic() + 5)
        time.sleep(0.2)
        assert accepts(gateway.port)  # the delay is on
        gateway.signal(signal.SIGTERM)
        again = time.monotonic()
        refused_at = wait_for_refusal(gateway.port, again + 5)
        time.sleep(0.2)
        assert stream.error is None  # the grace period is on
        gateway.signal(signal.SIGINT)  # as a second Ctrl-C does in uvicorn: stop waiting
        forced = time.monotonic()
        stream.join(forced + 5)
        code, _ = wait_exit(gateway, forced + 10)
        logs = gateway.logs()
    assert refused_at - again < 5
    assert not stream.complete
    assert b"[DONE]" not in stream.data
    assert stream.ended_at is not None
    assert stream.ended_at - forced < 3
    assert code == 0  # no KeyboardInterrupt traceback, no death by the signal
    assert "SIGTERM while stopping: ending the drain delay now" in logs
    assert "SIGINT while stopping: no more waiting for open requests" in logs
    assert "forced exit: cutting 1 open connection(s)" in logs
    assert "Application shutdown complete" in logs
    clean(logs)


# -- a supervisor and workers -----------------------------------------------------------------


def wait_for_workers(gateway: GatewayProcess, count: int) -> None:
    deadline = time.monotonic() + 20
    while gateway.logs().count("Application startup complete") < count:
        assert time.monotonic() < deadline, gateway.logs()
        time.sleep(0.05)


def test_with_workers_each_drains_and_the_socket_closes_after_the_delay(
    upstream: FakeUpstream,
) -> None:
    delay, grace = 1.0, 3.0
    config = with_server(
        gateway_config(upstream.base_url), drain_delay=delay, graceful_timeout=grace
    )
    with GatewayProcess(config, env=ENV, args=("--workers", "2")) as gateway:
        wait_for_workers(gateway, 2)
        streams = open_streams(gateway.url, 10, chunks=12, interval_ms=150)

        gateway.signal(signal.SIGTERM)
        sent = time.monotonic()
        unready_at = wait_for_readyz(gateway.url, 503, sent + delay)
        response = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=AUTH)
        assert response.status_code == 200
        refused_at = wait_for_refusal(gateway.port, sent + delay + 5)

        for stream in streams:
            stream.join(sent + delay + grace + 5)
        code, exited_at = wait_exit(gateway, sent + delay + grace + 10)
        logs = gateway.logs()

    assert sent < unready_at < refused_at
    assert refused_at - sent >= delay - 0.05
    assert [stream.complete for stream in streams] == [True] * 10
    assert code == 0
    assert exited_at - sent < delay + grace + 3
    # The app of each worker, built there by the factory, was reached.
    assert logs.count("draining: /readyz now answers 503") == 2
    assert logs.count("listening socket closed: new connections are refused; ") == 2
    assert logs.count("supervisor's listening socket closed: new connections are refused") == 1
    assert "killing" not in logs
    clean(logs)


# -- the pieces -------------------------------------------------------------------------------


class _Drainable:
    def __init__(self) -> None:
        self.drained = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        pass

    def begin_drain(self) -> None:
        self.drained += 1


_made: list[_Drainable] = []


def make_drainable() -> _Drainable:
    """A factory, as ``gateway.app:app_from_environment`` is for the workers."""
    _made.append(_Drainable())
    return _made[-1]


@pytest.fixture
def uvicorn_log_levels() -> Iterator[None]:
    """uvicorn's Config sets its loggers' levels for the whole process: put them back."""
    loggers = [logging.getLogger(f"uvicorn.{name}") for name in ("error", "access", "asgi")]
    levels = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


@pytest.mark.usefixtures("uvicorn_log_levels")
@pytest.mark.parametrize(
    "options",
    [{}, {"proxy_headers": True}, {"proxy_headers": True, "log_level": "trace"}],
    ids=["bare", "proxy-headers", "proxy-headers-and-message-logger"],
)
@pytest.mark.parametrize("factory", [False, True], ids=["instance", "factory"])
def test_the_app_is_found_inside_uvicorns_wrappers(options: dict[str, Any], factory: bool) -> None:
    app: object = "tests.server.test_drain:make_drainable" if factory else _Drainable()
    config = Config(app=app, factory=factory, lifespan="off", log_config=None, **options)  # type: ignore[arg-type]
    config.load()
    found = runner.find_drainable(config.loaded_app)
    expected = _made[-1] if factory else app
    assert found is expected
    if options:
        assert config.loaded_app is not expected  # really wrapped


def test_no_drainable_app_is_none_even_with_a_loop_of_wrappers() -> None:
    looped = SimpleNamespace()
    looped.app = SimpleNamespace(app=looped)
    assert runner.find_drainable(looped) is None
    assert runner.find_drainable(None) is None


class _Worker:
    def __init__(self, exits_after: float | None) -> None:
        self.started = time.monotonic()
        self.exits_after = exits_after
        self.killed_at: float | None = None
        self.pid = 1  # never signalled: _signal_workers is replaced

    @property
    def exitcode(self) -> int | None:
        if self.killed_at is not None:
            return -9
        if self.exits_after is not None and time.monotonic() - self.started >= self.exits_after:
            return 0
        return None

    def kill(self) -> None:
        self.killed_at = time.monotonic()

    def join(self) -> None:
        pass


class _Supervisor(runner.Supervisor):
    """The supervisor's stop without processes: fake workers, a real socket."""

    def __init__(self, workers: list[_Worker], drain_delay: float, grace: float) -> None:
        self.config = Config(app=None, timeout_graceful_shutdown=grace)  # type: ignore[arg-type]
        self.sock = socket.socket()
        self.sockets = [self.sock]
        self.processes = workers  # type: ignore[assignment]
        self.drain_delay = drain_delay
        self.should_exit = threading.Event()
        self.signal_queue = []
        self.signalled: list[tuple[float, signal.Signals]] = []
        self.closed_at: float | None = None

    def _signal_workers(self, sig: signal.Signals) -> None:
        self.signalled.append((time.monotonic(), sig))

    def _close_sockets(self) -> None:
        if self.closed_at is None and not self._sockets_closed:
            self.closed_at = time.monotonic()
        super()._close_sockets()

    def join_all(self) -> None:
        pass


@pytest.fixture
def supervisor_parts() -> Iterator[list[_Supervisor]]:
    made: list[_Supervisor] = []
    yield made
    for supervisor in made:
        supervisor.sock.close()


def test_the_supervisor_passes_sigterm_on_and_closes_its_socket_after_the_delay(
    supervisor_parts: list[_Supervisor],
) -> None:
    workers = [_Worker(exits_after=0.6), _Worker(exits_after=0.7)]
    supervisor = _Supervisor(workers, drain_delay=0.3, grace=5)
    supervisor_parts.append(supervisor)
    started = time.monotonic()
    supervisor.handle_term()
    assert [sig for _, sig in supervisor.signalled] == [signal.SIGTERM]
    assert supervisor.closed_at is None
    supervisor._wind_down()
    assert supervisor.closed_at is not None
    assert 0.3 <= supervisor.closed_at - started < 0.5
    assert supervisor.sock.fileno() == -1
    assert all(worker.killed_at is None for worker in workers)


def test_the_supervisor_kills_workers_still_running_after_delay_grace_and_margin(
    supervisor_parts: list[_Supervisor], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor_module, "KILL_MARGIN_SECONDS", 0.3)
    workers = [_Worker(exits_after=0.1), _Worker(exits_after=None)]
    supervisor = _Supervisor(workers, drain_delay=0.2, grace=0.3)
    supervisor_parts.append(supervisor)
    started = time.monotonic()
    supervisor.handle_term()
    supervisor._wind_down()
    assert workers[0].killed_at is None
    assert workers[1].killed_at is not None
    assert 0.8 <= workers[1].killed_at - started < 1.2


def test_a_second_signal_to_the_supervisor_closes_its_socket_at_once(
    supervisor_parts: list[_Supervisor],
) -> None:
    supervisor = _Supervisor([_Worker(exits_after=0.3)], drain_delay=60, grace=60)
    supervisor_parts.append(supervisor)
    supervisor.handle_term()
    assert supervisor.closed_at is None
    started = time.monotonic()
    supervisor.handle_int()
    assert supervisor.closed_at is not None
    assert supervisor.closed_at - started < 0.1
    assert [sig for _, sig in supervisor.signalled] == [signal.SIGTERM, signal.SIGINT]
    supervisor._wind_down()  # returns once the worker is gone, not after 60 s


def test_a_worker_takes_a_repeat_within_the_window_as_the_same_stop() -> None:
    server = runner.GatewayServer(Config(app=None), drain_delay=5, repeat_window=0.5)  # type: ignore[arg-type]
    server.handle_exit(signal.SIGINT, None)
    server.handle_exit(signal.SIGTERM, None)  # the supervisor passing on the terminal's Ctrl-C
    assert server.should_exit
    assert not server._skip_delay
    assert not server.force_exit
    server._stopped_at = time.monotonic() - 1  # later: a second Ctrl-C
    server.handle_exit(signal.SIGINT, None)
    assert server._skip_delay
    assert server.force_exit


# -- settings and flags -----------------------------------------------------------------------


def test_drain_settings_default_to_5_and_20_seconds_and_refuse_negatives() -> None:
    settings = ServerSettings()
    assert (settings.drain_delay, settings.graceful_timeout) == (5.0, 20.0)
    assert ServerSettings(drain_delay=0, graceful_timeout=0).drain_delay == 0
    for name in ("drain_delay", "graceful_timeout"):
        for bad in (-1, float("inf"), float("nan")):
            with pytest.raises(ValidationError):
                ServerSettings.model_validate({name: bad})
    server_schema = GatewayConfig.model_json_schema()["$defs"]["ServerSettings"]["properties"]
    assert "drain_delay" in server_schema
    assert "graceful_timeout" in server_schema


def test_serve_flags_override_the_config_only_when_given(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = parser().parse_args(["serve"])
    assert (args.drain_delay, args.graceful_timeout) == (None, None)
    args = parser().parse_args(["serve", "--drain-delay", "0.5", "--graceful-timeout", "2"])
    assert (args.drain_delay, args.graceful_timeout) == (0.5, 2.0)
    for bad in ("-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit):
            parser().parse_args(["serve", "--drain-delay", bad])
    assert "--drain-delay" in capsys.readouterr().err
