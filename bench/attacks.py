"""What hostile clients cost the gateway: time, memory and open connections (not a test).

How to run (from the repository root, the gateway installed)::

    python bench/attacks.py                 # the gateway in this checkout
    python bench/attacks.py --source DIR    # the gateway in another checkout (e.g. a worktree
                                            # of an older commit), for a before/after

It starts ``gateway serve`` on the example config (loopback, a free port; no upstream is
contacted) and measures, one after another:

1. **A 64 MB header**: the seconds until the gateway answers or closes, its peak RSS growth
   (VmHWM) and the slowest ``/healthz`` while it happens.
2. **2,000 idle connections**: how many are still open 30 s after they connected.
3. **20 uploads just under 32 MiB at once** (the default body cap), sent slowly: peak RSS growth.

Everything stays on 127.0.0.1 and every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak(pid: int) -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    with open(f"/proc/{pid}/clear_refs", "w") as refs:
        refs.write("5")


def healthz_ms(port: int) -> float:
    started = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as response:
        response.read()
    return (time.monotonic() - started) * 1000


class Prober(threading.Thread):
    """Asks /healthz every 50 ms and keeps the slowest answer."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.worst = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                self.worst = max(self.worst, healthz_ms(self.port))
            time.sleep(0.05)


def start_gateway(source: Path, port: int) -> subprocess.Popen[bytes]:
    # The upstream is a closed port on loopback: nothing leaves the machine (uploads get 502).
    env = {
        **os.environ,
        "OPENAI_API_KEY": "sk-bench-unused",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
        "PYTHONPATH": str(source),
    }
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "gateway", "serve", "--config", "config/gateway.yaml"),
            *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
        ],
        cwd=source,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            healthz_ms(port)
            return process
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("the gateway did not start")


def huge_header(port: int, pid: int, size: int = 64 * 1024 * 1024) -> None:
    reset_peak(pid)
    before = status_kib(pid, "VmRSS")
    prober = Prober(port)
    prober.start()
    started = time.monotonic()
    sent = 0
    piece = b"a" * 65536
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Huge: ")
            while sent < size:
                sock.sendall(piece)
                sent += len(piece)
            sock.sendall(b"\r\n\r\n")
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sock.settimeout(120)
            answer = sock.recv(200)
    elapsed = time.monotonic() - started
    time.sleep(0.2)
    prober.stop.set()
    prober.join()
    peak = status_kib(pid, "VmHWM")
    status = answer.split(b"\r\n", 1)[0].decode(errors="replace") or "(closed, no answer)"
    print(f"64 MB header: {status}; {elapsed:.2f} s; {sent / 1048576:.1f} MiB sent before the ")
    print(f"  gateway stopped reading; peak RSS +{(peak - before) / 1024:.1f} MiB; slowest ")
    print(f"  /healthz meanwhile {prober.worst:.0f} ms")


def idle_connections(port: int, count: int = 2000, wait: float = 30.0) -> None:
    socks = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(wait)
        open_ = 0
        for sock in socks:
            sock.setblocking(False)
            try:
                if sock.recv(1) != b"":
                    open_ += 1
            except BlockingIOError:
                open_ += 1  # nothing to read and not closed
            except OSError:
                pass  # reset: closed
        print(f"{count} idle connections: {open_} still open after {wait:.0f} s")
    finally:
        for sock in socks:
            sock.close()


def big_uploads(port: int, pid: int, count: int = 20, size: int = 32 * 1024 * 1024 - 4096) -> None:
    reset_peak(pid)
    before = status_kib(pid, "VmRSS")
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sk-gw-demo\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % size
    )
    prefix = b'{"model": "gpt-4o-mini", "messages": []'
    body = prefix + b" " * (size - len(prefix) - 1) + b"}"
    answers: list[bytes] = []

    def upload() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            try:
                sock.sendall(head)
                view = memoryview(body)
                for start in range(0, size, 1 << 20):
                    sock.sendall(view[start : start + (1 << 20)])
                answers.append(sock.recv(100).split(b"\r\n", 1)[0])
            except OSError as exc:
                answers.append(repr(exc).encode())

    threads = [threading.Thread(target=upload) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    peak = status_kib(pid, "VmHWM")
    statuses: dict[str, int] = {}
    for answer in answers:
        key = answer.decode(errors="replace")[:40]
        statuses[key] = statuses.get(key, 0) + 1
    print(f"{count} uploads of {size / 1048576:.1f} MiB at once: peak RSS +")
    print(f"  {(peak - before) / 1024:.0f} MiB; answers {statuses}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=ROOT, help="checkout to run")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    port = free_port()
    process = start_gateway(args.source.resolve(), port)
    try:
        idle = status_kib(process.pid, "VmRSS") / 1024
        print(f"gateway from {args.source}, idle RSS {idle:.0f} MiB")
        huge_header(port, process.pid)
        idle_connections(port)
        big_uploads(port, process.pid)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


if __name__ == "__main__":
    main()
