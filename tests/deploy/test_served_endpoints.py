"""A real ``gateway serve`` with the Kubernetes ConfigMap's config and the Deployment's arguments
answers every path the manifests, the Compose file and the Dockerfile probe or scrape, and
shuts down on one SIGTERM the way the grace periods assume: /readyz 503 at once, then exit 0 by
itself, in time.

Two things differ from the pod: the listen address (127.0.0.1 and a free port, as
``GatewayProcess`` passes them), and ``--drain-delay`` is cut to one second so that the test
does not sit out the shipped 5 s. The shipped numbers are compared with the grace periods in
test_kubernetes.py and test_compose.py; the drain's own timing is tests/server/test_drain.py's.
Redis and the upstream are addresses where nothing listens (the config degrades to local
limits): a probe must not depend on either."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.deploy.deployfiles import (
    documents,
    fill_in_a_key,
    final_stage,
    gateway_container,
    one,
    option,
    pod_spec,
    serve_args,
    shutdown_seconds,
)
from tests.support.gatewayproc import GatewayProcess
from tests.support.ports import free_port

# Where a drained gateway's exit is awaited beyond its own budget: process start-up noise.
EXIT_MARGIN_SECONDS = 5.0
TEST_DRAIN_DELAY = ("--drain-delay", "1")


def deployment_args() -> list[str]:
    """The Deployment's ``gateway serve`` arguments less those the test sets itself."""
    args = serve_args(gateway_container()["args"])
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--config", "--host", "--port"):
            skip = True
        else:
            kept.append(arg)
    return kept


@pytest.fixture(scope="module")
def configmap_gateway() -> Iterator[GatewayProcess]:
    """One gateway for the module (the last test stops it with SIGTERM)."""
    text = fill_in_a_key(documents()["ConfigMap"]["data"]["gateway.yaml"])
    env = {
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
    }
    args = (*deployment_args(), *TEST_DRAIN_DELAY)
    with GatewayProcess(text, env=env, args=args) as gateway:
        yield gateway


def test_probe_and_scrape_paths_answer_200(configmap_gateway: GatewayProcess) -> None:
    container = gateway_container()
    annotations = documents()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    paths = {
        container["livenessProbe"]["httpGet"]["path"],
        container["readinessProbe"]["httpGet"]["path"],
        annotations["prometheus.io/path"],
        *(endpoint["path"] for endpoint in documents()["ServiceMonitor"]["spec"]["endpoints"]),
    }
    for path in sorted(paths):
        response = httpx.get(configmap_gateway.url + path, timeout=5)
        assert response.status_code == 200, f"{path}: {response.status_code} {response.text}"


def test_metrics_are_prometheus_text(configmap_gateway: GatewayProcess) -> None:
    path = documents()["ServiceMonitor"]["spec"]["endpoints"][0]["path"]
    response = httpx.get(configmap_gateway.url + path, timeout=5)
    assert response.headers["content-type"].startswith("text/plain")
    assert "# TYPE " in response.text


def test_the_images_healthcheck_command_passes(configmap_gateway: GatewayProcess) -> None:
    command = one(final_stage(), "HEALTHCHECK").exec_form()
    port = option(serve_args(one(final_stage(), "CMD").exec_form()), "--port")
    script = command[2].replace(f"127.0.0.1:{port}", f"127.0.0.1:{configmap_gateway.port}")
    result = subprocess.run(
        [sys.executable, command[1], script], capture_output=True, timeout=10, check=False
    )
    assert result.returncode == 0, result.stderr


# Last in this module (pytest keeps the file's order): it stops the module's gateway, as the
# kubelet would, instead of starting another one and waiting for a second drain.
def test_one_sigterm_makes_it_unready_at_once_and_exit_0_in_time(
    configmap_gateway: GatewayProcess,
) -> None:
    text = documents()["ConfigMap"]["data"]["gateway.yaml"]
    budget = shutdown_seconds(text, [*deployment_args(), *TEST_DRAIN_DELAY])
    grace = pod_spec()["terminationGracePeriodSeconds"]
    readiness = gateway_container()["readinessProbe"]["httpGet"]["path"]
    gateway = configmap_gateway
    started = time.monotonic()
    gateway.signal(signal.SIGTERM)
    # At once, while new connections are still accepted (drain_delay): not ready.
    statuses: list[int] = []
    while time.monotonic() < started + 1.0 and 503 not in statuses:
        try:
            statuses.append(httpx.get(gateway.url + readiness, timeout=1).status_code)
        except httpx.TransportError:
            break  # the listening socket closed: the drain delay is over
        time.sleep(0.02)
    assert 503 in statuses, f"{readiness} after SIGTERM: {statuses}"
    code = gateway.wait(timeout=min(grace, budget + EXIT_MARGIN_SECONDS))
    elapsed = time.monotonic() - started
    assert code == 0, gateway.logs()
    assert elapsed < grace
