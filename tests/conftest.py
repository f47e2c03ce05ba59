"""Shared fixtures: a real fake upstream and real gateway processes in front of it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from gateway.auth import hash_key
from tests.support.admin import ADMIN_SECTION
from tests.support.fakeupstream import FakeUpstream
from tests.support.gatewayproc import GatewayProcess
from tests.support.ports import free_port

# trio (selenium's dependency) registers a Hypothesis plugin that warns as Hypothesis loads it,
# and the suite runs with warnings as errors: Hypothesis is imported after this line (lazily, by
# its pytest plugin or a test module), so its plugins are skipped.
os.environ.setdefault("HYPOTHESIS_NO_PLUGINS", "1")

DEMO_KEY = "sk-gw-test-demo"
NARROW_KEY = "sk-gw-test-narrow"
UPSTREAM_KEY = "sk-upstream-very-secret-0123456789"


def gateway_config(upstream_base_url: str, *, extra: str = "", unlisted: bool = True) -> str:
    """The test gateway's YAML: the example's routes, two keys, a model alias, and the admin
    API on with ``ADMIN_KEY`` (unless ``extra`` configures its own)."""
    if not any(line.startswith("admin:") for line in extra.splitlines()):
        extra = extra + "\n" + ADMIN_SECTION
    return f"""
server:
  max_body_bytes: 65536
upstreams:
  fake:
    base_url: {upstream_base_url}
    auth: {{style: bearer, key: "${{TEST_UPSTREAM_KEY}}"}}
    headers: {{x-gateway-tenant: tests}}
    timeouts: {{connect: 2, read: 30}}
  down:
    base_url: http://127.0.0.1:{free_port()}/v1
routes:
  - name: chat
    path: /v1/chat/completions
    upstream: fake
    aliases:
      - path: /chat/completions
      - path: /openai/v1/chat/completions
        deprecated: 2026-01-01
        sunset: 2027-06-30
        successor: /v1/chat/completions
  - {{name: completions, path: /v1/completions, upstream: fake}}
  - {{name: embeddings, path: /v1/embeddings, upstream: fake}}
  - {{name: responses, path: /v1/responses, upstream: fake}}
  - {{name: models, path: /v1/models, methods: [GET], upstream: fake, models_list: true}}
  - {{name: model, path: "/v1/models/{{model}}", methods: [GET], upstream: fake,
      encoded_slashes: model, model_in_path: model}}
  - name: slow
    path: /slow/chat/completions
    upstream: fake
    upstream_path: /chat/completions
    timeouts: {{connect: 1, read: 0.5}}
  - {{name: down, path: /down/chat/completions, upstream: down, upstream_path: /chat/completions}}
  - {{name: passthrough, path: "/v1/{{rest:path}}", methods: [GET, POST, DELETE], upstream: fake}}
models:
  fast: {{upstream: fake, model: gpt-4o-mini}}
  gpt-fake: {{upstream: fake}}
allow_unlisted_models: {"true" if unlisted else "false"}
keys:
  - name: demo
    hash: {hash_key(DEMO_KEY)}
  - name: narrow
    hash: {hash_key(NARROW_KEY)}
    routes: [chat]
    models: [fast]
{extra}
"""


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


@pytest.fixture(scope="session")
def gateway(upstream: FakeUpstream) -> Iterator[GatewayProcess]:
    config = gateway_config(upstream.base_url)
    with GatewayProcess(config, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as process:
        yield process


@pytest.fixture(scope="session")
def strict_gateway(upstream: FakeUpstream) -> Iterator[GatewayProcess]:
    """A gateway that refuses models not listed in its model table."""
    config = gateway_config(upstream.base_url, unlisted=False)
    with GatewayProcess(config, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as process:
        yield process
