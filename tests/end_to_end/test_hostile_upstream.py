"""What a hostile or careless upstream cannot do to the gateway or its clients, end to end.

A real ``gateway serve`` process sits in front of a raw server
(``tests/support/hostileupstream.py``) answering with bytes written here, which no well-behaved
upstream would send: a gzip bomb, errors that quote the credentials the gateway sent it. Every
key has token limits, so the gateway's usage tap reads every response.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import httpx
import orjson
import pytest

from tests.conftest import DEMO_KEY, UPSTREAM_KEY, gateway_config
from tests.support.gatewayproc import GatewayProcess
from tests.support.hostileupstream import (
    HostileRequest,
    HostileUpstream,
    gzip_bomb,
    http_head,
    http_response,
)
from tests.support.rawhttp import exchange

AUTH = {"authorization": f"Bearer {DEMO_KEY}"}
# A configured upstream header whose name says it carries a credential.
ORG_TOKEN = "org-token-for-the-upstream-42"
TOKEN_LIMITS = """
limits:
  default: {requests_per_minute: 100000, tokens_per_minute: 100000000}
"""
BOMB_SIZE = 2 << 30  # inflated: 2 GiB of zeros, about 2 MB on the wire
PLAIN_BODY = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[],"usage":null}'
# Larger than the part of an error body the gateway inspects (1 MiB).
LARGE_ERROR = b'{"error":{"message":"' + b"x" * (1536 * 1024) + b'"}}'


def encode(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.compress(body, mtime=0)
    if encoding == "deflate":
        return zlib.compress(body)  # HTTP's deflate is zlib-wrapped (RFC 9110 §8.4.1.2)
    return body


def careless_error(request: HostileRequest) -> bytes:
    """An OpenAI-shaped error quoting every credential the upstream received."""
    message = (
        f"Incorrect API key provided: {request.header('authorization')}; "
        f"organization token {request.header('x-org-token')}; "
        f"tenant {request.header('x-gateway-tenant')}"
    )
    return orjson.dumps({"error": {"message": message, "type": "invalid_request_error"}})


def echoed_headers(request: HostileRequest) -> list[tuple[str, str]]:
    credentials = request.header("authorization")
    return [
        ("www-authenticate", f'Bearer error="invalid_token", error_description="{credentials}"'),
        ("x-echo-org", f"got {request.header('x-org-token')}"),
    ]


class CarelessUpstream:
    """Answers ``/v1/<what>/<status>/<encoding>`` (``identity``, ``gzip`` or ``deflate``):

    - ``bomb``: a 2 MB gzip body that inflates to 2 GiB, in 64 KiB writes;
    - ``echo``: an error body and headers quoting the credentials received;
    - ``plain``: a body without credentials, with the quoting headers;
    - ``large``: an error body larger than the gateway inspects;
    - ``cut``: the head and part of an ``echo`` body, then the connection closes.
    """

    def __init__(self) -> None:
        self.bomb = gzip_bomb(BOMB_SIZE)

    def __call__(self, request: HostileRequest) -> Iterator[bytes]:
        what, status, encoding = [*request.target.split("/")[2:], "", ""][:3]
        code = int(status or 200)
        encoding = encoding or "identity"
        labels = [("content-type", "application/json")]
        if encoding != "identity":
            labels.append(("content-encoding", encoding))
        if what == "bomb":
            yield http_head(code, labels, len(self.bomb))
            for start in range(0, len(self.bomb), 64 * 1024):
                yield self.bomb[start : start + 64 * 1024]
        elif what == "echo":
            body = encode(careless_error(request), encoding)
            yield http_response(code, labels + echoed_headers(request), body)
        elif what == "plain":
            yield http_response(
                code, labels + echoed_headers(request), encode(PLAIN_BODY, encoding)
            )
        elif what == "large":
            yield http_response(code, labels, encode(LARGE_ERROR, encoding))
        elif what == "cut":
            body = careless_error(request)
            yield http_head(code, labels, len(body) + 1000) + body
        else:
            yield http_response(200, [("content-type", "application/json")], b"{}")

    @staticmethod
    def expected(what: str, encoding: str) -> bytes:
        """The body the upstream sends for ``plain`` or ``large``."""
        return encode({"plain": PLAIN_BODY, "large": LARGE_ERROR}[what], encoding)


@pytest.fixture(scope="module")
def careless() -> CarelessUpstream:
    return CarelessUpstream()


@pytest.fixture(scope="module")
def upstream(careless: CarelessUpstream) -> Iterator[HostileUpstream]:
    with HostileUpstream(careless) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(upstream: HostileUpstream) -> Iterator[GatewayProcess]:
    config = gateway_config(upstream.base_url, extra=TOKEN_LIMITS)
    configured = "headers: {x-gateway-tenant: tests}"
    assert configured in config, "tests/conftest.py no longer configures x-gateway-tenant"
    config = config.replace(
        configured, f"headers: {{x-gateway-tenant: tests, x-org-token: {ORG_TOKEN}}}", 1
    )
    with GatewayProcess(config, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as process:
        yield process


@dataclass(frozen=True)
class Relayed:
    """A response as the gateway sent it: the body still encoded."""

    status: int
    headers: httpx.Headers
    body: bytes

    def seen(self) -> bytes:
        """Everything a client can read: header values and the body."""
        return b"\n".join(value for _, value in self.headers.raw) + b"\n" + self.body


def raw_post(gateway: GatewayProcess, path: str, accept_encoding: str = "gzip, deflate") -> Relayed:
    with httpx.Client(timeout=30) as client:
        request = client.build_request(
            "POST",
            gateway.url + path,
            content=b'{"model":"gpt-fake","messages":[]}',
            headers={
                **AUTH,
                "content-type": "application/json",
                "accept-encoding": accept_encoding,
            },
        )
        response = client.send(request, stream=True)
        try:
            body = b"".join(response.iter_raw())
        finally:
            response.close()
    return Relayed(response.status_code, response.headers, body)


# -- A gzip bomb cannot stall or bloat the gateway ------------------------------------------------


def vm_kib(pid: int, field: str) -> int | None:
    """``VmRSS`` or ``VmHWM`` (the peak) of a process in KiB, where ``/proc`` exists."""
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


class HealthProbe:
    """Asks ``/healthz`` every 10 ms from a thread; keeps the slowest answer's time."""

    def __init__(self, url: str) -> None:
        self._url = url + "/healthz"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.slowest = 0.0
        self.answers = 0
        self.failures: list[str] = []

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    status = client.get(self._url).status_code
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                self.slowest = max(self.slowest, time.perf_counter() - started)
                self.answers += 1
                if status != 200:
                    self.failures.append(f"status {status}")
                self._stop.wait(0.01)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_a_gzip_bomb_is_relayed_exactly_while_healthz_stays_prompt_and_memory_flat(
    gateway: GatewayProcess, careless: CarelessUpstream
) -> None:
    for _ in range(20):  # the first requests allocate what every later request reuses
        raw_post(gateway, "/v1/warm")
    rss_before = vm_kib(gateway.pid, "VmRSS")
    with HealthProbe(gateway.url) as probe:
        time.sleep(0.05)
        response = raw_post(gateway, "/v1/bomb/200/gzip")
        time.sleep(0.05)
    peak = vm_kib(gateway.pid, "VmHWM")
    assert response.status == 200
    assert response.headers["content-encoding"] == "gzip"
    assert response.body == careless.bomb
    assert probe.failures == []
    assert probe.answers > 0
    # Before the bound /healthz stalled 3.8 s; 1 s leaves room for a busy CI machine.
    assert probe.slowest < 1.0, f"/healthz took {probe.slowest * 1000:.0f} ms during the bomb"
    if rss_before is not None and peak is not None:
        # Unbounded, the usage tap took the process from ~60 MiB to over 1 GiB.
        assert peak - rss_before < 128 * 1024, f"RSS {rss_before} KiB, then a peak of {peak} KiB"


