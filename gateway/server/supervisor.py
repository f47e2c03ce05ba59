"""The supervisor of ``gateway serve --workers N``: signals passed on, workers restarted.

See ``gateway/server/runner.py`` for how a stop goes, in one process and with workers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn
from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from gateway.server.server import KILL_MARGIN_SECONDS, REPEAT_WINDOW_SECONDS, GatewayServer

logger = logging.getLogger("gateway.server")


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
