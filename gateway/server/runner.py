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

import sys
from collections.abc import Callable

from uvicorn.config import STARTUP_FAILURE, Config

from gateway.server.server import (
    CUT_WAIT_SECONDS,
    KILL_MARGIN_SECONDS,
    REPEAT_WINDOW_SECONDS,
    STOP_SIGNALS,
    Drainable,
    GatewayServer,
    find_drainable,
)
from gateway.server.supervisor import (
    FIRST_RESTART_DELAY,
    MAX_RESTART_DELAY,
    GatewayWorker,
    Supervisor,
    WorkerSlot,
    restart_delay,
)

__all__ = [
    "CUT_WAIT_SECONDS",
    "FIRST_RESTART_DELAY",
    "KILL_MARGIN_SECONDS",
    "MAX_RESTART_DELAY",
    "REPEAT_WINDOW_SECONDS",
    "STOP_SIGNALS",
    "Drainable",
    "GatewayServer",
    "GatewayWorker",
    "Supervisor",
    "WorkerSlot",
    "find_drainable",
    "restart_delay",
    "run",
]


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
