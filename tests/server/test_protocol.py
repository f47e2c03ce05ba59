"""The connection protocol against a real ``gateway serve`` process, driven over raw sockets.

Each test is an attack a public server meets: heads too large, targets it may not hold,
clients that stall, upgrades it does not speak, more connections than it can hold. The answer
is always an OpenAI-shaped 4xx (or 503), at once, or a clean close where HTTP has no room for one.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import DEMO_KEY, UPSTREAM_KEY, gateway_config
from tests.support.admin import admin_get
from tests.support.fakeupstream import FakeUpstream
from tests.support.gatewayproc import GatewayProcess
from tests.support.rawhttp import connect, exchange, is_closed, read_all, rss_kib, trickle

CONNECTIONS = """  connections:
    max_open: 60
    header_timeout: 1
    keep_alive_timeout: 2
    body_idle_timeout: 1
    body_timeout: 1.5
    body_min_rate: 1000
    write_stall_timeout: 1
"""


def with_connections(config: str, settings: str = CONNECTIONS) -> str:
    return config.replace("server:\n", "server:\n" + settings, 1)


@pytest.fixture(scope="module")
def guarded(upstream: FakeUpstream) -> Iterator[GatewayProcess]:
    # No drain delay: these tests are not about shutdown, which would take 5 s more.
    config = with_connections(gateway_config(upstream.base_url), "  drain_delay: 0\n" + CONNECTIONS)
    with GatewayProcess(config, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as process:
        yield process


def healthz_ms(gateway: GatewayProcess) -> float:
    started = time.monotonic()
    assert httpx.get(gateway.url + "/healthz", timeout=5).status_code == 200
    return (time.monotonic() - started) * 1000


CHAT = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
    + DEMO_KEY.encode()
    + b"\r\nContent-Type: application/json\r\n"
)
CHAT_BODY = b'{"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}]}'
STREAM_BODY = (
    b'{"model": "gpt-fake", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
)


# Size caps on the request head


def test_header_field_over_the_line_cap_gets_431_in_openai_shape(guarded: GatewayProcess) -> None:
    response = exchange(
        guarded.port, b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
    )
    assert response.status == 431
    assert response.headers["content-type"] == "application/json"
    assert response.error()["code"] == "request_header_too_large"
    assert response.closed


def test_too_many_header_fields_get_431(guarded: GatewayProcess) -> None:
    fields = b"".join(b"X-F%d: 1\r\n" % i for i in range(150))
    response = exchange(guarded.port, b"GET /healthz HTTP/1.1\r\n" + fields + b"\r\n")
    assert response.status == 431
    assert "more than 100 fields" in str(response.error()["message"])


def test_head_over_the_total_cap_gets_431(guarded: GatewayProcess) -> None:
    fields = b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 8000) for i in range(9))
    response = exchange(guarded.port, b"GET /healthz HTTP/1.1\r\n" + fields + b"\r\n")
    assert response.status == 431
    assert "bytes in all" in str(response.error()["message"])


def test_request_target_over_the_cap_gets_414(guarded: GatewayProcess) -> None:
    response = exchange(guarded.port, b"GET /v1/" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")
    assert response.status == 414
    assert response.error()["code"] == "uri_too_long"


def test_head_within_the_caps_is_served(guarded: GatewayProcess) -> None:
    fields = b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 7000) for i in range(8))
    response = exchange(
        guarded.port,
        b"GET /healthz HTTP/1.1\r\nConnection: close\r\n" + fields + b"\r\n",
    )
    assert response.status == 200


def test_a_64_mb_header_is_refused_within_milliseconds_without_memory_growth(
    guarded: GatewayProcess,
) -> None:
    """Before the caps, a 64 MB header took 5.7 s and +118 MB, and delayed /healthz by 2.5 s."""
    before = rss_kib(guarded.pid)
    started = time.monotonic()
    sent = 0
    piece = b"a" * 65536
    with connect(guarded.port) as sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Huge: ")
            while sent < 64 * 1024 * 1024:
                sock.sendall(piece)
                sent += len(piece)
        except (ConnectionResetError, BrokenPipeError):
            pass
        data, _ = read_all(sock, timeout=2)
    elapsed = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 431 "), data[:100]
    # The server stopped reading long before 64 MB: the send failed once it closed.
    assert sent < 8 * 1024 * 1024
    assert elapsed < 3.0
    assert rss_kib(guarded.pid) - before < 10 * 1024
    # Before the caps /healthz waited 2.5 s; the bound leaves room for a busy CI machine.
    assert healthz_ms(guarded) < 500


def test_pipelined_requests_are_all_served(guarded: GatewayProcess) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"
    with connect(guarded.port) as sock:
        sock.sendall(request * 9 + b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        data, closed = read_all(sock)
    assert data.count(b"HTTP/1.1 200 OK") == 10
    assert closed


def test_pipelining_beyond_the_cap_closes_the_connection_after_what_was_answered(
    guarded: GatewayProcess,
) -> None:
    """Each queued head holds memory until its turn: 8 MiB of pipelined requests once raised
    the gateway's memory by 571 MiB. Beyond 16 queued, the connection is closed."""
    request = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"
    before = rss_kib(guarded.pid)
    with connect(guarded.port) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(request * 5000)
        data, closed = read_all(sock)
    assert closed
    assert data.count(b"HTTP/1.1 200 OK") < 100
    assert b" 500 " not in data
    assert rss_kib(guarded.pid) - before < 20 * 1024


