"""Jobs across real replicas (issue #13): ``gateway serve`` processes sharing a Redis the test
starts, a real fake upstream, and the official openai SDK.

What a crash costs is the guarantee under test: a job runs at least once and is stored once. A
replica killed mid-run leaves its job to another once the lease lapses; one killed after the
upstream answered but before the answer was stored makes the next replica call the upstream
again (the second call is the price of at-least-once) and the job still ends once, with one
answer.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from typing import Any

import httpx
import openai
import orjson

from tests.conftest import DEMO_KEY, UPSTREAM_KEY, gateway_config
from tests.support.fakeupstream import FakeUpstream, RecordedRequest
from tests.support.gatewayproc import GatewayProcess
from tests.support.jobs import job_when_done_over_http
from tests.support.redisserver import RedisServer
from tests.support.redisserver import redis_server_fixture as redis_server_fixture
from tests.support.tcprelay import StallableRelay
from tests.support.webhookreceiver import WebhookReceiver

AUTH = {"authorization": f"Bearer {DEMO_KEY}"}
ASYNC = {**AUTH, "prefer": "respond-async"}
ENV = {"TEST_UPSTREAM_KEY": UPSTREAM_KEY}
LEASE = 1.0
WEBHOOK_SECRET = "whsec_" + "c2VjcmV0LWZvci10aGUtam9icy1lbmQtdG8tZW5kLXRlc3Q="


def replica(
    upstream: FakeUpstream, redis_url: str, *, hook_port: int | None = None
) -> GatewayProcess:
    """One gateway replica; with ``hook_port`` the demo key may send webhooks to that port on
    127.0.0.1 (an internal address: allowed only when named)."""
    extra = f"""
