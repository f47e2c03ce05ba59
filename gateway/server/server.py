"""One gateway process under uvicorn: drain on a stop signal, then finish or cut what is open.

See ``gateway/server/runner.py`` for how a stop goes, in one process and with workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Protocol, runtime_checkable

import uvicorn
from uvicorn.config import Config

logger = logging.getLogger("gateway.server")


# After cutting the connections the grace period left open, how long their requests get to
# notice before whatever remains is cancelled.
CUT_WAIT_SECONDS = 1.0

# The signals that stop the gateway (uvicorn's HANDLED_SIGNALS on POSIX).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# In a worker, a stop signal this soon after the first is the same stop arriving twice, not a
# second one: a terminal's Ctrl-C, or systemd's default KillMode=control-group, signals every
# process of the group at once, and the supervisor then passes the signal on too. Taken as a
# second signal it would end the drain delay (and a second SIGINT would force the exit) in every
# worker; uvicorn PR #1069 describes the same double signal forcing its reloader's child out.
REPEAT_WINDOW_SECONDS = 1.0

# How long the supervisor waits for its workers beyond their drain delay and grace period before
# killing them: the cut itself (CUT_WAIT_SECONDS), then the app's shutdown (pools, Redis).
KILL_MARGIN_SECONDS = 5.0


@runtime_checkable
class Drainable(Protocol):
    """An app that can turn unready while it goes on serving (gateway.app.Gateway)."""

    def begin_drain(self) -> None: ...


def find_drainable(app: object) -> Drainable | None:
    """The app that can drain, inside uvicorn's wrappers (``config.loaded_app`` is the app
    itself, or the app wrapped by uvicorn's proxy-headers, message-logger or ASGI2 middleware,
    each holding what it wraps as ``.app``); None if there is none."""
    seen: set[int] = set()
    while app is not None and id(app) not in seen:
        if isinstance(app, Drainable):
            return app
        seen.add(id(app))
        app = getattr(app, "app", None)
    return None


class GatewayServer(uvicorn.Server):
    def __init__(
        self, config: Config, *, drain_delay: float = 0.0, repeat_window: float = 0.0
    ) -> None:
        super().__init__(config)
        self.drain_delay = drain_delay
        self.repeat_window = repeat_window
        # When the first stop signal arrived (monotonic), None until one has.
        self._stopped_at: float | None = None
        self._skip_delay = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if find_drainable(self.config.loaded_app) is None:
            logger.warning("the app has no begin_drain(): /readyz will not turn 503 on SIGTERM")

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's, without re-raising the signal once shut down (uvicorn PR #1600): the process
        # would then die of it, with exit status 143 for SIGTERM and a KeyboardInterrupt
        # traceback for SIGINT. A gateway that stopped as it was asked to exits 0.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: it sets flags and hands the rest (the app, logging) to the loop.
        now = time.monotonic()
        name = signal.Signals(sig).name
        if self._stopped_at is None:
            self._stopped_at = now
            self.should_exit = True
            self._soon(self._begin_drain, name)
            return
        if now - self._stopped_at < self.repeat_window:
            return
        first_repeat = not self._skip_delay
        self._skip_delay = True
        if sig == signal.SIGINT and not self.force_exit:
            self.force_exit = True
            self._soon(logger.warning, "%s while stopping: no more waiting for open requests", name)
        elif first_repeat:
            self._soon(logger.info, "%s while stopping: ending the drain delay now", name)

    def _soon(self, callback: Callable[..., object], *args: object) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to do
            loop.call_soon_threadsafe(callback, *args)

    def _begin_drain(self, name: str) -> None:
        logger.info(
            "%s: draining: /readyz answers 503; new connections are accepted for %ss more "
            "(server.drain_delay)",
            name,
            self.drain_delay,
        )
        app = find_drainable(getattr(self.config, "loaded_app", None))
        if app is not None:
            app.begin_drain()

    async def main_loop(self) -> None:
        await super().main_loop()
        if self._stopped_at is not None:
            await self._hold_open(self._stopped_at + self.drain_delay)

    async def _hold_open(self, deadline: float) -> None:
        """Go on accepting and serving until ``deadline`` or a second signal.

        Kubernetes signals a Pod and takes it out of its Services' endpoints at the same time, and
        each load balancer, kube-proxy included, learns of it later: connections keep arriving for
        a while after SIGTERM, and are refused if the socket is closed already
        (https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#pod-termination).
        """
        counter = 0
        while not self._skip_delay:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, 0.1))
            counter += 1
            await self.on_tick(counter)  # uvicorn's housekeeping, as in its main loop

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # new connections are refused from here on
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle ones close now, busy ones after their response
        await asyncio.sleep(0.1)
        busy = len(self.server_state.connections)
        logger.info(
            "listening socket closed: new connections are refused; %d open connection(s) get "
            "up to %ss to finish",
            busy,
            self._grace,
        )
        if not self.force_exit:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._grace):
                    await self._wait_tasks_to_complete()
        if self.server_state.connections or self.server_state.tasks:
            await self._cut_open_connections("forced exit" if self.force_exit else None)
        elif busy:
            logger.info("every open request finished")
        if not self.force_exit:
            await self.lifespan.shutdown()
            return
        # uvicorn skips the app's shutdown on a forced exit, and the loop's close then cancels
        # the app's lifespan task, which uvicorn logs as an ERROR with a traceback. With every
        # request ended by the cut, the app's shutdown (pools, Redis, the access log's last
        # lines) is quick: it gets a moment, not an unbounded wait.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CUT_WAIT_SECONDS):
                await self.lifespan.shutdown()

    @property
    def _grace(self) -> float | None:
        return self.config.timeout_graceful_shutdown

    async def _cut_open_connections(self, reason: str | None = None) -> None:
        open_connections = list(self.server_state.connections)
        logger.warning(
            "%s: cutting %d open connection(s) and their requests",
            reason or "grace period over",
            len(open_connections),
        )
        for connection in open_connections:
            transport = getattr(connection, "transport", None)
            if transport is not None:
                # abort(), not close(): a stream's unsent bytes are not waited for, and its
                # chunked body never gets its last chunk, so the client cannot take a cut stream
                # for a complete one. The request sees a client disconnect and ends without a
                # traceback.
                transport.abort()
        # Awaited here, before the lifespan shutdown: a request still running when the loop
        # closes is cancelled by it, and uvicorn logs each one as an ERROR with a traceback.
        tasks = set(self.server_state.tasks)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=CUT_WAIT_SECONDS)
        for task in pending:
            task.cancel(msg="gateway shutdown")
        # Their CancelledError (and anything else they raise) is theirs: shutdown goes on.
        await asyncio.gather(*pending, return_exceptions=True)