def test_trailer_fields_are_bounded_and_never_added_to_the_request(
    guarded: GatewayProcess, upstream: FakeUpstream
) -> None:
    upstream.clear()
    body = CHAT_BODY
    chunked = b"%x\r\n%s\r\n0\r\nX-Injected: after-auth\r\n\r\n" % (len(body), body)
    response = exchange(
        guarded.port,
        CHAT + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked,
    )
    assert response.status == 200
    assert upstream.last().header("x-injected") is None

    started = time.monotonic()
    with connect(guarded.port) as sock:
        try:
            sock.sendall(CHAT + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX-Huge: ")
            for _ in range(1024):  # up to 64 MiB of one trailer field
                sock.sendall(b"a" * 65536)
        except (ConnectionResetError, BrokenPipeError):
            pass
        data, closed = read_all(sock, timeout=2)
    assert closed
    assert data.startswith(b"HTTP/1.1 431 "), data[:100]
    assert time.monotonic() - started < 3


def test_a_stray_crlf_after_a_response_does_not_stop_the_keep_alive_timer(
    guarded: GatewayProcess,
) -> None:
    with connect(guarded.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        time.sleep(0.2)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"\r\n")
        assert is_closed(sock, wait=4)


def test_an_h2c_upgrade_with_a_body_is_refused_not_served_without_it(
    guarded: GatewayProcess,
) -> None:
    response = exchange(
        guarded.port,
        CHAT + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nContent-Length: %d\r\n\r\n%s"
        % (len(CHAT_BODY), CHAT_BODY),
    )
    assert response.status == 400
    assert response.error()["code"] == "malformed_request"


def test_a_refusal_is_never_written_into_another_response(guarded: GatewayProcess) -> None:
    """A stream is being answered when a pipelined request and then a head over the cap
    arrive: the connection is closed, and no 431 appears inside the stream's body."""
    stream = (
        CHAT
        + b"x-fake-chunks: 20\r\nx-fake-interval-ms: 50\r\nContent-Length: %d\r\n\r\n%s"
        % (len(STREAM_BODY), STREAM_BODY)
    )
    with connect(guarded.port) as sock:
        sock.sendall(stream)
        first = sock.recv(65536)  # the stream has begun
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\n\r\n"  # queued behind the stream
            + b"GET /healthz HTTP/1.1\r\nX-Big: "
            + b"a" * 9000
            + b"\r\n\r\n"
        )
        rest, closed = read_all(sock)
        data = first + rest
    assert closed
    assert data.count(b"HTTP/1.1 ") == 1
    assert b"HTTP/1.1 200 " in data[:20]


