"""The admin API: who may call it, what it shows, and what it never shows."""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from gateway.app import Gateway
from gateway.auth import hash_key
from gateway.config.loader import load_config_files
from gateway.upstream.seam import OutboundRequest, UpstreamConnectError
from tests.support.standin import (
    Recorded,
    Scripted,
    StandInUpstream,
    call,
    in_process_gateway,
    json_answer,
)

KEY = "sk-gw-admin-test-client"
ADMIN = "adm-admin-test-operator"
SECRET = "sk-upstream-admin-test-secret-99"
ORG = "org-header-secret-value-77"
CONFIG = f"""
server: {{access_log: false}}
upstreams:
  main:
    base_url: "https://api.upstream.test:8443/v1"
    auth: {{style: bearer, key: {SECRET}}}
    headers: {{x-org-token: {ORG}}}
routes:
  - name: chat
    path: /v1/chat/completions
    upstream: main
    aliases:
      - {{path: /old/chat, deprecated: 2026-01-01, sunset: 2027-06-30,
          successor: /v1/chat/completions}}
models:
  fast: {{upstream: main, model: small}}
allow_unlisted_models: true
keys:
  - name: demo
    team: ml
    hash: {hash_key(KEY)}
    limits: {{requests_per_minute: 60, tokens_per_minute: 10000}}
admin:
  keys: [{{name: ops, hash: {hash_key(ADMIN)}}}]
"""
BEARER = [("authorization", f"Bearer {ADMIN}")]
CLIENT = [("authorization", f"Bearer {KEY}"), ("content-type", "application/json")]
CHAT = orjson.dumps({"model": "fast", "messages": [{"role": "user", "content": "hi"}]})
ENDPOINTS = ("config", "routes", "keys", "upstreams", "errors", "health", "usage", "jobs", "status")
# What no admin response may carry.
NEVER = (KEY, ADMIN, SECRET, ORG, hash_key(KEY)[7:], hash_key(ADMIN)[7:], "/v1?", "sha256:")


@pytest.fixture
def upstream() -> StandInUpstream:
    usage = {"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    return StandInUpstream(lambda request: json_answer(usage))


@pytest.fixture
async def gateway(upstream: StandInUpstream) -> AsyncIterator[Gateway]:
    async with in_process_gateway(CONFIG, upstream) as app:
        yield app


async def admin(gateway: Gateway, name: str, method: str = "GET") -> Recorded:
    response = await call(gateway, method, f"/admin/{name}", headers=BEARER)
    assert response.status == 200, response.body
    assert response.headers["cache-control"] == "no-store"
    return response


def assert_nothing_secret(text: str) -> None:
    for secret in NEVER:
        assert secret not in text, secret


async def test_the_admin_api_is_off_without_admin_keys(upstream: StandInUpstream) -> None:
    config = CONFIG[: CONFIG.index("admin:")]
    async with in_process_gateway(config, upstream) as app:
        for name in ENDPOINTS:
            response = await call(app, "GET", f"/admin/{name}", headers=BEARER)
            assert response.status == 404
            assert response.json()["error"]["code"] == "unknown_url"


@pytest.mark.parametrize("name", ENDPOINTS)
async def test_without_a_key_every_admin_endpoint_is_401_with_a_basic_challenge(
    gateway: Gateway, name: str
) -> None:
    response = await call(gateway, "GET", f"/admin/{name}")
    assert response.status == 401
    assert response.headers["www-authenticate"].startswith('Basic realm="gateway admin"')
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "missing_api_key"
    wrong = await call(gateway, "GET", f"/admin/{name}", headers=[("authorization", "Bearer no")])
    assert wrong.status == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("name", ENDPOINTS)
async def test_a_client_key_is_refused_with_403_whatever_it_may_do(
    gateway: Gateway, name: str
) -> None:
    response = await call(gateway, "GET", f"/admin/{name}", headers=CLIENT)
    assert response.status == 403
    error = response.json()["error"]
    assert error["type"] == "permission_error"
    assert error["code"] == "admin_key_required"


async def test_an_admin_key_opens_nothing_on_the_api(gateway: Gateway) -> None:
    response = await call(gateway, "POST", "/v1/chat/completions", headers=BEARER, body=CHAT)
    assert response.status == 401


async def test_http_basic_with_the_key_as_password_is_accepted(gateway: Gateway) -> None:
    basic = base64.b64encode(f"anyone:{ADMIN}".encode()).decode()
    response = await call(
        gateway, "GET", "/admin/status", headers=[("authorization", f"Basic {basic}")]
    )
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]


