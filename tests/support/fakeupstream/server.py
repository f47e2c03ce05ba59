"""Running the fake: in a background thread for a test, or as its own process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Self, TypeVar

import uvicorn

from tests.support.fakeupstream.app import FakeUpstreamApp, quiet_deliberate_aborts
from tests.support.fakeupstream.bodies import MODELS
from tests.support.fakeupstream.controls import Controls
from tests.support.fakeupstream.record import RecordedRequest, first_disconnected

T = TypeVar("T")


class _Server(uvicorn.Server):
    """uvicorn's server, quicker to notice a stop, releasing waiting requests when it shuts down.

    Without the release, uvicorn's graceful shutdown would wait forever for a hung request.
    """

    def __init__(self, config: uvicorn.Config, app: FakeUpstreamApp) -> None:
        super().__init__(config)
        self.fake_app = app

    async def main_loop(self) -> None:
        # uvicorn looks at should_exit every 0.1 s; tests start and stop servers often, so look
        # every 5 ms, and still run uvicorn's housekeeping (on_tick) every 0.1 s as it expects.
        counter = 0
        while not await self.on_tick(counter):
            for _ in range(20):
                await asyncio.sleep(0.005)
                if self.should_exit:
                    break
            counter = (counter + 1) % 864_000

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.fake_app.close()
        await super().shutdown(sockets)


def _config(app: FakeUpstreamApp, loop: str, **kwargs: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http="httptools",
        loop=loop,
        interface="asgi3",
        lifespan="off",
        access_log=False,
        server_header=False,
        date_header=False,
        log_level="warning",
        **kwargs,
    )


class FakeUpstream:
    """The fake upstream on a free 127.0.0.1 port, in a background thread with its own loop.

    Use as ``with FakeUpstream() as upstream:`` or ``async with FakeUpstream() as upstream:``.
    The record (``requests``, ``last()``...) is read from the test thread.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        record: bool = True,
        models: Sequence[str] = MODELS,
        start_timeout: float = 10.0,
    ) -> None:
        self.app = FakeUpstreamApp(record=record, models=models)
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._start_timeout = start_timeout
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    # Lifecycle

    def _begin(self) -> None:
        if self._thread is not None:
            raise RuntimeError("FakeUpstream is already running")
        quiet_deliberate_aborts()
        # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose
        # proto says TCP, and without it every reply written in two parts (headers, body)
        # waits ~40 ms for the client's delayed ACK (Nagle).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._requested_port))
        except OSError:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        self.app.reopen()
        # log_config=None: leave the process's logging alone (records propagate to the root).
        self._server = _Server(_config(self.app, "asyncio", log_config=None), self.app)
        self._failure = None
        self._thread = threading.Thread(
            target=self._run,
            args=(self._server, sock),
            name=f"fake-upstream-{self._port}",
            daemon=True,
        )
        self._thread.start()

    def _run(self, server: _Server, sock: socket.socket) -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # SystemExit from a failed startup included
            self._failure = exc
        finally:
            sock.close()

    def _check_started(self, deadline: float) -> bool:
        assert self._server is not None
        assert self._thread is not None
        if self._server.started:
            return True
        if not self._thread.is_alive():
            self._thread = None
            raise RuntimeError("the fake upstream failed to start") from self._failure
        if time.monotonic() > deadline:
            self.stop()
            raise TimeoutError("the fake upstream did not start in time")
        return False

    def start(self) -> Self:
        self._begin()
        deadline = time.monotonic() + self._start_timeout
        while not self._check_started(deadline):
            time.sleep(0.001)
        return self

    async def astart(self) -> Self:
        self._begin()
        deadline = time.monotonic() + self._start_timeout
        while not self._check_started(deadline):
            await asyncio.sleep(0.001)
        return self

    def _signal_stop(self) -> threading.Thread | None:
        thread, self._thread = self._thread, None
        if thread is not None and self._server is not None:
            self._server.should_exit = True
        return thread

    def _joined(self, thread: threading.Thread) -> None:
        thread.join(5.0)
        if thread.is_alive():
            raise RuntimeError("the fake upstream did not stop")
        if self._failure is not None:
            raise RuntimeError("the fake upstream's server failed") from self._failure

    def stop(self) -> None:
        """Stop serving and join the thread.

        Waiting requests are released first: without headers yet they get a 503, mid-body their
        connection is dropped. Idle keep-alive connections are closed.
        """
        if (thread := self._signal_stop()) is not None:
            self._joined(thread)

    async def astop(self) -> None:
        if (thread := self._signal_stop()) is not None:
            deadline = time.monotonic() + 5.0
            while thread.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            self._joined(thread)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await self.astart()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.astop()

    # Where it listens

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeUpstream has not been started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI SDK's ``base_url``: ``url`` + ``/v1``."""
        return self.url + "/v1"

    # Behaviour set by the test (``FakeUpstreamApp.script``)

    def script(self, *plan: Controls) -> None:
        """The next requests behave as ``plan`` says, one ``Controls`` each, in order, whatever
        their headers; then as ``behave`` says, else as their headers say."""
        self.app.script(*plan)

    def behave(self, controls: Controls | None) -> None:
        """How every request behaves once the script is used up (None: as its headers say)."""
        self.app.behave(controls)

    def unscript(self) -> None:
        self.app.unscript()

    # What it received

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the requests received since the last ``clear()``, oldest first."""
        return self.app.log.snapshot()

    def last(self) -> RecordedRequest:
        """The most recent request; LookupError if there was none since the last ``clear()``."""
        requests = self.app.log.snapshot()
        if not requests:
            raise LookupError("the fake upstream has received no request")
        return requests[-1]

    def clear(self) -> None:
        self.app.log.clear()

    def wait_for(
        self, predicate: Callable[[list[RecordedRequest]], T | None], timeout: float = 5.0
    ) -> T:
        """Block until ``predicate(requests)`` is not None and return it (TimeoutError if not)."""
        return self.app.log.wait_for(predicate, timeout)

    def wait_for_disconnect(
        self, timeout: float = 5.0, request: RecordedRequest | None = None
    ) -> RecordedRequest:
        """The first request (or ``request``) whose client disconnected before it finished.

        Blocks the calling thread: from a test whose event loop drives the client, use
        ``await wait_for_disconnect_async()`` so the client can actually close.
        """
        return self.wait_for(first_disconnected(request), timeout)

    async def wait_for_disconnect_async(
        self, timeout: float = 5.0, request: RecordedRequest | None = None
    ) -> RecordedRequest:
        predicate = first_disconnected(request)
        deadline = time.monotonic() + timeout
        while (found := predicate(self.app.log.snapshot())) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no client disconnected within {timeout}s")
            await asyncio.sleep(0.002)
        return found


# -- As its own process (the benchmark's upstream) -------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.fakeupstream",
        description="A deterministic OpenAI-compatible upstream for the tests and the benchmark.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--record", action="store_true", help="keep a log of requests (memory!)")
    args = parser.parse_args(argv)
    app = FakeUpstreamApp(record=args.record)
    config = _config(app, "uvloop", host=args.host, port=args.port, backlog=4096)
    quiet_deliberate_aborts()  # after Config, which applies uvicorn's logging config
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it handled
        _Server(config, app).run()