def test_a_client_that_stops_reading_is_dropped_after_the_write_stall_timeout(
    guarded: GatewayProcess,
) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=5) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        body = b'{"model": "gpt-fake", "messages": []}'
        sock.sendall(
            CHAT.replace(b"Content-Type", b"x-fake-bytes: 30000000\r\nContent-Type")
            + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        time.sleep(3.5)  # never read: the gateway's buffer fills, then it gives up
        sock.settimeout(5)
        received = 0
        try:
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
    assert received < 30_000_000


# Malformed requests: OpenAI's shape, never text/plain, never a 500


@pytest.mark.parametrize(
    ("name", "request_bytes"),
    [
        ("bad chunk size", CHAT + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"),
        ("NUL in the target", b"GET /v1/mo\x00dels HTTP/1.1\r\n\r\n"),
        ("raw non-ASCII in the target", b"GET /v1/mod\xc3\xa9ls HTTP/1.1\r\n\r\n"),
        ("space in a header name", b"GET /healthz HTTP/1.1\r\nBad Name: x\r\n\r\n"),
        (
            "Content-Length and Transfer-Encoding",
            CHAT + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        ("two Content-Lengths", CHAT + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"),
        ("not HTTP at all", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40),
    ],
)
def test_malformed_request_gets_openai_shaped_400(
    guarded: GatewayProcess, name: str, request_bytes: bytes
) -> None:
    response = exchange(guarded.port, request_bytes)
    assert response.status == 400, (name, response.data[:200])
    assert response.headers["content-type"] == "application/json"
    assert response.error()["code"] == "malformed_request"
    assert response.closed
    assert "Traceback" not in guarded.logs()


def test_websocket_upgrade_gets_openai_shaped_400(guarded: GatewayProcess) -> None:
    response = exchange(
        guarded.port,
        b"GET /v1/realtime HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    assert response.status == 400
    assert response.error()["code"] == "upgrade_not_supported"
    assert "ERROR" not in guarded.logs()


def test_h2c_upgrade_is_served_as_http1_and_the_connection_closed(
    guarded: GatewayProcess,
) -> None:
    response = exchange(
        guarded.port,
        b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
    )
    assert response.status == 200
    assert response.closed


# Slow and idle clients


def test_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    guarded: GatewayProcess,
) -> None:
    socks = [connect(guarded.port) for _ in range(40)]
    try:
        time.sleep(1.6)
        assert all(is_closed(sock, wait=0.5) for sock in socks)
    finally:
        for sock in socks:
            sock.close()


def test_half_sent_head_gets_408_after_the_header_timeout(guarded: GatewayProcess) -> None:
    with connect(guarded.port) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Slow: ")
        data, closed = read_all(sock, timeout=5)
    assert data.startswith(b"HTTP/1.1 408 "), data[:100]
    assert closed
    assert 0.9 < time.monotonic() - started < 3


def test_head_dribbled_a_byte_at_a_time_gets_408(guarded: GatewayProcess) -> None:
    """Each byte arrives well within any idle bound; the head as a whole does not."""
    with connect(guarded.port) as sock:
        head = b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 100
        elapsed = trickle(sock, head, 0.05, limit=5)
        data, closed = read_all(sock, timeout=2)
    assert data.startswith(b"HTTP/1.1 408 "), data[:100]
    assert closed
    assert elapsed < 2


def test_second_head_on_a_kept_alive_connection_that_stalls_gets_408(
    guarded: GatewayProcess,
) -> None:
    with connect(guarded.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        time.sleep(0.2)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Stall: ")
        data, closed = read_all(sock, timeout=5)
    assert data.startswith(b"HTTP/1.1 408 "), data[:100]
    assert closed
    assert time.monotonic() - started < 2


def test_slow_body_after_an_early_answer_is_closed_without_a_second_response(
    guarded: GatewayProcess,
) -> None:
    """The gateway answers 401 before reading the body; the body then stalls. The connection
    is closed, and the client never sees a 408 after its 401."""
    with connect(guarded.port) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        )
        data, closed = read_all(sock, timeout=5)
    assert data.startswith(b"HTTP/1.1 401 "), data[:100]
    assert data.count(b"HTTP/1.1 ") == 1
    assert closed


def test_idle_kept_alive_connection_is_closed_after_the_keep_alive_timeout(
    guarded: GatewayProcess,
) -> None:
    with connect(guarded.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        time.sleep(0.3)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        # Longer than the header timeout (1 s), shorter than keep-alive (2 s): still open.
        time.sleep(1.3)
        assert not is_closed(sock)
        assert is_closed(sock, wait=2)


def test_body_trickled_below_the_minimum_rate_gets_408(guarded: GatewayProcess) -> None:
    """A byte every 0.2 s never trips the idle timeout (1 s), but the whole body is far below
    the minimum rate: it is cut when its deadline (1.5 s plus 1 s per 1000 bytes) passes."""
    with connect(guarded.port) as sock:
        sock.sendall(CHAT + b"Content-Length: 60000\r\n\r\n{")
        elapsed = trickle(sock, b" " * 100, 0.2, limit=8)
        data, closed = read_all(sock, timeout=2)
    assert data.startswith(b"HTTP/1.1 408 "), data[:100]
    assert b'"code":"request_timeout"' in data
    assert closed
    assert 1.4 < elapsed < 3.5, elapsed


def test_silent_body_gets_408_after_the_idle_timeout(guarded: GatewayProcess) -> None:
    with connect(guarded.port) as sock:
        started = time.monotonic()
        sock.sendall(CHAT + b"Content-Length: 100\r\n\r\n{")
        data, closed = read_all(sock, timeout=5)
    assert data.startswith(b"HTTP/1.1 408 "), data[:100]
    assert b'"code":"request_timeout"' in data
    assert closed
    assert time.monotonic() - started < 3


def test_body_sent_at_a_steady_rate_is_not_cut(guarded: GatewayProcess) -> None:
    """A body slower than its first deadline but above the minimum rate completes."""
    body = CHAT_BODY + b" " * 3000
    with connect(guarded.port) as sock:
        sock.sendall(CHAT + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        for start in range(0, len(body), 500):
            sock.sendall(body[start : start + 500])
            time.sleep(0.3)
        data, _ = read_all(sock, timeout=5)
    assert data.startswith(b"HTTP/1.1 200 "), data[:200]


# Open connections


def test_connections_beyond_max_open_get_503_at_once(guarded: GatewayProcess) -> None:
    held: list[socket.socket] = []
    try:
        for _ in range(60):
            held.append(connect(guarded.port))
        time.sleep(0.2)
        started = time.monotonic()
        response = exchange(guarded.port, b"GET /healthz HTTP/1.1\r\n\r\n", timeout=2)
        assert response.status == 503
        assert response.error()["code"] == "too_many_connections"
        assert response.headers["retry-after"] == "1"
        assert time.monotonic() - started < 0.5
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert httpx.get(guarded.url + "/healthz", timeout=5).status_code == 200


def test_refusals_are_counted_in_the_health_detail(guarded: GatewayProcess) -> None:
    def counts() -> dict[str, int]:
        found: dict[str, int] = admin_get(guarded.url, "health")["connections"]
        return found

    before = counts()
    exchange(guarded.port, b"GET /v1/" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")
    exchange(guarded.port, b"GET /healthz HTTP/1.1\r\nBad Name: x\r\n\r\n")
    after = counts()
    assert after["uri_too_long"] == before["uri_too_long"] + 1
    assert after["malformed"] == before["malformed"] + 1
    assert set(after) >= {"opened", "refused_over_capacity", "head_too_large", "timeouts"}