# -- The upstream's credentials never reach a client ----------------------------------------------


def assert_no_credentials(response: Relayed) -> None:
    seen = response.seen()
    for secret in (UPSTREAM_KEY, ORG_TOKEN):
        assert secret.encode() not in seen
    assert b"Bearer ***" in seen


@pytest.mark.parametrize("encoding", ["identity", "gzip", "deflate"])
@pytest.mark.parametrize("status", [401, 500])
def test_upstream_key_echoed_in_error_headers_and_body_is_masked(
    gateway: GatewayProcess, status: int, encoding: str
) -> None:
    response = raw_post(gateway, f"/v1/echo/{status}/{encoding}")
    assert response.status == status
    assert_no_credentials(response)
    assert response.headers["www-authenticate"] == (
        'Bearer error="invalid_token", error_description="Bearer ***"'
    )
    assert response.headers["x-echo-org"] == "got ***"
    # The masked body goes out decoded, framed by its own length.
    assert "content-encoding" not in response.headers
    assert int(response.headers["content-length"]) == len(response.body)
    assert orjson.loads(response.body)["error"]["message"] == (
        "Incorrect API key provided: Bearer ***; organization token ***; tenant tests"
    )


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
def test_a_successful_body_is_relayed_byte_for_byte_while_its_headers_are_masked(
    gateway: GatewayProcess, careless: CarelessUpstream, encoding: str
) -> None:
    response = raw_post(gateway, f"/v1/plain/200/{encoding}")
    assert response.status == 200
    assert response.body == careless.expected("plain", encoding)
    assert response.headers.get("content-encoding") == (
        None if encoding == "identity" else encoding
    )
    assert_no_credentials(response)


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
def test_the_upstreams_content_length_is_kept_when_its_bytes_pass_unchanged(
    gateway: GatewayProcess, careless: CarelessUpstream, encoding: str
) -> None:
    response = raw_post(gateway, f"/v1/plain/200/{encoding}")
    assert response.status == 200
    assert response.headers["content-length"] == str(len(careless.expected("plain", encoding)))
    assert "transfer-encoding" not in response.headers


