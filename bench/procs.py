"""The benchmark's server processes: start on a free port pinned to one CPU, wait until they
answer, read their CPU time and memory from /proc, and always stop them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


class ServerFailed(RuntimeError):
    """A server exited or never answered; the message carries the end of its output."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def die_with_parent() -> None:
    # Runs in the child between fork and exec: if the benchmark is killed outright (SIGKILL),
    # the kernel still stops its servers, so no stray process outlives a run.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(frozen=True)
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    cpu: int
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def cpu_seconds(self) -> float:
        """User + system CPU time so far (10 ms resolution)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

    def memory_mb(self) -> dict[str, float]:
        """VmRSS (now) and VmHWM (peak since start or since ``reset_peak``), in MB."""
        values: dict[str, float] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) / 1024  # kB -> MB
        return values

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (Linux clear_refs 5); False if the kernel refuses."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def output_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise ServerFailed(
                f"{self.name} exited with code {code}; its output ends:\n{self.output_tail()}"
            )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def running(
    name: str,
    argv: Sequence[str],
    *,
    cpu: int,
    port: int,
    log: Path,
    ready: Callable[[Server], bool],
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> Iterator[Server]:
    """Run ``argv`` pinned to ``cpu`` (taskset, so every thread is pinned), output to ``log``;
    yield once ``ready`` returns True; stop it on the way out, whatever happened."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            ["taskset", "-c", str(cpu), *argv],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=None if env is None else dict(env),
            # Its own session: Ctrl-C reaches only the benchmark, which then stops it in order.
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    server = Server(name, process, port, cpu, log)
    try:
        deadline = time.monotonic() + timeout
        while not ready(server):
            server.check_alive()
            if time.monotonic() > deadline:
                raise ServerFailed(
                    f"{name} did not answer within {timeout:.0f} s; its output ends:\n"
                    f"{server.output_tail()}"
                )
            time.sleep(0.1)
        yield server
    finally:
        _stop(process)


def _own_cpu_seconds() -> float:
    """CPU time of this process (the aiohttp client) and its reaped children (wrk runs)."""
    me, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def busy_seconds() -> dict[int, float]:
    """Per CPU: busy (not idle, not iowait) seconds so far, from /proc/stat."""
    busy: dict[int, float] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(v) for v in values[:8]]
            busy[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4]) / _CLOCK_TICKS
    return busy


class CpuMeter:
    """CPU use between ``start`` and ``stop``, in percent of one core: each named server's, the
    client's (this process and its wrk runs, on ``client_cpu``), and per CPU ``otherN``: busy
    time on CPU N that none of them accounts for (kernel networking, other processes)."""

    def __init__(self, servers: Mapping[str, Server], client_cpu: int) -> None:
        self.servers = dict(servers)
        self.client_cpu = client_cpu
        self._start: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        now = {name: server.cpu_seconds() for name, server in self.servers.items()}
        now["client"] = _own_cpu_seconds()
        now.update({f"busy{cpu}": seconds for cpu, seconds in busy_seconds().items()})
        return now | {"wall": time.monotonic()}

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> dict[str, float]:
        now = self._now()
        wall = now["wall"] - self._start["wall"]
        used = {name: (now[name] - self._start[name]) / wall for name in now if name != "wall"}
        placed = dict.fromkeys(busy_seconds(), 0.0)
        for name, server in self.servers.items():
            placed[server.cpu] += used[name]
        placed[self.client_cpu] += used["client"]
        for cpu, known in placed.items():
            used[f"other{cpu}"] = max(0.0, used.pop(f"busy{cpu}") - known)
        return {f"{name}_cpu_pct": round(100 * value, 1) for name, value in used.items()}