redis: {{url: "{redis_url}"}}
jobs: {{lease: {LEASE}, concurrency: 2, webhooks: {{schedule: [0, 0.5, 0.5]}}}}
"""
    config = gateway_config(upstream.base_url, extra=extra)
    if hook_port is not None:
        config = config.replace(
            "  - name: demo\n", f'  - name: demo\n    webhook_hosts: ["127.0.0.1:{hook_port}"]\n', 1
        )
    return GatewayProcess(config, env={**ENV, "GATEWAY_WEBHOOK_SECRET": WEBHOOK_SECRET})


def chat(marker: str, **controls: str) -> tuple[dict[str, str], dict[str, object]]:
    headers = {**ASYNC, "x-test-job": marker, **controls}
    body: dict[str, object] = {
        "model": "gpt-fake",
        "messages": [{"role": "user", "content": marker}],
    }
    return headers, body


def calls(upstream: FakeUpstream, marker: str) -> list[RecordedRequest]:
    return [r for r in upstream.requests if r.header("x-test-job") == marker]


def wait_for_call(upstream: FakeUpstream, marker: str, count: int = 1) -> RecordedRequest:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        seen = calls(upstream, marker)
        if len(seen) >= count:
            return seen[count - 1]
        time.sleep(0.01)
    raise AssertionError(f"the upstream never saw call {count} of job {marker}")


def test_a_killed_replicas_job_is_finished_by_another_after_the_lease(
    upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    marker = uuid.uuid4().hex
    # A streamed answer of 20 chunks, 100 ms apart: still generating when replica A dies.
    headers, body = chat(marker, **{"x-fake-chunks": "20", "x-fake-interval-ms": "100"})
    body["stream"] = True
    with replica(upstream, redis_server.url) as a:
        submitted = httpx.post(f"{a.url}/v1/chat/completions", headers=headers, json=body)
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        wait_for_call(upstream, marker)
        a.signal(signal.SIGKILL)
        a.wait(5)
        killed_at = time.monotonic()
    with replica(upstream, redis_server.url) as b:
        view = job_when_done_over_http(b.url, job_id, AUTH)
        second = wait_for_call(upstream, marker, 2)
        result = httpx.get(f"{b.url}/v1/jobs/{job_id}/result", headers=AUTH)
    assert view["status"] == "completed"
    assert view["attempts"] == 2
    # Not before the lease lapsed: the dead replica's claim held until then.
    assert second.received_at - killed_at >= LEASE * 0.8
    assert result.status_code == 200
    # Byte for byte what the upstream streams for this request (asked of it directly).
    controls = {k: v for k, v in headers.items() if k.startswith("x-fake-")}
    direct = httpx.post(f"{upstream.base_url}/chat/completions", headers=controls, json=body)
    assert result.content == direct.content
    assert result.content.endswith(b"data: [DONE]\n\n")
    assert len(calls(upstream, marker)) == 2


async def test_a_replica_killed_after_the_answer_and_before_storing_it_loses_nothing(
    upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    async with WebhookReceiver([WEBHOOK_SECRET]) as receiver:
        # The gateways are driven from a thread; the receiver answers in this loop meanwhile.
        job_id, view, again, result = await asyncio.to_thread(
            killed_before_storing, upstream, redis_server, receiver.url()
        )
        (delivery,) = await receiver.wait_for(1)
        await asyncio.sleep(1.0)  # room for a wrong second delivery to show
    assert view["status"] == "completed"
    # Stored once: nothing but its webhook's delivery changed it after.
    assert {**again, "webhook": None} == {**view, "webhook": None}
    assert again["webhook"]["state"] == "delivered"
    assert result.status_code == 200
    assert result.json()["object"] == "chat.completion"
    # The job ended once, so its webhook was sent once, signed, with that one answer.
    assert len(receiver.received) == 1
    assert delivery.verified_with == (WEBHOOK_SECRET,)
    event = orjson.loads(delivery.body)
    assert event["type"] == "job.completed"
    assert event["data"]["id"] == job_id
    assert event["data"]["response"]["body"] == result.text


def killed_before_storing(
    upstream: FakeUpstream, redis_server: RedisServer, webhook: str
) -> tuple[str, dict[str, Any], dict[str, Any], httpx.Response]:
    marker = uuid.uuid4().hex
    headers, body = chat(marker, **{"x-fake-delay-ms": "300", "x-gateway-webhook-url": webhook})
    port = int(webhook.split(":")[2].split("/")[0])
    with (
        StallableRelay(redis_server.port) as relay,
        replica(upstream, relay.url, hook_port=port) as a,
    ):
        submitted = httpx.post(f"{a.url}/v1/chat/completions", headers=headers, json=body)
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        first = wait_for_call(upstream, marker)
        # From here on A's writes to Redis are held: the answer it is about to store, and the
        # renewals of its lease, never arrive.
        relay.stall()
        deadline = time.monotonic() + 5
        while first.completed_at is None and time.monotonic() < deadline:
            time.sleep(0.01)
            first = calls(upstream, marker)[0]
        assert first.completed_at is not None, "the upstream never finished its answer"
        time.sleep(0.1)
        a.signal(signal.SIGKILL)
        a.wait(5)
    with replica(upstream, redis_server.url, hook_port=port) as b:
        view = job_when_done_over_http(b.url, job_id, AUTH)
        time.sleep(LEASE * 1.5)  # time enough for any second claim to show
        again = httpx.get(f"{b.url}/v1/jobs/{job_id}", headers=AUTH).json()
        result = httpx.get(f"{b.url}/v1/jobs/{job_id}/result", headers=AUTH)
    # At-least-once: the answer A got was lost with A, so B asked again, once.
    assert len(calls(upstream, marker)) == 2
    return job_id, view, again, result


def test_a_running_job_cancelled_through_another_replica_closes_its_upstream_request(
    upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    marker = uuid.uuid4().hex
    headers, body = chat(marker, **{"x-fake-chunks": "100", "x-fake-interval-ms": "100"})
    body["stream"] = True
    with replica(upstream, redis_server.url) as a:
        submitted = httpx.post(f"{a.url}/v1/chat/completions", headers=headers, json=body)
        job_id = submitted.json()["id"]
        wait_for_call(upstream, marker)
        with replica(upstream, redis_server.url) as b:
            cancelled = httpx.delete(f"{b.url}/v1/jobs/{job_id}", headers=AUTH)
            view = job_when_done_over_http(b.url, job_id, AUTH)
        deadline = time.monotonic() + 5
        while calls(upstream, marker)[0].disconnected_at is None and time.monotonic() < deadline:
            time.sleep(0.02)
    assert cancelled.status_code == 200
    assert view["status"] == "cancelled"
    assert calls(upstream, marker)[0].disconnected_at is not None
    assert len(calls(upstream, marker)) == 1


def test_the_openai_sdk_submits_a_job_with_prefer_respond_async(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    marker = uuid.uuid4().hex
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": marker}
    ]
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=DEMO_KEY, max_retries=0) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(
            model="gpt-fake", messages=messages, extra_headers={"Prefer": "respond-async"}
        )
        direct = sdk.chat.completions.create(model="gpt-fake", messages=messages)
    assert raw.status_code == 202
    assert raw.headers["preference-applied"] == "respond-async"
    location = raw.headers["location"]
    job_id = location.rsplit("/", 1)[1]
    view = job_when_done_over_http(gateway.url, job_id, AUTH)
    assert view["status"] == "completed"
    result = httpx.get(f"{gateway.url}{location}/result", headers=AUTH)
    completion = openai.types.chat.ChatCompletion.model_validate(result.json())
    assert completion.choices[0].message.content == direct.choices[0].message.content
