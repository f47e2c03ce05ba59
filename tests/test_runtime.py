"""The per-config snapshot: upstream URLs, added headers, token reservations."""

from __future__ import annotations

import orjson

from gateway.config.model import GatewayConfig, Upstream
from gateway.http1_client import Http1Client
from gateway.limits import LocalLimiter
from gateway.proxy import _reserve
from gateway.runtime import build_runtime


def runtime_for(upstream: Upstream) -> GatewayConfig:
    return GatewayConfig(upstreams={"u": upstream})


def test_configured_query_parameters_replace_the_clients_own() -> None:
    config = runtime_for(
        Upstream(base_url="https://x.example/openai/v1", query={"api-version": "2025-04-01"})
    )
    target = build_runtime(config, Http1Client, LocalLimiter()).upstreams["u"]
    url = target.url("/chat/completions", b"api-version=1999-01-01&x=%2F&api%2Dversion=2")
    assert url == "https://x.example/openai/v1/chat/completions?x=%2F&api-version=2025-04-01"


def test_client_query_passes_unchanged_without_configured_parameters() -> None:
    target = build_runtime(
        runtime_for(Upstream(base_url="http://x/v1")), Http1Client, LocalLimiter()
    ).upstreams["u"]
    assert target.url("/files", b"a=1&b=%20") == "http://x/v1/files?a=1&b=%20"
    assert target.url("/files", b"") == "http://x/v1/files"


def test_configured_headers_and_auth_are_added_and_named_for_replacement() -> None:
    upstream = Upstream.model_validate(
        {
            "base_url": "https://api.anthropic.com/v1",
            "auth": {"style": "x-api-key", "key": "sk-ant"},
            "headers": {"Anthropic-Version": "2023-06-01"},
        }
    )
    target = build_runtime(runtime_for(upstream), Http1Client, LocalLimiter()).upstreams["u"]
    assert target.added_headers == (("anthropic-version", "2023-06-01"), ("x-api-key", "sk-ant"))
    assert target.added_names == {b"anthropic-version", b"x-api-key"}
    # Third-party https upstreams learn nothing of the client's address by default.
    assert not target.append_forwarded_for


def test_deeply_nested_json_is_reserved_from_its_size_not_a_crash() -> None:
    runtime = build_runtime(GatewayConfig(), Http1Client, LocalLimiter())
    # 1,000 levels: orjson accepts up to 1,024, deeper than Python's recursion limit allows.
    payload = b'{"model":"m","messages":' + b'[{"content":' * 499 + b'"x"' + b"}]" * 499 + b"}"
    document = orjson.loads(payload)
    assert _reserve(runtime, document, payload) >= len(payload) // 4