async def test_no_admin_response_carries_a_key_a_hash_or_an_upstream_secret(
    gateway: Gateway, upstream: StandInUpstream
) -> None:
    await call(gateway, "POST", "/v1/chat/completions", headers=CLIENT, body=CHAT)
    upstream.respond = lambda request: Scripted(fault=UpstreamConnectError("refused"))
    await call(gateway, "POST", "/v1/chat/completions", headers=CLIENT, body=CHAT)
    for name in ENDPOINTS:
        response = await admin(gateway, name)
        assert_nothing_secret(response.body.decode())
        assert_nothing_secret(str(response.headers))


async def test_routes_show_aliases_with_their_deprecation(gateway: Gateway) -> None:
    routes = (await admin(gateway, "routes")).json()
    chat = routes["routes"][0]
    assert chat["name"] == "chat"
    assert chat["upstream_path"] == "/chat/completions"
    assert chat["aliases"] == [
        {
            "path": "/old/chat",
            "deprecated": "2026-01-01",
            "sunset": "2027-06-30",
            "successor": "/v1/chat/completions",
        }
    ]
    assert routes["models"] == {"fast": {"upstream": "main", "model": "small"}}


async def test_keys_show_name_team_and_their_buckets_as_used(gateway: Gateway) -> None:
    before = (await admin(gateway, "keys")).json()["keys"][0]
    await call(gateway, "POST", "/v1/chat/completions", headers=CLIENT, body=CHAT)
    after = (await admin(gateway, "keys")).json()["keys"][0]
    assert after["name"] == "demo"
    assert after["team"] == "ml"
    assert "hash" not in after
    requests = next(b for b in after["buckets"] if b["kind"] == "requests")
    assert requests["capacity"] == 60
    before_requests = next(b for b in before["buckets"] if b["kind"] == "requests")
    assert before_requests["available"] == pytest.approx(60, abs=0.1)
    assert requests["available"] == pytest.approx(59, abs=0.1)
    tokens = next(b for b in after["buckets"] if b["kind"] == "tokens")
    assert tokens["available"] == pytest.approx(10000 - 7, abs=1)  # settled to the real usage


async def test_upstreams_show_origin_and_health_never_the_url_path(
    gateway: Gateway, upstream: StandInUpstream
) -> None:
    await call(gateway, "POST", "/v1/chat/completions", headers=CLIENT, body=CHAT)
    upstream.respond = lambda request: Scripted(fault=UpstreamConnectError("refused"))
    await call(gateway, "POST", "/v1/chat/completions", headers=CLIENT, body=CHAT)
    main = (await admin(gateway, "upstreams")).json()["upstreams"][0]
    assert main["origin"] == "https://api.upstream.test:8443"
    assert main["requests"] == 2
    assert main["failures"] == 1
    assert main["last_error"] == "connect"
    assert main["time_to_first_byte_ms"]["samples"] == 1


TARGETS = CONFIG.replace(
    """    base_url: "https://api.upstream.test:8443/v1"
""",
    """    targets:
      - {name: east, base_url: "https://east.upstream.test/v1/deployments"}
      - {name: west, base_url: "https://west.upstream.test:9443/v1", weight: 2}
    outlier: {consecutive_failures: 1, base_ejection: 60}
""",
).replace("limits: {requests_per_minute: 60, tokens_per_minute: 10000}", "limits: {}")


async def test_upstreams_show_each_target_s_state_by_name_and_origin_only(
    upstream: StandInUpstream,
) -> None:
    def east_refuses(request: OutboundRequest) -> Scripted:
        if "east." in request.url:
            return Scripted(fault=UpstreamConnectError("refused"))
        return json_answer({})

    upstream.respond = east_refuses
    async with in_process_gateway(TARGETS, upstream) as gateway:
        for _ in range(10):
            await call(gateway, "POST", "/v1/chat/completions", headers=CLIENT, body=CHAT)
        body = (await admin(gateway, "upstreams")).body.decode()
    main = orjson.loads(body)["upstreams"][0]
    assert main["usable_targets"] == 1
    east, west = main["targets"]
    assert (east["name"], east["state"], east["ejections"]) == ("east", "ejected", 1)
    assert 0 < east["back_in_seconds"] <= 60
    assert east["origin"] == "https://east.upstream.test"
    assert (west["name"], west["state"], west["weight"]) == ("west", "in service", 2.0)
    assert west["origin"] == "https://west.upstream.test:9443"
    assert "/deployments" not in body
    assert_nothing_secret(body)


