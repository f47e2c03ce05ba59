"""Prometheus metrics at /metrics, in process: what each request moves, and what never shows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway
from gateway.auth import hash_key
from gateway.upstream.seam import UpstreamConnectError
from tests.support.standin import Scripted, StandInUpstream, call, in_process_gateway, json_answer

KEY = "sk-gw-metrics-key"
ADMIN = "adm-metrics-key"
SECRET = "sk-upstream-metrics-secret-42"
AUTH = [("authorization", f"Bearer {KEY}"), ("content-type", "application/json")]
CONFIG = f"""
server: {{access_log: false}}
upstreams:
  main: {{base_url: "http://upstream.test/v1", auth: {{style: bearer, key: {SECRET}}}}}
routes:
  - {{name: chat, path: /v1/chat/completions, upstream: main}}
models:
  fast: {{upstream: main, model: small-model}}
allow_unlisted_models: true
keys:
  - name: demo
    team: ml
    hash: {hash_key(KEY)}
    limits: {{requests_per_minute: 600, request_burst: 3}}
admin:
  keys: [{{name: ops, hash: {hash_key(ADMIN)}}}]
"""
USAGE = {"usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}


def chat(model: str = "fast") -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def upstream() -> StandInUpstream:
    return StandInUpstream(lambda request: json_answer(USAGE))


@pytest.fixture
async def gateway(upstream: StandInUpstream) -> AsyncIterator[Gateway]:
    async with in_process_gateway(CONFIG, upstream) as app:
        yield app


async def scrape(gateway: Gateway) -> str:
    response = await call(gateway, "GET", "/metrics")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.body.decode()


async def test_requests_are_counted_by_route_upstream_key_and_status_class(
    gateway: Gateway,
) -> None:
    for _ in range(2):
        await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=chat())
    await call(gateway, "POST", "/v1/chat/completions", body=chat())  # no key: 401
    await call(gateway, "GET", "/nowhere")
    text = await scrape(gateway)
    labels = {"route": "chat", "upstream": "main", "key": "demo", "status_class": "2xx"}
    assert value(text, "gateway_requests_total", **labels) == 2
    unauthenticated = {"route": "chat", "upstream": "none", "key": "none", "status_class": "4xx"}
    assert value(text, "gateway_requests_total", **unauthenticated) == 1
    unrouted = {"route": "none", "upstream": "none", "key": "none", "status_class": "4xx"}
    assert value(text, "gateway_requests_total", **unrouted) == 1


async def test_probes_and_scrapes_are_not_counted_as_traffic(gateway: Gateway) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        await call(gateway, "GET", path)
    text = await scrape(gateway)
    assert "gateway_requests_total{" not in text


async def test_tokens_in_and_out_by_key_and_model_without_any_token_limit(
    gateway: Gateway,
) -> None:
    await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=chat())
    text = await scrape(gateway)
    common = {"gen_ai_request_model": "fast", "key": "demo"}
    sum_name = "gen_ai_client_token_usage_sum"
    assert value(text, sum_name, gen_ai_token_type="input", **common) == 11
    assert value(text, sum_name, gen_ai_token_type="output", **common) == 7
    # The OpenTelemetry GenAI bucket boundaries: 1, 4, 16, ... 67108864.
    bucket = "gen_ai_client_token_usage_bucket"
    assert value(text, bucket, gen_ai_token_type="input", le="16.0", **common) == 1
    assert value(text, bucket, gen_ai_token_type="input", le="4.0", **common) == 0
    assert value(text, bucket, gen_ai_token_type="input", le="6.7108864e+07", **common) == 1


async def test_a_model_the_config_does_not_list_is_never_a_label_value(gateway: Gateway) -> None:
    invented = "client-invented-model-7f3a"
    await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=chat(invented))
    text = await scrape(gateway)
    assert invented not in text
    assert 'gen_ai_request_model="other"' in text


async def test_limit_refusals_are_counted_by_reason(gateway: Gateway) -> None:
    statuses = [
        (await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=chat())).status
        for _ in range(4)
    ]
    assert statuses == [200, 200, 200, 429]
    text = await scrape(gateway)
    assert value(text, "gateway_limit_refusals_total", reason="requests") == 1


async def test_upstream_errors_are_counted_by_kind(
    gateway: Gateway, upstream: StandInUpstream
) -> None:
    upstream.respond = lambda request: Scripted(fault=UpstreamConnectError("refused"))
    await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=chat())
    upstream.respond = lambda request: Scripted(
        headers=((b"content-type", b"text/event-stream"),), chunks=[b"data: 1\n\n"], cut_after=1
    )
    await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=chat())
    text = await scrape(gateway)
    assert value(text, "gateway_upstream_errors_total", upstream="main", kind="connect") == 1
    assert value(text, "gateway_upstream_errors_total", upstream="main", kind="stream") == 1


async def test_open_streams_are_counted_while_they_are_relayed(
    gateway: Gateway, upstream: StandInUpstream
) -> None:
    upstream.respond = lambda request: Scripted(
        headers=((b"content-type", b"text/event-stream"),),
        chunks=[b"data: 1\n\n"] * 20,
        chunk_delay=0.02,
    )
    streams = [
        asyncio.ensure_future(
            call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=chat())
        )
        for _ in range(3)
    ]
    await asyncio.sleep(0.1)
    assert value(await scrape(gateway), "gateway_open_streams") == 3
    await asyncio.gather(*streams)
    text = await scrape(gateway)
    assert value(text, "gateway_open_streams") == 0
    ttft = "gen_ai_server_time_to_first_token_seconds_count"
    assert value(text, ttft, gen_ai_operation_name="chat", gen_ai_request_model="fast") == 3


async def test_the_gateways_own_time_and_the_upstreams_are_apart(
    gateway: Gateway, upstream: StandInUpstream
) -> None:
    def slow(request: object) -> Scripted:
        return Scripted(chunks=[b"{}"] * 3, chunk_delay=0.05)

    upstream.respond = slow
    await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=chat())
    text = await scrape(gateway)
    total = value(text, "gateway_request_duration_seconds_sum", route="chat")
    overhead = value(text, "gateway_overhead_seconds_sum", route="chat")
    assert total >= 0.15
    assert overhead < 0.05  # the upstream's 150 ms are not the gateway's
    assert value(text, "gateway_upstream_time_to_first_byte_seconds_count", upstream="main") == 1


async def test_no_key_hash_or_secret_ever_appears_in_the_metrics(gateway: Gateway) -> None:
    await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=chat())
    await call(gateway, "POST", "/v1/chat/completions", headers=[("authorization", "Bearer x")])
    text = await scrape(gateway)
    for secret in (KEY, SECRET, ADMIN, hash_key(KEY), hash_key(KEY)[7:23], "upstream.test"):
        assert secret not in text


async def test_metrics_can_be_turned_off_or_put_behind_the_admin_key(
    upstream: StandInUpstream,
) -> None:
    async with in_process_gateway(CONFIG + "metrics: {enabled: false}\n", upstream) as app:
        assert (await call(app, "GET", "/metrics")).status == 404
    guarded = CONFIG + "metrics: {require_admin_key: true}\n"
    async with in_process_gateway(guarded, upstream) as app:
        assert (await call(app, "GET", "/metrics")).status == 404
        bearer = [("authorization", f"Bearer {ADMIN}")]
        assert (await call(app, "GET", "/metrics", headers=bearer)).status == 200


async def test_attempts_retries_ejections_and_targets_in_service_are_counted() -> None:
    targets = CONFIG.replace(
        '  main: {base_url: "http://upstream.test/v1", auth: {style: bearer, key: ' + SECRET + "}}",
        "  main:\n"
        "    auth: {style: bearer, key: " + SECRET + "}\n"
        "    targets:\n"
        '      - {name: a, base_url: "http://a.test/v1", weight: 1000000}\n'
        '      - {name: b, base_url: "http://b.test/v1"}\n'
        "    outlier: {consecutive_failures: 2, base_ejection: 60}",
    ).replace("limits: {requests_per_minute: 600, request_burst: 3}", "limits: {}")
    upstream = StandInUpstream(
        lambda request: (
            Scripted(fault=UpstreamConnectError("refused"))
            if "//a." in request.url
            else json_answer(USAGE)
        )
    )
    async with in_process_gateway(targets, upstream) as gateway:
        for _ in range(3):
            response = await call(
                gateway, "POST", "/v1/chat/completions", headers=AUTH, body=chat()
            )
            assert response.status == 200
        text = await scrape(gateway)
    attempts = "gateway_upstream_attempts_total"
    # a refused twice, then it was ejected and only b was asked.
    assert value(text, attempts, upstream="main", target="a", outcome="connect") == 2
    assert value(text, attempts, upstream="main", target="b", outcome="ok") == 3
    assert value(text, "gateway_upstream_retries_total", upstream="main", reason="connect") == 2
    ejections = "gateway_upstream_target_ejections_total"
    assert value(text, ejections, upstream="main", target="a") == 1
    in_service = "gateway_upstream_target_in_service"
    assert value(text, in_service, upstream="main", target="a") == 0
    assert value(text, in_service, upstream="main", target="b") == 1
    assert "a.test" not in text  # a target's name, never its URL
