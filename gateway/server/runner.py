"""Running the gateway: one process, or a supervisor and N workers, each shutting down gently.

Built on uvicorn's ``Server`` and its multiprocess supervisor, with these changes of behaviour:

- **Drain, then stop.** On SIGTERM or SIGINT the app starts draining at once (``/readyz``
  answers 503) while the process goes on accepting and serving for ``server.drain_delay``
  seconds, so that load balancers stop sending new connections before it stops accepting them.
  Then the listening sockets close, idle kept-alive connections are closed, and open requests and
  streams get ``server.graceful_timeout`` seconds to finish. A second signal ends the delay at
  once; a second SIGINT (Ctrl-C) also stops waiting for open requests, as in uvicorn. The process
  then exits 0: uvicorn would re-raise the signal and die of it.
- **Cut, not cancelled.** Once the grace period is over, uvicorn cancels every request still
  running, and each cancelled stream logs an ERROR with a traceback. Here the connections still
  open are cut instead (their clients see a cut stream, exactly as if the process had died, never
  one that looks complete), each request ends as a client disconnect, and one warning line says
  how many were cut.
- **Signals, with workers.** uvicorn's supervisor restarts every worker on SIGHUP (dropping
  requests on kept-alive connections, and aborting with a traceback when the new config is
  broken), and on SIGTERM keeps the listening socket open while the workers drain, so the
  kernel goes on accepting connections nobody will serve. Here SIGHUP is passed on to every
  worker, which reloads its config in place (gateway/reload.py); SIGTERM and SIGINT are passed
  on to every worker, which drains as above, and the supervisor closes its copy of the listening
  socket once the drain delay is over, so new connections are refused as soon as the workers
  have closed theirs. Workers still running well after the delay and the grace period are
  killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Protocol, runtime_checkable

import uvicorn
from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.supervisors.multiprocess import Multiprocess, Process

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


class GatewayWorker(Process):
    """A worker process running :class:`GatewayServer`."""

    def __init__(self, config: Config, sockets: list[socket.socket], drain_delay: float) -> None:
        # Pickled with the worker (its target is a bound method) into the spawned process.
        self.drain_delay = drain_delay
        super().__init__(config, sockets)

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = GatewayServer(
                config=self.config,
                drain_delay=self.drain_delay,
                repeat_window=REPEAT_WINDOW_SECONDS,
            )
        return self._server

    def target(self, sockets: list[socket.socket] | None = None) -> None:
        # The supervisor passes SIGHUP on to starting workers too, and until the app's config
        # reloader installs its handler (at startup) SIGHUP would terminate this process. The
        # worker was started with SIGHUP blocked (Supervisor._start_worker), so none arriving
        # before this line is lost to the default action; a pending one is dropped, as the
        # config is not loaded yet.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        super().target(sockets)


# A worker slot whose workers keep dying is restarted after 1 s, then 2, 4, ... up to 30 s:
# a worker that cannot start (an upstream secret missing, a broken file) is not respawned
# every second forever.
FIRST_RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0


def restart_delay(failures: int) -> float:
    """How long a slot waits before its next worker, after ``failures`` in a row (1, 2, ...)."""
    return min(FIRST_RESTART_DELAY * 2.0 ** min(failures - 1, 32), MAX_RESTART_DELAY)


@dataclass(slots=True)
class WorkerSlot:
    """One of the supervisor's workers and its restart history."""

    # Whether the slot was filled when the supervisor started, and no worker has served in it
    # yet: such a worker failing to start means the gateway cannot start at all.
    first_start: bool
    failures: int = 0
    restart_at: float | None = None

    def served(self) -> None:
        self.first_start = False
        self.failures = 0

    def failed(self, now: float) -> float:
        """Note a worker's death; the delay before the next one."""
        self.first_start = False
        self.failures += 1
        delay = restart_delay(self.failures)
        self.restart_at = now + delay
        return delay


