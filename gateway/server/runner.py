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

import uvicorn
from uvicorn.config import Config
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
            self._cut_open_connections()
        if not self.force_exit:
            await self.lifespan.shutdown()

    @property
    def _grace(self) -> float | None:
        return self.config.timeout_graceful_shutdown

    def _cut_open_connections(self) -> None:
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
        loop = asyncio.get_running_loop()
        loop.call_later(CUT_WAIT_SECONDS, self._cancel_remaining)

    def _cancel_remaining(self) -> None:
        for task in self.server_state.tasks:
            task.cancel(msg="gateway shutdown")


class GatewayWorker(Process):
    """A worker process running :class:`GatewayServer`."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = GatewayServer(config=self.config)
        return self._server


class Supervisor(Multiprocess):
    """uvicorn's supervisor with the gateway's workers and signal handling."""

    def init_processes(self) -> None:
        for _ in range(self.processes_num):
            self.processes.append(self._start_worker())

    def _start_worker(self) -> GatewayWorker:
        worker = GatewayWorker(self.config, self.sockets)
        worker.start()
        return worker

    def keep_subprocess_alive(self) -> None:
        if self.should_exit.is_set():
            return
        for index, worker in enumerate(self.processes):
            if worker.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            worker.kill()
            worker.join()
            if self.should_exit.is_set():
                return
            logger.warning(
                "worker [%s] died (exit code %s); starting another", worker.pid, worker.exitcode
            )
            self.processes[index] = self._start_worker()

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
        Supervisor(config, sockets=[sock]).run()
        return
    GatewayServer(config).run()
