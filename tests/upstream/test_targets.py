"""An upstream as the relay uses it (``gateway/upstream/targets.py``), built from its config by
the per-config snapshot: its URLs, the headers and query it adds, its secrets."""

from __future__ import annotations

import pytest

from gateway.config.model import GatewayConfig, Upstream
from gateway.http.headers import mask_secrets
from gateway.limits import LocalLimiter
from gateway.runtime import build_runtime
from gateway.upstream.transports.http1 import Http1Client


def runtime_for(upstream: Upstream) -> GatewayConfig:
    return GatewayConfig(upstreams={"u": upstream})


def test_configured_query_parameters_replace_the_clients_own() -> None:
    config = runtime_for(
        Upstream(base_url="https://x.example/openai/v1", query={"api-version": "2025-04-01"})
    )
    target = build_runtime(config, Http1Client, LocalLimiter()).upstreams["u"].first
    url = target.url("/chat/completions", b"api-version=1999-01-01&x=%2F&api%2Dversion=2")
    assert url == "https://x.example/openai/v1/chat/completions?x=%2F&api-version=2025-04-01"


@pytest.mark.parametrize(
    "client_query",
    [
        b"API-Version=9999",
        b"Api-VERSION=9999&x=1",
        b"api%2Dversion=9999",
        b"API%2dVersion=9999&x=1",
        b"x=1&api-version=9999&API-VERSION=9998",
    ],
)
def test_configured_query_values_replace_the_clients_whatever_the_case_or_encoding(
    client_query: bytes,
) -> None:
    config = runtime_for(
        Upstream(base_url="https://x.example/openai/v1", query={"api-version": "2025-04-01"})
    )
    target = build_runtime(config, Http1Client, LocalLimiter()).upstreams["u"].first
    url = target.url("/chat/completions", client_query)
    kept = "x=1&" if b"x=1" in client_query else ""
    assert url == f"https://x.example/openai/v1/chat/completions?{kept}api-version=2025-04-01"


def test_a_configured_name_in_capitals_replaces_the_clients_lower_case_one() -> None:
    config = runtime_for(Upstream(base_url="http://x/v1", query={"API-Version": "1"}))
    target = build_runtime(config, Http1Client, LocalLimiter()).upstreams["u"].first
    assert target.url("/files", b"api-version=2&a=b") == "http://x/v1/files?a=b&API-Version=1"


def test_client_query_passes_unchanged_without_configured_parameters() -> None:
    target = (
        build_runtime(runtime_for(Upstream(base_url="http://x/v1")), Http1Client, LocalLimiter())
        .upstreams["u"]
        .first
    )
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
    target = build_runtime(runtime_for(upstream), Http1Client, LocalLimiter()).upstreams["u"].first
    assert target.added_headers == (("anthropic-version", "2023-06-01"), ("x-api-key", "sk-ant"))
    assert target.added_names == {b"anthropic-version", b"x-api-key"}
    # Third-party https upstreams learn nothing of the client's address by default.
    assert not target.append_forwarded_for


def secrets_of(upstream: dict[str, object]) -> tuple[bytes, ...]:
    target = (
        build_runtime(runtime_for(Upstream.model_validate(upstream)), Http1Client, LocalLimiter())
        .upstreams["u"]
        .first
    )
    return target.secrets


def test_secrets_are_the_key_and_configured_values_whose_names_carry_credentials() -> None:
    secrets = secrets_of(
        {
            "base_url": "https://x.example/v1",
            "auth": {"style": "api-key", "key": "azure-key-0123"},
            "headers": {
                "Proxy-Authorization": "Basic dXNlcjpwYXNz",
                "X-Org-Token": "org-token-42",
                "Cookie": "session=abcdef12; lang=en",
                "X-Client-Secret": "cs-0123",
                "anthropic-version": "2023-06-01",
                "x-gateway-tenant": "tenant-a",
            },
            "query": {"api-version": "2025-04-01", "subscription-key": "sub/key+1"},
        }
    )
    assert set(secrets) == {
        b"azure-key-0123",
        b"Basic dXNlcjpwYXNz",
        b"dXNlcjpwYXNz",  # the credentials without their scheme (RFC 9110 §11.4)
        b"org-token-42",
        b"session=abcdef12; lang=en",
        b"abcdef12",  # a cookie's value; "en" is too short to mask
        b"cs-0123",
        b"sub/key+1",
        b"sub%2Fkey%2B1",  # as it is written in the URL
    }
    # Longest first: the order masking goes in.
    assert [len(s) for s in secrets] == sorted((len(s) for s in secrets), reverse=True)


def test_values_shorter_than_four_characters_are_not_masked() -> None:
    # A one-letter "key" would turn every 'a' of every body into the mask.
    assert secrets_of({"base_url": "http://x/v1", "auth": {"key": "abc"}}) == ()
    assert secrets_of({"base_url": "http://x/v1", "auth": {"key": "abcd"}}) == (b"abcd",)


def test_a_secret_containing_another_is_masked_whole() -> None:
    secrets = secrets_of(
        {
            "base_url": "http://x/v1",
            "auth": {"style": "x-api-key", "key": "key-0123"},
            "headers": {"authorization": "Bearer key-0123-ext"},
        }
    )
    # Masked shortest first, "key-0123-ext" would leave "***-ext", a part of a secret.
    assert mask_secrets(b"got key-0123-ext and key-0123", secrets) == b"got *** and ***"


def test_an_upstream_without_credentials_has_no_secrets() -> None:
    assert secrets_of({"base_url": "http://x/v1", "headers": {"anthropic-version": "1"}}) == ()
