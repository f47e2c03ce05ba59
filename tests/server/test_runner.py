"""Serving: signals and shutdown of one process and of a supervisor with workers."""

from __future__ import annotations

import concurrent.futures
import signal
import socket
import threading
import time

import httpx
import pytest

from tests.conftest import DEMO_KEY, UPSTREAM_KEY, gateway_config
from tests.fakeupstream import FakeUpstream
from tests.gatewayproc import GatewayProcess

ENV = {"TEST_UPSTREAM_KEY": UPSTREAM_KEY}
AUTH = {"authorization": f"Bearer {DEMO_KEY}"}
CHAT = {"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}]}
NEW_ROUTE = (
    "  - {name: added, path: /v1/added, methods: [GET], upstream: fake, upstream_path: /models}\n"
)


def no_polling(config: str) -> str:
    """Reload only on SIGHUP, so a test knows what caused it."""
    return config.replace("server:\n", "server:\n  reload_interval: 0\n", 1)


def with_route(config: str) -> str:
    return config.replace("routes:\n", "routes:\n" + NEW_ROUTE, 1)


def worker_pids(gateway: GatewayProcess, tries: int = 40) -> set[int]:
    """The pids of the workers answering, over fresh connections."""
    pids = set()
    for _ in range(tries):
        with httpx.Client() as client:
            pids.add(client.get(gateway.url + "/readyz", timeout=5).json()["pid"])
    return pids


def test_sighup_reloads_every_worker_in_place_without_dropping_a_request(
    upstream: FakeUpstream,
) -> None:
    config = no_polling(gateway_config(upstream.base_url))
    with GatewayProcess(config, env=ENV, args=("--workers", "2")) as gateway:
        before = worker_pids(gateway)
        assert len(before) == 2
        stop = threading.Event()
        failures: list[str] = []

        def keep_alive_load() -> int:
            served = 0
            with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=5) as client:
                while not stop.is_set():
                    try:
                        response = client.post("/v1/chat/completions", json=CHAT)
                        if response.status_code != 200:
                            failures.append(str(response.status_code))
                        served += 1
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
            return served

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            loads = [pool.submit(keep_alive_load) for _ in range(4)]
            time.sleep(0.3)
            gateway.config_path.write_text(with_route(config))
            gateway.signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                codes = {
                    httpx.get(gateway.url + "/v1/added", headers=AUTH).status_code
                    for _ in range(10)
                }
                if codes == {200}:
                    break
                time.sleep(0.1)
            time.sleep(0.3)
            stop.set()
            served = sum(load.result() for load in loads)
        assert codes == {200}, "not every worker reloaded"
        assert failures == []
        assert served > 50
        assert worker_pids(gateway) == before  # reloaded in place, not restarted
        logs = gateway.logs()
        assert "Traceback" not in logs


def test_sighup_with_a_broken_file_keeps_every_worker_serving(upstream: FakeUpstream) -> None:
    config = no_polling(gateway_config(upstream.base_url))
    with GatewayProcess(config, env=ENV, args=("--workers", "2")) as gateway:
        before = worker_pids(gateway)
        gateway.config_path.write_text(config + "\nroutes: [broken\n")
        gateway.signal(signal.SIGHUP)
        time.sleep(1.5)
        assert worker_pids(gateway) == before
        response = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=AUTH)
        assert response.status_code == 200
        logs = gateway.logs()
        assert "Traceback" not in logs
        assert logs.count("config reload refused") == 2  # once per worker


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_refuses_new_connections_at_once_and_drains_open_streams(
    upstream: FakeUpstream, workers: str
) -> None:
    config = gateway_config(upstream.base_url)
    with GatewayProcess(config, env=ENV, args=("--workers", workers)) as gateway:
        worker_pids(gateway)  # every worker is up
        result: dict[str, object] = {}

        def stream() -> None:
            body = {**CHAT, "stream": True}
            headers = {**AUTH, "x-fake-chunks": "8", "x-fake-interval-ms": "150"}
            with httpx.stream(
                "POST", gateway.url + "/v1/chat/completions", json=body, headers=headers
            ) as response:
                result["data"] = b"".join(response.iter_raw())

        streamer = threading.Thread(target=stream)
        streamer.start()
        time.sleep(0.4)
        gateway.signal(signal.SIGTERM)
        started = time.monotonic()
        refused_after = None
        while time.monotonic() - started < 2:
            try:
                with socket.create_connection(("127.0.0.1", gateway.port), timeout=0.5) as sock:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
                    sock.settimeout(0.5)
                    sock.recv(100)
            except (ConnectionRefusedError, ConnectionResetError):
                refused_after = time.monotonic() - started
                break
            except TimeoutError:
                pytest.fail("a connection was accepted during the drain and never served")
            time.sleep(0.02)
        streamer.join(10)
        assert refused_after is not None
        assert refused_after < 0.6
        data = result["data"]
        assert isinstance(data, bytes)
        assert data.rstrip().endswith(b"data: [DONE]")


def test_streams_cut_by_the_grace_period_log_one_warning(upstream: FakeUpstream) -> None:
    config = gateway_config(upstream.base_url)
    with GatewayProcess(config, env=ENV, args=("--graceful-timeout", "0.5")) as gateway:
        outcomes: list[str] = []

        def stream() -> None:
            body = {**CHAT, "stream": True}
            headers = {**AUTH, "x-fake-chunks": "50", "x-fake-interval-ms": "200"}
            try:
                with httpx.stream(
                    "POST", gateway.url + "/v1/chat/completions", json=body, headers=headers
                ) as response:
                    for _ in response.iter_raw():
                        pass
                outcomes.append("complete")
            except httpx.HTTPError:
                outcomes.append("cut")

        streams = [threading.Thread(target=stream) for _ in range(3)]
        for thread in streams:
            thread.start()
        time.sleep(0.5)
        gateway.signal(signal.SIGTERM)
        for thread in streams:
            thread.join(10)
        gateway.wait(10)
        assert outcomes == ["cut"] * 3
        logs = gateway.logs()
        assert logs.count("grace period over: cutting 3 open connection(s)") == 1
        assert "Traceback" not in logs
        assert " ERROR " not in logs