class Supervisor(Multiprocess):
    """uvicorn's supervisor with the gateway's workers and signal handling."""

    # True once a worker failed at the supervisor's start: ``run`` then exits with uvicorn's
    # STARTUP_FAILURE code.
    startup_failed = False
    # Seconds the workers go on accepting after a stop signal (server.drain_delay).
    drain_delay = 0.0
    # When the first stop signal arrived (monotonic), None until one has.
    _stopped_at: float | None = None
    _sockets_closed = False
    _on_worker_exit: Callable[[int], None] | None = None

    def __init__(
        self,
        config: Config,
        sockets: list[socket.socket],
        *,
        drain_delay: float = 0.0,
        on_worker_exit: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(config, sockets)
        self.drain_delay = drain_delay
        # Told the pid of each worker that died, once it is reaped (the metrics drop its
        # gauges): uvicorn's supervisor has no hook for it.
        self._on_worker_exit = on_worker_exit

    def init_processes(self) -> None:
        self.slots: list[WorkerSlot] = []
        for _ in range(self.processes_num):
            self.processes.append(self._start_worker())
            self.slots.append(WorkerSlot(first_start=True))

    def _start_worker(self) -> GatewayWorker:
        worker = GatewayWorker(self.config, self.sockets, self.drain_delay)
        # The child inherits the signal mask: SIGHUP stays blocked, not fatal, until its
        # target ignores it. The supervisor's own SIGHUP waits the few ms of the spawn.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            worker.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        return worker

    def keep_subprocess_alive(self) -> None:
        if self.should_exit.is_set():
            return
        for index, worker in enumerate(self.processes):
            slot = self.slots[index]
            if slot.restart_at is not None:
                if time.monotonic() < slot.restart_at:
                    continue
                slot.restart_at = None
                self.processes[index] = self._start_worker()
                continue
            started = self._healthcheck(worker)
            if started is not None:
                if started:
                    slot.served()
                continue
            worker.kill()
            worker.join()
            if self._on_worker_exit is not None and worker.pid is not None:
                self._on_worker_exit(worker.pid)
            if self.should_exit.is_set():
                return
            if slot.first_start and worker.exitcode == STARTUP_FAILURE:
                # As uvicorn does: the app, its config or the socket is broken, and every
                # worker would fail the same way.
                logger.error(
                    "worker [%s] failed to start (exit code %s); stopping",
                    worker.pid,
                    worker.exitcode,
                )
                self.startup_failed = True
                self.should_exit.set()
                return
            delay = slot.failed(time.monotonic())
            if slot.failures == 1:
                # One line per streak of failures, not one a restart.
                logger.warning(
                    "worker [%s] died (exit code %s); starting another in %ss, waiting longer "
                    "(up to %ss) while they keep failing",
                    worker.pid,
                    worker.exitcode,
                    delay,
                    MAX_RESTART_DELAY,
                )
            else:
                logger.debug("worker [%s] died again; next attempt in %ss", worker.pid, delay)

    def _healthcheck(self, worker: Process) -> bool | None:
        """Whether ``worker`` has started serving; None if it is dead or does not answer."""
        if not worker.process.is_alive():
            return None
        return worker._healthcheck(self.config.timeout_worker_healthcheck)

    def handle_hup(self) -> None:
        logger.info("SIGHUP: every worker reloads its config in place")
        for worker in self.processes:
            if worker.pid is not None and worker.exitcode is None:
                os.kill(worker.pid, signal.SIGHUP)

    def handle_term(self) -> None:
        self._stop(signal.SIGTERM)

    def handle_int(self) -> None:
        self._stop(signal.SIGINT)

    def _stop(self, sig: signal.Signals) -> None:
        now = time.monotonic()
        if self._stopped_at is None:
            self._stopped_at = now
            logger.info(
                "%s: every worker drains; the listening socket stays open for %ss "
                "(server.drain_delay), then open requests get up to %ss",
                sig.name,
                self.drain_delay,
                self.config.timeout_graceful_shutdown,
            )
            if self.drain_delay <= 0:
                self._close_sockets()
        else:
            # Each worker ends its delay too: the signal is passed on below.
            logger.info("%s while stopping: closing the listening socket now", sig.name)
            self._close_sockets()
        # The same signal: a worker treats a second SIGINT as uvicorn does (stop waiting), and a
        # second SIGTERM as the end of the drain delay.
        self._signal_workers(sig)
        self.should_exit.set()

    def _signal_workers(self, sig: signal.Signals) -> None:
        for worker in self.processes:
            if worker.pid is not None and worker.exitcode is None:
                with contextlib.suppress(ProcessLookupError):  # it has just exited
                    os.kill(worker.pid, sig)

    def _close_sockets(self) -> None:
        """Close the supervisor's copy of the listening socket: once every worker has closed its
        own, the kernel refuses new connections instead of queueing them for no one."""
        if self._sockets_closed:
            return
        self._sockets_closed = True
        for sock in self.sockets:
            sock.close()
        if self._stopped_at is not None:
            logger.info(
                "supervisor's listening socket closed: new connections are refused once every "
                "worker has closed its own"
            )

    def _wind_down(self) -> None:
        """Wait for the workers to drain and exit; kill those that take far too long."""
        if self._stopped_at is None:
            # Stopping by itself (a worker failed at the start): the gateway never got ready as
            # a whole, so no load balancer is sending to it. The workers still drain as told.
            self._close_sockets()
            self._stopped_at = time.monotonic()
            self._signal_workers(signal.SIGTERM)
        close_at = self._stopped_at + self.drain_delay
        grace = self.config.timeout_graceful_shutdown
        # No grace period (None) is uvicorn's "wait for every open request, however long".
        kill_at = math.inf if grace is None else close_at + grace + KILL_MARGIN_SECONDS
        while True:
            self.handle_signals()  # a second stop signal ends the delay
            now = time.monotonic()
            if now >= close_at:
                self._close_sockets()
            running = [worker for worker in self.processes if worker.exitcode is None]
            if not running:
                break
            if now >= kill_at:
                logger.warning(
                    "workers %s still running %.0fs after the stop signal: killing them",
                    [worker.pid for worker in running],
                    now - self._stopped_at,
                )
                for worker in running:
                    worker.kill()
                break
            # On time for the close: each worker closes its own copy at the same moment or a
            # little later (its delay counts from when the signal reached it), and a socket
            # open in the supervisor alone queues connections no worker will accept.
            time.sleep(0.1 if self._sockets_closed else min(0.1, max(close_at - now, 0.0)))
        self._close_sockets()
        self.join_all()

    def handle_ttin(self) -> None:
        if self.should_exit.is_set():
            return  # stopping: no new worker
        self.processes_num += 1
        self.processes.append(self._start_worker())
        self.slots.append(WorkerSlot(first_start=False))

    def handle_ttou(self) -> None:
        if self.should_exit.is_set():
            return  # stopping: every worker is draining already
        super().handle_ttou()

    def run(self) -> None:
        logger.info("supervisor [%d] starting %d workers", os.getpid(), self.processes_num)
        self.init_processes()
        # uvicorn polls every 0.5 s; a stop signal should reach the workers sooner than that.
        while not self.should_exit.wait(0.1):
            self.handle_signals()
            self.keep_subprocess_alive()
        self.handle_signals()
        self._wind_down()
        logger.info("supervisor [%d] stopped", os.getpid())


def run(
    config: Config,
    *,
    drain_delay: float = 0.0,
    on_worker_exit: Callable[[int], None] | None = None,
) -> None:
    """Serve ``config``: in this process, or with ``config.workers`` worker processes.

    On SIGTERM or SIGINT, go on serving for ``drain_delay`` seconds while ``/readyz`` answers
    503, then give open requests ``config.timeout_graceful_shutdown`` seconds."""
    if config.workers > 1:
        sock = config.bind_socket()
        supervisor = Supervisor(
            config, sockets=[sock], drain_delay=drain_delay, on_worker_exit=on_worker_exit
        )
        supervisor.run()
        if supervisor.startup_failed:
            sys.exit(STARTUP_FAILURE)
        return
    GatewayServer(config, drain_delay=drain_delay).run()
