"""Talk to a server below HTTP: raw bytes in, whatever comes back, with timings.

The attacks the gateway must survive (huge heads, trickled bodies, idle sockets) cannot be sent
by an HTTP client library, which would refuse to build them; these helpers write bytes as given.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from dataclasses import dataclass

import orjson


@dataclass(frozen=True)
class RawResponse:
    """What a server sent before it closed (or before the read timed out)."""

    data: bytes
    closed: bool  # the server closed the connection (EOF or reset)
    seconds: float  # from the first byte sent to the end of the read

    @property
    def status(self) -> int:
        return int(self.data.split(b" ", 2)[1]) if self.data.startswith(b"HTTP/1.1 ") else 0

    @property
    def headers(self) -> dict[str, str]:
        head = self.data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
        return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head)}

    @property
    def body(self) -> bytes:
        return self.data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in self.data else b""

    def error(self) -> dict[str, object]:
        """The OpenAI-shaped error object of the body (fails the test if it is not one)."""
        document = orjson.loads(self.body)
        assert isinstance(document, dict), document
        error = document["error"]
        assert isinstance(error, dict), document
        assert set(error) == {"message", "type", "param", "code"}, error
        return error


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_all(sock: socket.socket, timeout: float = 5.0, limit: int = 1 << 20) -> tuple[bytes, bool]:
    """Read until EOF, a reset, ``limit`` bytes or ``timeout`` seconds of silence."""
    sock.settimeout(timeout)
    data = b""
    try:
        while len(data) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                return data, True
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        return data, True
    except TimeoutError:
        return data, False
    return data, False


def exchange(port: int, data: bytes, timeout: float = 5.0) -> RawResponse:
    """Send ``data`` at once, then read what comes back until the server closes."""
    started = time.monotonic()
    with connect(port, timeout) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(data)
        received, closed = read_all(sock, timeout)
    return RawResponse(received, closed, time.monotonic() - started)


def is_closed(sock: socket.socket, wait: float = 0.0) -> bool:
    """Whether the peer has closed ``sock`` (EOF or reset) within ``wait`` seconds."""
    sock.settimeout(wait if wait > 0 else 0.001)
    try:
        return sock.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (TimeoutError, BlockingIOError):
        return False


def readable(sock: socket.socket) -> bool:
    """Whether the server has sent something (or closed) that is not read yet."""
    poller = select.poll()  # not select(): descriptors past 1024 are fine
    poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(0))


def trickle(sock: socket.socket, data: bytes, interval: float, *, limit: float) -> float:
    """Send ``data`` a piece at a time until it is all sent, the server answers or closes, or
    ``limit`` seconds pass; returns the seconds it took. Nothing the server sent is read."""
    started = time.monotonic()
    try:
        for i in range(len(data)):
            if readable(sock) or time.monotonic() - started > limit:
                break
            sock.sendall(data[i : i + 1])
            time.sleep(interval)
    except (ConnectionResetError, BrokenPipeError):
        pass
    return time.monotonic() - started


def rss_kib(pid: int) -> int:
    """A process's resident memory, from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")
