"""Operating a real gateway process: metrics across workers, the admin API's reach, and what
neither the admin API nor the logs may ever show."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth import hash_key
from tests.conftest import DEMO_KEY, NARROW_KEY, UPSTREAM_KEY, gateway_config
from tests.support.admin import ADMIN_HEADERS, ADMIN_KEY, admin_get
from tests.support.fakeupstream import FakeUpstream, standard_chat_request
from tests.support.gatewayproc import GatewayProcess

AUTH = {"authorization": f"Bearer {DEMO_KEY}"}
ADMIN_ENDPOINTS = ("config", "routes", "keys", "upstreams", "errors", "health", "status")


def requests_total(text: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_requests_total" and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total


@pytest.fixture(scope="module")
def two_workers(upstream: FakeUpstream) -> Iterator[GatewayProcess]:
    config = gateway_config(upstream.base_url).replace(
        "server:\n", "server:\n  drain_delay: 0\n", 1
    )
    process = GatewayProcess(
        config, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY}, args=("--workers", "2")
    )
    with process:
        yield process


def served_by(process: GatewayProcess, count: int) -> set[int]:
    """Send ``count`` chat requests, each on a new connection; the pids that answered."""
    pids: set[int] = set()
    for _ in range(count):
        with httpx.Client(timeout=10) as client:
            response = client.post(
                process.url + "/v1/chat/completions", json=standard_chat_request(), headers=AUTH
            )
            assert response.status_code == 200
            pids.add(client.get(process.url + "/admin/health", headers=ADMIN_HEADERS).json()["pid"])
    return pids


def test_metrics_under_two_workers_count_every_request_exactly(
    two_workers: GatewayProcess,
) -> None:
    before = requests_total(httpx.get(two_workers.url + "/metrics").text, route="chat")
    pids = served_by(two_workers, 40)
    assert len(pids) == 2, "both workers should have answered some requests"
    # Any worker may answer a scrape; every one must see the whole server's count.
    for _ in range(6):
        with httpx.Client() as client:
            text = client.get(two_workers.url + "/metrics").text
        assert requests_total(text, route="chat", status_class="2xx") - before == 40


def test_admin_reload_reaches_every_worker(two_workers: GatewayProcess) -> None:
    before = admin_get(two_workers.url, "config")
    generations = {w["pid"]: w["generation"] for w in before["workers"]}
    assert len(generations) == 2
    report = httpx.post(two_workers.url + "/admin/reload", headers=ADMIN_HEADERS, timeout=30)
    assert report.status_code == 200
    body = report.json()
    assert body["reloaded"] is True
    assert {w["pid"] for w in body["workers"]} == set(generations)
    for worker in body["workers"]:
        assert worker["reached"] is True
        assert worker["generation"] == generations[worker["pid"]] + 1


def test_no_admin_response_or_log_line_carries_a_key_a_hash_or_a_secret(
    upstream: FakeUpstream,
) -> None:
    config = gateway_config(upstream.base_url).replace(
        "server:\n", "server:\n  reload_interval: 0.1\n", 1
    )
    with GatewayProcess(config, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as process:
        chat = standard_chat_request()
        httpx.post(process.url + "/v1/chat/completions", json=chat, headers=AUTH)
        httpx.post(
            process.url + "/v1/chat/completions",
            json=chat,
            headers={"authorization": "Bearer sk-gw-wrong"},
        )
        httpx.post(process.url + "/down/chat/completions", json=chat, headers=AUTH)
        httpx.get(process.url + "/admin/keys", headers={"authorization": f"Bearer {DEMO_KEY}"})
        # A refused reload whose text quotes a value.
        process.config_path.write_text(config.replace("upstream: fake", "upstream: nowhere", 1))
        deadline = time.monotonic() + 5
        while "config reload refused" not in process.logs():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        seen = []
        for name in ADMIN_ENDPOINTS:
            response = httpx.get(f"{process.url}/admin/{name}", headers=ADMIN_HEADERS)
            assert response.status_code == 200
            seen.append(response.text)
            seen.append(str(response.headers))
        seen.append(httpx.post(process.url + "/admin/reload", headers=ADMIN_HEADERS).text)
        seen.append(httpx.get(process.url + "/metrics").text)
        logs = process.logs()
    everything = "\n".join([*seen, logs])
    for secret in (DEMO_KEY, NARROW_KEY, ADMIN_KEY, UPSTREAM_KEY, "sk-gw-wrong"):
        assert secret not in everything, secret
    for key in (DEMO_KEY, NARROW_KEY, ADMIN_KEY):
        assert hash_key(key)[7:] not in everything
        assert hash_key(key)[7:23] not in everything  # not even the short id
