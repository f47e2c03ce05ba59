"""Run a real ``gateway serve`` process for a test: free port, own config file, captured logs."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Self

import httpx

from tests.support.ports import free_port


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    """Terminate a child politely, then for good after 10 s."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class ChildProcess:
    """A server as a child process on a free port, with a temporary directory of its own; ready
    once ``ready_url`` answers 200. ``with`` starts it and always stops and cleans it up."""

    name = "child"
    ready_path = "/"

    def __init__(self, port: int | None = None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix=f"{self.name}-test-")
        self.dir = Path(self._dir.name)
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def logs(self) -> str:
        raise NotImplementedError

    def launch(self) -> subprocess.Popen[bytes]:
        """Start the child (its output going to a file in ``self.dir``)."""
        raise NotImplementedError

    def start(self) -> Self:
        try:
            self._process = self.launch()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + 20
        status = None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self._process.returncode}:\n{self.logs()}")
            try:
                status = httpx.get(self.url + self.ready_path, timeout=1).status_code
                if status == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(
            f"{self.name}: GET {self.ready_path} did not answer 200 (last: {status}):\n"
            + self.logs()
        )

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the child (the supervisor, with workers)."""
        assert self._process is not None
        self._process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for the child to exit by itself; its exit code."""
        assert self._process is not None
        return self._process.wait(timeout)

    def stop(self) -> None:
        process, self._process = self._process, None
        stop_process(process)
        self._dir.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class GatewayProcess(ChildProcess):
    """``gateway serve --config <yaml>`` on a free port until the context exits."""

    name = "gateway"
    ready_path = "/readyz"

    def __init__(
        self,
        config_yaml: str,
        *,
        env: Mapping[str, str] | None = None,
        args: tuple[str, ...] = (),
        port: int | None = None,
    ) -> None:
        super().__init__(port)
        self.config_path = self.dir / "gateway.yaml"
        self.config_path.write_text(config_yaml)
        self.log_path = self.dir / "gateway.log"
        self._env = {**os.environ, **(env or {})}
        self._args = args
        # Tests stop their gateways at once, unless they set the drain themselves.
        drain_set = "--drain-delay" in args or "drain_delay" in config_yaml
        self._drain_flags: tuple[str, ...] = () if drain_set else ("--drain-delay", "0")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def launch(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("wb") as log:
            return subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "serve",
                    "--config",
                    str(self.config_path),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    *self._drain_flags,
                    *self._args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env,
            )