async def test_errors_list_the_last_failed_requests_by_id(
    gateway: Gateway, upstream: StandInUpstream
) -> None:
    upstream.respond = lambda request: Scripted(fault=UpstreamConnectError("refused"))
    failed = await call(gateway, "POST", "/v1/chat/completions", headers=CLIENT, body=CHAT)
    errors = (await admin(gateway, "errors")).json()["errors"]
    assert errors[0]["request_id"] == failed.headers["x-request-id"]
    assert errors[0]["status"] == 502
    assert errors[0]["upstream_error"] == "connect"
    assert errors[0]["key"] == "demo"


async def test_unknown_admin_paths_and_methods_are_openai_shaped(gateway: Gateway) -> None:
    assert (await call(gateway, "GET", "/admin/nothing", headers=BEARER)).status == 404
    wrong = await call(gateway, "GET", "/admin/reload", headers=BEARER)
    assert wrong.status == 405
    assert wrong.headers["allow"] == "POST"


async def test_reload_applies_the_file_and_reports_it(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        CONFIG.replace(
            "server: {access_log: false}", "server: {access_log: false, reload_interval: 0}"
        )
    )
    config, files = load_config_files(path)
    upstream = StandInUpstream(lambda request: json_answer({}))
    app = Gateway(config, client_factory=upstream.factory, config_files=files)
    await app.startup()
    try:
        path.write_text(path.read_text().replace("name: chat", "name: chat2"))
        report = (await admin(app, "reload", "POST")).json()
        assert report["reloaded"] is True
        assert report["workers"][0]["generation"] == 2
        routes = (await admin(app, "routes")).json()["routes"]
        assert routes[0]["name"] == "chat2"
        path.write_text(path.read_text().replace("upstream: main\n", "upstream: gone\n", 1))
        refused = (await admin(app, "reload", "POST")).json()
        assert refused["reloaded"] is False
        assert "routes[0].upstream" in refused["workers"][0]["last_error"]
        assert_nothing_secret(orjson.dumps(refused).decode())
        state = (await admin(app, "config")).json()
        assert state["generation"] == 2
        assert state["reload_failures"] == 1
        assert re.search(r"gateway\.yaml", " ".join(state["files"]))
    finally:
        await app.shutdown()


async def test_admin_jobs_shows_the_queue_and_any_keys_job_without_its_content(
    gateway: Gateway,
) -> None:
    body = b'{"model": "fast", "messages": [{"role": "user", "content": "private words"}]}'
    headers = [*CLIENT, ("prefer", "respond-async, wait=5"), ("x-gateway-webhook-url", "x")]
    refused = await call(gateway, "POST", "/v1/chat/completions", headers=headers, body=body)
    assert refused.status == 400  # no webhook secret here: the job is refused, none made
    submitted = await call(
        gateway,
        "POST",
        "/v1/chat/completions",
        headers=[*CLIENT, ("prefer", "respond-async, wait=5")],
        body=body,
    )
    job_id = submitted.headers["x-gateway-job-id"]
    summary = (await admin(gateway, "jobs")).json()
    one = (await admin(gateway, f"jobs?id={job_id}")).json()["job"]
    missing = await call(gateway, "GET", "/admin/jobs?id=job_nope", headers=BEARER)
    assert summary["enabled"] is True
    assert summary["store"] == "memory"
    assert summary["queued"] == 0
    assert summary["running"] == 0
    assert one["id"] == job_id
    assert one["owner"] == "demo"
    assert one["team"] == "ml"
    assert one["status"] == "completed"
    assert "body" not in one["response"]
    text = orjson.dumps(one).decode()
    assert "private words" not in text
    assert_nothing_secret(text)
    assert missing.status == 404