def test_a_body_cut_short_of_its_content_length_is_an_error_for_the_client(
    gateway: GatewayProcess,
) -> None:
    # The upstream declares 1,000 bytes more than it sends, then closes: a client talking to it
    # directly would raise, and so must a client of the gateway.
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(gateway.url + "/v1/cut/200", json={"model": "gpt-fake"}, headers=AUTH)


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
def test_an_error_body_without_credentials_is_relayed_unchanged_still_encoded(
    gateway: GatewayProcess, careless: CarelessUpstream, encoding: str
) -> None:
    response = raw_post(gateway, f"/v1/plain/401/{encoding}")
    assert response.status == 401
    assert response.body == careless.expected("plain", encoding)
    assert response.headers.get("content-encoding") == (
        None if encoding == "identity" else encoding
    )


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
def test_an_error_body_larger_than_the_inspected_size_is_relayed_unchanged(
    gateway: GatewayProcess, careless: CarelessUpstream, encoding: str
) -> None:
    response = raw_post(gateway, f"/v1/large/400/{encoding}")
    assert response.status == 400
    assert response.body == careless.expected("large", encoding)


def test_an_error_body_cut_by_the_upstream_is_cut_for_the_client_without_its_bytes(
    gateway: GatewayProcess,
) -> None:
    # Raw bytes: an HTTP client would raise on the cut and hide what did arrive.
    response = exchange(
        gateway.port,
        f"POST /v1/cut/401 HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {DEMO_KEY}\r\n"
        "content-type: application/json\r\ncontent-length: 2\r\n\r\n{}".encode(),
        timeout=10,
    )
    assert response.status == 401
    assert response.closed
    assert UPSTREAM_KEY.encode() not in response.data
    assert not response.body.endswith(b"0\r\n\r\n"), "a cut body must not end as if complete"


def test_the_upstream_is_asked_only_for_encodings_the_gateway_can_inspect(
    gateway: GatewayProcess, upstream: HostileUpstream
) -> None:
    raw_post(gateway, "/v1/plain/200/identity", accept_encoding="br;q=1, zstd, gzip;q=0.8")
    assert upstream.requests[-1].header("accept-encoding") == "gzip;q=0.8"
    raw_post(gateway, "/v1/plain/200/identity", accept_encoding="br, zstd")
    assert upstream.requests[-1].header("accept-encoding") == "identity"
