"""Config reload: a valid edit takes effect without a restart; a bad edit is refused and the
previous config keeps serving, visibly."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.conftest import DEMO_KEY, UPSTREAM_KEY, gateway_config
from tests.support.admin import admin_get
from tests.support.fakeupstream import FakeUpstream, standard_chat_request
from tests.support.gatewayproc import GatewayProcess

AUTH = {"authorization": f"Bearer {DEMO_KEY}"}


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@pytest.fixture
def reloading(upstream: FakeUpstream) -> Iterator[GatewayProcess]:
    config = gateway_config(upstream.base_url).replace(
        "server:\n", "server:\n  reload_interval: 0.1\n", 1
    )
    with GatewayProcess(config, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as process:
        yield process


def status(process: GatewayProcess) -> dict[str, object]:
    """The config's state as the admin API shows it, with whether the last reload failed."""
    config: dict[str, object] = admin_get(process.url, "config")
    return {**config, "last_reload_failed": config.get("last_error") is not None}


def chat(process: GatewayProcess, path: str) -> httpx.Response:
    return httpx.post(f"{process.url}{path}", json=standard_chat_request(), headers=AUTH)


def test_edited_config_file_is_applied_without_restart(reloading: GatewayProcess) -> None:
    assert chat(reloading, "/v2/chat").status_code == 404
    text = reloading.config_path.read_text()
    reloading.config_path.write_text(
        text.replace(
            "routes:\n",
            "routes:\n  - {name: v2, path: /v2/chat, upstream: fake, "
            "upstream_path: /chat/completions}\n",
            1,
        )
    )
    wait_until(lambda: status(reloading)["generation"] == 2)
    assert chat(reloading, "/v2/chat").status_code == 200


def test_invalid_edit_is_refused_and_previous_config_keeps_serving(
    reloading: GatewayProcess,
) -> None:
    good = reloading.config_path.read_text()
    reloading.config_path.write_text(good.replace("upstream: fake", "upstream: nowhere", 1))
    wait_until(lambda: status(reloading).get("reload_failures") == 1)
    state = status(reloading)
    assert state["generation"] == 1
    assert state["last_reload_failed"] is True
    assert chat(reloading, "/v1/chat/completions").status_code == 200
    # The full error, with file, line and key path, is in the log and on the admin API.
    assert "routes[0].upstream" in str(state["last_error"])
    logs = reloading.logs()
    assert "config reload refused" in logs
    assert f"{reloading.config_path}:" in logs
    assert "routes[0].upstream" in logs
    assert UPSTREAM_KEY not in logs
    # Fixing the file recovers.
    reloading.config_path.write_text(good + "\n")
    wait_until(lambda: status(reloading)["generation"] == 2)
    assert status(reloading)["last_reload_failed"] is False


def test_sighup_reloads(upstream: FakeUpstream) -> None:
    config = gateway_config(upstream.base_url).replace(
        "server:\n", "server:\n  reload_interval: 0\n", 1
    )
    with GatewayProcess(config, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as process:
        os.kill(process.pid, signal.SIGHUP)
        wait_until(lambda: status(process)["generation"] == 2)
        assert chat(process, "/v1/chat/completions").status_code == 200
