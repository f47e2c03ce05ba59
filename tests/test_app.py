"""The gateway's own endpoints: health and readiness (the OpenAPI document of the public routes:
``tests/endpoints/test_openapi.py``)."""

from __future__ import annotations

import time

import httpx

from tests.conftest import UPSTREAM_KEY, gateway_config
from tests.support.admin import admin_get
from tests.support.fakeupstream import FakeUpstream
from tests.support.gatewayproc import GatewayProcess


def test_healthz_and_readyz(gateway: GatewayProcess) -> None:
    assert httpx.get(f"{gateway.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway.url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"


def test_trailing_slash_is_not_redirected(gateway: GatewayProcess) -> None:
    response = httpx.get(f"{gateway.url}/healthz/", follow_redirects=False)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_url"


def test_wrong_method_on_own_endpoints_is_an_openai_shaped_405(gateway: GatewayProcess) -> None:
    response = httpx.post(f"{gateway.url}/openapi.json")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert response.headers["allow"] == "GET, HEAD"


def test_ignored_forwarded_headers_are_counted_for_the_admin(gateway: GatewayProcess) -> None:
    before = admin_get(gateway.url, "health")["forwarded_headers_ignored"]
    # From loopback (trusted by default): a garbage X-Forwarded-For is ignored, never a 500.
    response = httpx.get(f"{gateway.url}/healthz", headers={"x-forwarded-for": "not-an-ip"})
    assert response.status_code == 200
    after = admin_get(gateway.url, "health")["forwarded_headers_ignored"]
    assert sum(after["malformed"].values()) == sum(before["malformed"].values()) + 1


def test_readyz_says_ready_and_nothing_else_while_the_admin_sees_the_refused_reload(
    upstream: FakeUpstream,
) -> None:
    # /readyz needs no key, so its body carries no counts, paths or error text; the admin API
    # shows the refused reload, with anything shaped like a key masked.
    config = gateway_config(upstream.base_url).replace(
        "server:\n", "server:\n  reload_interval: 0.1\n", 1
    )
    secret_like = "sk-live-pasted-by-mistake-0123456789"
    with GatewayProcess(config, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as process:
        process.config_path.write_text(
            config.replace("upstream: fake", f"upstream: {secret_like}", 1)
        )
        deadline = time.monotonic() + 5
        while "config reload refused" not in process.logs():
            assert time.monotonic() < deadline, "the bad config was not refused in time"
            time.sleep(0.05)
        for path in ("/readyz", "/ready"):
            ready = httpx.get(f"{process.url}{path}")
            assert ready.status_code == 200
            assert ready.json() == {"status": "ready"}
        for path in ("/healthz", "/health", "/live"):
            assert httpx.get(f"{process.url}{path}").json() == {"status": "ok"}
        state = admin_get(process.url, "config")
        assert state["generation"] == 1
        assert state["reload_failures"] == 1
        assert "routes[0].upstream" in state["last_error"]
        assert secret_like not in str(state)
        assert secret_like in process.logs()  # the log has it whole, for whoever reads logs
