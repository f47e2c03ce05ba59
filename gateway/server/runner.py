"""Running the gateway: one process, or a supervisor and N workers, each shutting down gently.

Built on uvicorn's ``Server`` and its multiprocess supervisor, with two changes of behaviour:

- **Shutdown, in one process.** Once the grace period (``--graceful-timeout``) is over, uvicorn
  cancels every request still running, and each cancelled stream logs an ERROR with a
  traceback. Here the connections still open are cut instead (their clients see a cut stream,
  exactly as if the process had died), each request ends as a client disconnect, and one
  warning line says how many were cut.
- **Signals, with workers.** uvicorn's supervisor restarts every worker on SIGHUP (dropping
  requests on kept-alive connections, and aborting with a traceback when the new config is
  broken), and on SIGTERM keeps the listening socket open while the workers drain, so the
  kernel goes on accepting connections nobody will serve. Here SIGHUP is passed on to every
  worker, which reloads its config in place (gateway/reload.py), and SIGTERM/SIGINT close the
  supervisor's copy of the listening socket before the workers are told to stop, so new
  connections are refused as soon as the workers have closed theirs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

import uvicorn
from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.supervisors.multiprocess import Multiprocess, Process

logger = logging.getLogger("gateway.server")

# After cutting the connections the grace period left open, how long their requests get to
# notice before whatever remains is cancelled.
CUT_WAIT_SECONDS = 1.0


class GatewayServer(uvicorn.Server):
    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        logger.info("shutting down: no new connections; open requests get %ss", self._grace)
        for server in self.servers:
            server.close()  # new connections are refused from here on
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle ones close now, busy ones after their response
        await asyncio.sleep(0.1)
        try:
            async with asyncio.timeout(self._grace):
                await self._wait_tasks_to_complete()
        except TimeoutError:
            await self._cut_open_connections()
        if not self.force_exit:
            await self.lifespan.shutdown()

    @property
    def _grace(self) -> float | None:
        return self.config.timeout_graceful_shutdown

    async def _cut_open_connections(self) -> None:
        open_connections = list(self.server_state.connections)
        logger.warning(
            "grace period over: cutting %d open connection(s) and their requests",
            len(open_connections),
        )
        for connection in open_connections:
            transport = getattr(connection, "transport", None)
            if transport is not None:
                # abort(), not close(): a stream's unsent bytes are not waited for. The
                # request sees a client disconnect and ends without a traceback.
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

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = GatewayServer(config=self.config)
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

    def init_processes(self) -> None:
        self.slots: list[WorkerSlot] = []
        for _ in range(self.processes_num):
            self.processes.append(self._start_worker())
            self.slots.append(WorkerSlot(first_start=True))

    def _start_worker(self) -> GatewayWorker:
        worker = GatewayWorker(self.config, self.sockets)
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
        self._stop("SIGTERM")

    def handle_int(self) -> None:
        self._stop("SIGINT")

    def _stop(self, name: str) -> None:
        logger.info("%s: closing the listening socket, then draining the workers", name)
        for sock in self.sockets:
            sock.close()
        self.should_exit.set()

    def handle_ttin(self) -> None:
        self.processes_num += 1
        self.processes.append(self._start_worker())
        self.slots.append(WorkerSlot(first_start=False))

    def run(self) -> None:
        logger.info("supervisor [%d] starting %d workers", os.getpid(), self.processes_num)
        self.init_processes()
        # uvicorn polls every 0.5 s; a stop should close the socket sooner than that.
        while not self.should_exit.wait(0.1):
            self.handle_signals()
            self.keep_subprocess_alive()
        self.handle_signals()
        self.terminate_all()
        self.join_all()
        logger.info("supervisor [%d] stopped", os.getpid())


def run(config: Config) -> None:
    """Serve ``config``: in this process, or with ``config.workers`` worker processes."""
    if config.workers > 1:
        sock = config.bind_socket()
        supervisor = Supervisor(config, sockets=[sock])
        supervisor.run()
        if supervisor.startup_failed:
            sys.exit(STARTUP_FAILURE)
        return
    GatewayServer(config).run()
