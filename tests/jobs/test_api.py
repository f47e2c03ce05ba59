"""The jobs API in process (issue #13): submit, poll, fetch, cancel and list, on the in-process
store, with a stand-in upstream; the Redis store across replicas is tests/end_to_end/test_jobs.py.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import orjson
import pytest

from gateway.auth import hash_key
from gateway.config.loader import parse_config_text
from tests.support.jobs import job_when_done
from tests.support.standin import (
    Scripted,
    StandInUpstream,
    call,
    in_process_gateway,
    json_answer,
)
from tests.support.webhookreceiver import Reply, WebhookReceiver

KEY = "sk-gw-jobs-owner"
OTHER = "sk-gw-jobs-other"
TEAMMATE = "sk-gw-jobs-teammate"
SLOW = "sk-gw-jobs-slow"


def config(jobs: str = "{}", extra_keys: str = "") -> str:
    return f"""
upstreams:
  main: {{base_url: "http://upstream.test/v1", auth: {{style: bearer, key: sk-upstream-secret}}}}
routes:
  - name: chat
    path: /v1/chat/completions
    upstream: main
    validate: {{max_messages: 50}}
  - {{name: models, path: /v1/models, upstream: main, methods: [GET]}}
models:
  fast: {{upstream: main, model: small-model}}
allow_unlisted_models: true
keys:
  - {{name: owner, team: ml, hash: "{hash_key(KEY)}", models: [fast]}}
  - {{name: other, hash: "{hash_key(OTHER)}"}}
  - {{name: teammate, team: ml, hash: "{hash_key(TEAMMATE)}"}}
  - name: slow
    hash: "{hash_key(SLOW)}"
    limits: {{requests_per_minute: 600, request_burst: 1}}
{extra_keys}
jobs: {jobs}
"""


def auth(key: str = KEY, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}"), ("content-type", "application/json"), *extra]


ASYNC = ("prefer", "respond-async")
CHAT = orjson.dumps({"model": "fast", "messages": [{"role": "user", "content": "hi"}]})
ANSWER = {"id": "chatcmpl-1", "choices": [{"message": {"content": "héllo"}}]}


async def submit(app: Any, key: str = KEY, body: bytes = CHAT, *extra: tuple[str, str]) -> Any:
    return await call(
        app, "POST", "/v1/chat/completions", headers=auth(key, ASYNC, *extra), body=body
    )


async def test_prefer_respond_async_answers_202_with_location_and_preference_applied() -> None:
    upstream = StandInUpstream(lambda request: json_answer(ANSWER))
    async with in_process_gateway(config(), upstream) as app:
        answer = await submit(app)
        assert answer.status == 202, answer.body
        job = answer.json()
        assert job["id"].startswith("job_")
        assert job["status"] in ("queued", "in_progress", "completed")
        assert answer.headers["location"] == f"/v1/jobs/{job['id']}"
        assert answer.headers["preference-applied"] == "respond-async"
        assert answer.headers["content-type"] == "application/json"


async def test_a_job_runs_and_keeps_the_upstreams_answer_byte_for_byte() -> None:
    body = orjson.dumps(ANSWER) + b"\n"
    upstream = StandInUpstream(
        lambda request: Scripted(
            200,
            ((b"content-type", b"application/json"), (b"x-upstream-note", b"kept")),
            (body[:10], body[10:]),
        )
    )
    async with in_process_gateway(config(), upstream) as app:
        job = (await submit(app)).json()
        view = await job_when_done(app, job["id"], auth())
        assert view["status"] == "completed"
        assert view["attempts"] == 1
        assert view["response"]["status_code"] == 200
        assert view["response"]["body"].encode("utf-8") == body
        assert view["response"]["headers"]["x-upstream-note"] == "kept"
        assert view["finished_at"] >= view["started_at"] >= view["created_at"]
        raw = await call(app, "GET", f"/v1/jobs/{job['id']}/result", headers=auth())
        assert raw.status == 200
        assert raw.body == body
        assert raw.headers["x-upstream-note"] == "kept"
        assert raw.headers["x-gateway-job-id"] == job["id"]
    (sent,) = upstream.requests
    # Admitted as the synchronous request is: the alias resolved, the upstream's own key sent.
    assert orjson.loads(sent.body)["model"] == "small-model"
    assert ("authorization", "Bearer sk-upstream-secret") in [
        (name.lower(), value) for name, value in sent.headers
    ]
    assert not any(KEY in value for _, value in sent.headers)


async def test_a_streamed_answer_is_kept_as_the_upstreams_bytes() -> None:
    events = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b"data: [DONE]\n\n"]
    upstream = StandInUpstream(
        lambda request: Scripted(200, ((b"content-type", b"text/event-stream"),), events)
    )
    stream = orjson.dumps({"model": "fast", "messages": [{"role": "user"}], "stream": True})
    async with in_process_gateway(config(), upstream) as app:
        job = (await submit(app, KEY, stream)).json()
        view = await job_when_done(app, job["id"], auth())
        raw = await call(app, "GET", f"/v1/jobs/{job['id']}/result", headers=auth())
    assert view["status"] == "completed"
    assert raw.body == b"".join(events)
    assert raw.headers["content-type"] == "text/event-stream"


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ([("content-type", "application/json"), ASYNC], CHAT, 401, "missing_api_key"),
        (auth("sk-gw-nobody", ASYNC), CHAT, 401, "invalid_api_key"),
        (auth(KEY, ASYNC), CHAT.replace(b"fast", b"gpt-4o"), 403, None),
        (auth(KEY, ASYNC), orjson.dumps({"model": "fast"}), 400, None),
    ],
    ids=["no key", "unknown key", "model not allowed", "request rules"],
)
async def test_a_submission_is_refused_as_the_synchronous_request_would_be(
    headers: list[tuple[str, str]], body: bytes, status: int, code: str | None
) -> None:
    upstream = StandInUpstream(lambda request: json_answer(ANSWER))
    async with in_process_gateway(config(), upstream) as app:
        sync = await call(
            app,
            "POST",
            "/v1/chat/completions",
            headers=[h for h in headers if h != ASYNC],
            body=body,
        )
        answer = await call(app, "POST", "/v1/chat/completions", headers=headers, body=body)
        listed = await call(app, "GET", "/v1/jobs", headers=auth())
    assert answer.status == sync.status == status
    assert answer.json() == sync.json()
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code
    assert listed.json()["data"] == []
    # Only the synchronous twin of an accepted request could have reached the upstream.
    assert upstream.requests == []


async def test_post_v1_jobs_submits_the_request_its_body_describes() -> None:
    upstream = StandInUpstream(lambda request: json_answer(ANSWER))
    envelope = {
        "method": "POST",
        "path": "/v1/chat/completions",
        "body": {"model": "fast", "messages": [{"role": "user", "content": "hi"}]},
        "metadata": {"batch": "nightly-7"},
    }
    async with in_process_gateway(config(), upstream) as app:
        answer = await call(app, "POST", "/v1/jobs", headers=auth(), body=orjson.dumps(envelope))
        assert answer.status == 202, answer.body
        job = answer.json()
        assert job["metadata"] == {"batch": "nightly-7"}
        assert job["request"] == {"method": "POST", "path": "/v1/chat/completions"}
        view = await job_when_done(app, job["id"], auth())
    assert view["status"] == "completed"
    assert orjson.loads(upstream.requests[0].body)["messages"][0]["content"] == "hi"


@pytest.mark.parametrize(
    ("envelope", "param"),
    [
        ([], None),
        ({"path": "v1/chat"}, "path"),
        ({"path": "/v1/chat/completions", "method": "post"}, "method"),
        ({"path": "/v1/jobs"}, "path"),
        ({"path": "/v1/chat/completions", "colour": "red"}, "colour"),
        ({"path": "/v1/chat/completions", "metadata": {"k": 1}}, "metadata.k"),
        (
            {"path": "/v1/chat/completions", "metadata": {str(i): "v" for i in range(17)}},
            "metadata",
        ),
        ({"path": "/v1/chat/completions", "webhook": "http://x"}, "webhook"),
    ],
    ids=[
        "not an object",
        "relative path",
        "lower-case method",
        "jobs calling jobs",
        "unknown field",
        "metadata value",
        "too much metadata",
        "webhook not an object",
    ],
)
async def test_a_malformed_job_is_refused_with_the_field_named(
    envelope: object, param: str | None
) -> None:
    upstream = StandInUpstream(lambda request: json_answer(ANSWER))
    async with in_process_gateway(config(), upstream) as app:
        answer = await call(app, "POST", "/v1/jobs", headers=auth(), body=orjson.dumps(envelope))
    assert answer.status == 400
    assert answer.json()["error"]["param"] == param
    assert answer.json()["error"]["code"] == "invalid_job"


async def test_only_the_owner_sees_a_job_and_others_get_the_unknown_ids_404() -> None:
    upstream = StandInUpstream(lambda request: json_answer(ANSWER))
    async with in_process_gateway(config(), upstream) as app:
        job = (await submit(app)).json()
        await job_when_done(app, job["id"], auth())
        for key in (OTHER, TEAMMATE):
            for method, path in (
                ("GET", f"/v1/jobs/{job['id']}"),
                ("GET", f"/v1/jobs/{job['id']}/result"),
                ("DELETE", f"/v1/jobs/{job['id']}"),
                ("POST", f"/v1/jobs/{job['id']}/cancel"),
            ):
                answer = await call(app, method, path, headers=auth(key))
                unknown = await call(
                    app, method, path.replace(job["id"], "job_x"), headers=auth(key)
                )
                assert answer.status == 404, (key, method, path)
                assert answer.json() == {
                    "error": {
                        **unknown.json()["error"],
                        "message": answer.json()["error"]["message"],
                    }
                }
                assert answer.json()["error"]["code"] == "job_not_found"
            listed = await call(app, "GET", "/v1/jobs", headers=auth(key))
            assert listed.json()["data"] == []
        nobody = await call(app, "GET", f"/v1/jobs/{job['id']}")
        assert nobody.status == 401


async def test_with_team_visibility_the_teams_keys_see_the_job() -> None:
    upstream = StandInUpstream(lambda request: json_answer(ANSWER))
    async with in_process_gateway(config("{visibility: team}"), upstream) as app:
        job = (await submit(app)).json()
        seen = await call(app, "GET", f"/v1/jobs/{job['id']}", headers=auth(TEAMMATE))
        listed = await call(app, "GET", "/v1/jobs", headers=auth(TEAMMATE))
        hidden = await call(app, "GET", f"/v1/jobs/{job['id']}", headers=auth(OTHER))
    assert seen.status == 200
    assert [j["id"] for j in listed.json()["data"]] == [job["id"]]
    assert hidden.status == 404


async def test_the_same_idempotency_key_returns_the_same_job() -> None:
    upstream = StandInUpstream(lambda request: json_answer(ANSWER))
    async with in_process_gateway(config(), upstream) as app:
        once = ("idempotency-key", "order-1234")
        first = (await submit(app, KEY, CHAT, once)).json()
        second = (await submit(app, KEY, CHAT, once)).json()
        other_key = (await submit(app, TEAMMATE, CHAT.replace(b"fast", b"gpt-x"), once)).json()
        changed = await submit(app, KEY, CHAT.replace(b"hi", b"bye"), once)
        await job_when_done(app, first["id"], auth())
        assert second["id"] == first["id"]
        assert other_key["id"] != first["id"]  # keys are per caller
        assert changed.status == 422
        assert changed.json()["error"]["code"] == "idempotency_key_reused"
    assert len([r for r in upstream.requests if b"small-model" in r.body]) == 1


async def test_cancel_of_a_queued_job_means_it_never_runs() -> None:
    upstream = StandInUpstream(lambda request: Scripted(head_delay=0.3))
    async with in_process_gateway(config("{concurrency: 1}"), upstream) as app:
        first, held, queued = [(await submit(app)).json() for _ in range(3)]
        await asyncio.sleep(0.05)
        # One job runs; the process holds one more, taken and waiting for the running slot;
        # the third is still in the queue. Neither of the last two may ever run.
        for job in (queued, held):
            cancelled = await call(app, "DELETE", f"/v1/jobs/{job['id']}", headers=auth())
            assert cancelled.status == 200
            assert cancelled.json()["status"] == "cancelled"
            assert "retry-after" not in cancelled.headers
        done = await job_when_done(app, first["id"], auth())
        await asyncio.sleep(0.4)
        after = [
            (await call(app, "GET", f"/v1/jobs/{job['id']}", headers=auth())).json()
            for job in (queued, held)
        ]
    assert done["status"] == "completed"
    assert [view["status"] for view in after] == ["cancelled", "cancelled"]
    assert after[0]["attempts"] == 0
    assert len(upstream.requests) == 1


async def test_cancel_of_a_running_job_closes_its_upstream_request() -> None:
    upstream = StandInUpstream(
        lambda request: Scripted(chunks=[b"data: 1\n\n"] * 50, chunk_delay=0.1)
    )
    async with in_process_gateway(config(), upstream) as app:
        job = (await submit(app)).json()
        for _ in range(100):
            if upstream.responses:
                break
            await asyncio.sleep(0.01)
        answer = await call(app, "POST", f"/v1/jobs/{job['id']}/cancel", headers=auth())
        view = await job_when_done(app, job["id"], auth())
    assert answer.status == 200
    assert view["status"] == "cancelled"
    assert view["error"]["code"] == "cancelled"
    (response,) = upstream.responses
    assert response.closed or response.released


async def test_list_is_newest_first_a_page_at_a_time_with_a_status_filter() -> None:
    upstream = StandInUpstream(lambda request: json_answer(ANSWER))
    async with in_process_gateway(config(), upstream) as app:
        ids = [(await submit(app)).json()["id"] for _ in range(5)]
        for job_id in ids:
            await job_when_done(app, job_id, auth())
        first = (await call(app, "GET", "/v1/jobs?limit=2", headers=auth())).json()
        second = (
            await call(app, "GET", f"/v1/jobs?limit=2&after={first['last_id']}", headers=auth())
        ).json()
        failed = (await call(app, "GET", "/v1/jobs?status=failed", headers=auth())).json()
        bad = await call(app, "GET", "/v1/jobs?status=done", headers=auth())
        too_many = await call(app, "GET", "/v1/jobs?limit=1000", headers=auth())
    assert first["object"] == "list"
    # A page names each answer's status; its body is the job's own GET.
    assert first["data"][0]["response"]["status_code"] == 200
    assert "body" not in first["data"][0]["response"]
    assert [j["id"] for j in first["data"]] == ids[::-1][:2]
    assert first["has_more"] is True
    assert [j["id"] for j in second["data"]] == ids[::-1][2:4]
    assert failed["data"] == []
    assert failed["has_more"] is False
    assert bad.status == too_many.status == 400
    assert bad.json()["error"]["param"] == "status"


async def test_a_queued_job_waits_for_limit_capacity_instead_of_failing() -> None:
    arrivals: list[float] = []

    def respond(request: Any) -> Scripted:
        arrivals.append(time.monotonic())
        return json_answer(ANSWER)

    upstream = StandInUpstream(respond)
    async with in_process_gateway(config(), upstream) as app:
        # 600 a minute, a burst of 1: one request every 100 ms for this key.
        body = CHAT.replace(b"fast", b"gpt-x")
        ids = [(await submit(app, SLOW, body)).json()["id"] for _ in range(4)]
        await asyncio.sleep(0.02)
        # The limit is real: a synchronous request meanwhile gets the 429 at once.
        sync = await call(app, "POST", "/v1/chat/completions", headers=auth(SLOW), body=body)
        views = [await job_when_done(app, job_id, auth(SLOW)) for job_id in ids]
    assert sync.status == 429
    assert [v["status"] for v in views] == ["completed"] * 4
    assert len(upstream.requests) == 4
    # They waited for their turns: about 100 ms apart at the upstream, none refused.
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(gap >= 0.08 for gap in gaps), gaps


async def test_a_job_no_wait_can_admit_fails_with_the_limits_answer_and_blocks_nobody() -> None:
    upstream = StandInUpstream(lambda request: json_answer(ANSWER))
    tiny = f"""
  - name: tiny
    hash: "{hash_key("sk-gw-jobs-tiny")}"
    limits: {{tokens_per_minute: 100}}
"""
    async with in_process_gateway(config("{concurrency: 1}", tiny), upstream) as app:
        huge = orjson.dumps({"model": "gpt-x", "messages": [{"role": "user"}], "max_tokens": 5000})
        job = (await submit(app, "sk-gw-jobs-tiny", huge)).json()
        other = (await submit(app, TEAMMATE, CHAT.replace(b"fast", b"gpt-x"))).json()
        view = await job_when_done(app, job["id"], auth("sk-gw-jobs-tiny"), timeout=3)
        done = await job_when_done(app, other["id"], auth(TEAMMATE), timeout=3)
    assert view["status"] == "failed"
    assert view["response"]["status_code"] == 429
    assert "Request too large" in view["error"]["message"]
    assert done["status"] == "completed"
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status"),
    [
        ("POST", "/v1/chat/completions", [ASYNC, ("prefer", "wait=\u00b2")], CHAT, 202),
        ("GET", "/v1/jobs?limit=%C2%B2", [], b"", 400),
        ("GET", "/v1/jobs?limit=99999999999999999999", [], b"", 400),
        (
            "POST",
            "/v1/chat/completions",
            [ASYNC, ("x-gateway-webhook-url", "https://[]@")],
            CHAT,
            400,
        ),
        ("POST", "/v1/jobs", [], b'{"path": "/v1/chat/completions", "method": "\\u00c0B"}', 400),
        (
            "POST",
            "/v1/jobs",
            [],
            b'{"path": "/v1/chat/completions", "webhook": {"url": "https://[]@"}}',
            400,
        ),
        ("POST", "/v1/jobs", [], b"[1, 2", 400),
        ("GET", "/v1/jobs/" + "x" * 200, [], b"", 404),
        ("PUT", "/v1/jobs/job_x", [], b"", 405),
        ("GET", "/v1/jobs/job_x/other", [], b"", 404),
    ],
)
async def test_bad_input_to_the_jobs_api_gets_a_4xx_never_a_500(
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes,
    status: int,
) -> None:
    monkeypatch.setenv("GATEWAY_WEBHOOK_SECRET", WEBHOOK_SECRET)
    upstream = StandInUpstream(lambda request: json_answer(ANSWER))
    async with in_process_gateway(config(), upstream) as app:
        answer = await call(app, method, path, headers=[*auth(), *headers], body=body)
    assert answer.status == status, answer.body
    if status >= 400:
        assert set(answer.json()["error"]) == {"message", "type", "param", "code"}


async def test_post_v1_jobs_applies_no_preference_it_was_not_asked_for() -> None:
    upstream = StandInUpstream(lambda request: json_answer(ANSWER))
    envelope = {"path": "/v1/chat/completions", "body": orjson.loads(CHAT)}
    async with in_process_gateway(config(), upstream) as app:
        answer = await call(app, "POST", "/v1/jobs", headers=auth(), body=orjson.dumps(envelope))
    assert answer.status == 202
    assert "preference-applied" not in answer.headers
    assert answer.headers["location"].startswith("/v1/jobs/job_")


async def test_prefer_wait_answers_with_the_answer_when_the_job_ends_in_time() -> None:
    upstream = StandInUpstream(lambda request: json_answer(ANSWER))
    async with in_process_gateway(config(), upstream) as app:
        answer = await call(
            app,
            "POST",
            "/v1/chat/completions",
            headers=auth(KEY, ("prefer", "respond-async, wait=5")),
            body=CHAT,
        )
    assert answer.status == 200
    assert answer.json() == ANSWER
    assert answer.headers["x-gateway-job-id"].startswith("job_")


async def test_an_upstream_error_fails_the_job_and_keeps_its_answer() -> None:
    error = {
        "error": {
            "message": "context too long",
            "type": "invalid_request_error",
            "param": None,
            "code": "context_length_exceeded",
        }
    }
    upstream = StandInUpstream(lambda request: json_answer(error, 400))
    async with in_process_gateway(config(), upstream) as app:
        job = (await submit(app)).json()
        view = await job_when_done(app, job["id"], auth())
    assert view["status"] == "failed"
    assert view["error"] == {"code": "context_length_exceeded", "message": "context too long"}
    assert orjson.loads(view["response"]["body"]) == error
    assert view["response"]["status_code"] == 400


async def test_an_answer_larger_than_the_bound_fails_the_job() -> None:
    upstream = StandInUpstream(lambda request: Scripted(chunks=[b"x" * 1024] * 3))
    async with in_process_gateway(config("{max_result_bytes: 2048}"), upstream) as app:
        job = (await submit(app)).json()
        view = await job_when_done(app, job["id"], auth())
    assert view["status"] == "failed"
    assert view["error"]["code"] == "result_too_large"


async def test_running_jobs_never_exceed_the_concurrency_bounds() -> None:
    upstream = StandInUpstream(lambda request: Scripted(chunks=[b"{}"], head_delay=0.05))
    most: dict[str, int] = {"all": 0, "owner": 0}

    def in_flight(owner_only: bool) -> int:
        finished = sum(
            1
            for response in upstream.responses
            if (response.closed or response.released)
            and (not owner_only or (response.request and b"small-model" in response.request.body))
        )
        sent = sum(1 for r in upstream.requests if not owner_only or b"small-model" in r.body)
        return sent - finished

    async def sample() -> None:
        while True:
            most["all"] = max(most["all"], in_flight(False))
            most["owner"] = max(most["owner"], in_flight(True))
            await asyncio.sleep(0.005)

    jobs = "{concurrency: 3, per_key_concurrency: 2}"
    async with in_process_gateway(config(jobs), upstream) as app:
        sampler = asyncio.ensure_future(sample())
        ids = [(await submit(app)).json()["id"] for _ in range(8)]
        teammate = CHAT.replace(b"fast", b"gpt-x")
        ids += [(await submit(app, TEAMMATE, teammate)).json()["id"] for _ in range(4)]
        views = [await job_when_done(app, job_id, auth(TEAMMATE)) for job_id in ids[8:]]
        views += [await job_when_done(app, job_id, auth()) for job_id in ids[:8]]
        sampler.cancel()
    assert [v["status"] for v in views] == ["completed"] * 12
    assert most["all"] == 3
    assert most["owner"] == 2


async def test_with_jobs_disabled_the_preference_is_ignored() -> None:
    upstream = StandInUpstream(lambda request: json_answer(ANSWER))
    async with in_process_gateway(config("{enabled: false}"), upstream) as app:
        answer = await submit(app)
        listed = await call(app, "GET", "/v1/jobs", headers=auth())
    # RFC 7240 §2: a preference the server does not support is ignored, never an error.
    assert answer.status == 200
    assert answer.json() == ANSWER
    assert listed.status == 404


async def test_a_job_keeps_no_credential_of_its_caller() -> None:
    upstream = StandInUpstream(lambda request: json_answer(ANSWER))
    async with in_process_gateway(config(), upstream) as app:
        job = (await submit(app, KEY, CHAT, ("cookie", "session=abc"))).json()
        assert app.jobs is not None
        stored = await app.jobs.store.get(job["id"])
    assert stored is not None
    names = {name for name, _ in stored.request.headers}
    assert b"authorization" not in names
    assert b"cookie" not in names
    assert KEY.encode() not in stored.dumps()
    assert stored.owner == "owner"


# -- webhooks through the whole gateway --------------------------------------------------------

WEBHOOK_SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def hooked_config(port: int, schedule: str = "[0, 0.2, 0.2]") -> str:
    hooked_key = f"""
  - name: hooked
    hash: "{hash_key("sk-gw-jobs-hooked")}"
    webhook_hosts: ["127.0.0.1:{port}"]
"""
    return config(f"{{webhooks: {{schedule: {schedule}, timeout: 2}}}}", hooked_key)


HOOKED = "sk-gw-jobs-hooked"


async def envelope_with_webhook(app: Any, key: str, url: str) -> Any:
    envelope = {
        "path": "/v1/chat/completions",
        "body": orjson.loads(CHAT),
        "webhook": {"url": url},
    }
    return await call(app, "POST", "/v1/jobs", headers=auth(key), body=orjson.dumps(envelope))


async def test_a_job_with_a_webhook_is_refused_without_a_signing_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GATEWAY_WEBHOOK_SECRET", raising=False)
    upstream = StandInUpstream(lambda request: json_answer(ANSWER))
    async with in_process_gateway(hooked_config(9), upstream) as app:
        answer = await envelope_with_webhook(app, HOOKED, "http://127.0.0.1:9/hook")
    assert answer.status == 400
    assert answer.json()["error"]["code"] == "webhooks_not_configured"


@pytest.mark.parametrize(
    ("key", "url"),
    [
        (KEY, "http://169.254.169.254/latest/meta-data/"),
        (KEY, "https://127.0.0.1/hook"),
        (KEY, "https://[::ffff:127.0.0.1]/hook"),
        (KEY, "http://hooks.example.com/hook"),
        (HOOKED, "http://127.0.0.1:1/hook"),
        (KEY, "ftp://hooks.example.com/hook"),
    ],
    ids=["metadata", "loopback via *", "mapped loopback", "plain http via *", "other port", "ftp"],
)
async def test_a_webhook_to_an_internal_or_unlisted_address_is_refused_at_submission(
    monkeypatch: pytest.MonkeyPatch, key: str, url: str
) -> None:
    monkeypatch.setenv("GATEWAY_WEBHOOK_SECRET", WEBHOOK_SECRET)
    upstream = StandInUpstream(lambda request: json_answer(ANSWER))
    async with in_process_gateway(hooked_config(9), upstream) as app:
        answer = await envelope_with_webhook(app, key, url)
        listed = await call(app, "GET", "/v1/jobs", headers=auth(key))
    assert answer.status == 400, answer.body
    assert answer.json()["error"]["code"] == "webhook_url"
    assert answer.json()["error"]["param"] == "webhook.url"
    assert listed.json()["data"] == []
    assert upstream.requests == []


async def test_a_finished_job_calls_its_webhook_signed_and_retried_until_it_succeeds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GATEWAY_WEBHOOK_SECRET", WEBHOOK_SECRET)
    upstream = StandInUpstream(lambda request: json_answer(ANSWER))
    async with WebhookReceiver([WEBHOOK_SECRET]) as receiver:
        receiver.script(Reply(500), Reply(500), Reply(200))
        async with in_process_gateway(hooked_config(receiver.port), upstream) as app:
            submitted = await envelope_with_webhook(app, HOOKED, receiver.url())
            assert submitted.status == 202, submitted.body
            job_id = submitted.json()["id"]
            received = await receiver.wait_for(3)
            await asyncio.sleep(0.5)  # room for a wrong fourth delivery to show
            view = (await call(app, "GET", f"/v1/jobs/{job_id}", headers=auth(HOOKED))).json()
    assert len(receiver.received) == 3
    assert all(request.verified_with == (WEBHOOK_SECRET,) for request in received)
    assert len({request.headers["webhook-id"] for request in received}) == 1
    event = orjson.loads(received[-1].body)
    assert event["type"] == "job.completed"
    assert event["data"]["id"] == job_id
    assert orjson.loads(event["data"]["response"]["body"]) == ANSWER
    assert view["webhook"]["state"] == "delivered"
    assert [d["status"] for d in view["webhook"]["deliveries"]] == [500, 500, 200]


async def test_metrics_count_jobs_submitted_finished_and_queued() -> None:
    upstream = StandInUpstream(lambda request: json_answer(ANSWER))
    async with in_process_gateway(config(), upstream) as app:
        ids = [(await submit(app)).json()["id"] for _ in range(3)]
        for job_id in ids:
            await job_when_done(app, job_id, auth())
        text = (await call(app, "GET", "/metrics")).body.decode()
    assert "gateway_jobs_submitted_total 3.0" in text
    assert 'gateway_jobs_finished_total{status="completed"} 3.0' in text
    assert "gateway_jobs_running 0.0" in text
    assert "gateway_jobs_queued 0.0" in text


async def test_the_webhook_header_on_the_prefer_path_is_checked_like_the_body_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GATEWAY_WEBHOOK_SECRET", WEBHOOK_SECRET)
    upstream = StandInUpstream(lambda request: json_answer(ANSWER))
    async with in_process_gateway(hooked_config(9), upstream) as app:
        hook = ("x-gateway-webhook-url", "http://169.254.169.254/")
        refused = await submit(app, HOOKED, CHAT.replace(b"fast", b"gpt-x"), hook)
        allowed = await submit(
            app,
            HOOKED,
            CHAT.replace(b"fast", b"gpt-x"),
            ("x-gateway-webhook-url", "http://127.0.0.1:9/h"),
        )
    assert refused.status == 400
    assert refused.json()["error"]["code"] == "webhook_url"
    assert allowed.status == 202
    assert allowed.json()["webhook"]["url"] == "http://127.0.0.1:9/h"


async def test_a_job_whose_key_was_removed_before_it_ran_fails_as_unauthorised() -> None:
    upstream = StandInUpstream(lambda request: json_answer(ANSWER))
    async with in_process_gateway(config("{concurrency: 1}"), upstream) as app:
        upstream.respond = lambda request: Scripted(head_delay=0.3)
        blocker = (await submit(app, TEAMMATE, CHAT.replace(b"fast", b"gpt-x"))).json()
        waiting = (await submit(app)).json()
        third = (await submit(app)).json()
        without_owner = parse_config_text(
            config("{concurrency: 1}").replace("name: owner", "name: gone")
        )
        await app.apply(without_owner)
        await job_when_done(app, blocker["id"], auth(TEAMMATE))
        assert app.jobs is not None
        stored = [await app.jobs.store.get(job["id"]) for job in (waiting, third)]
    assert [job.status.value for job in stored if job is not None] == ["failed", "failed"]
    assert all(job is not None and job.error is not None for job in stored)
    assert {job.error.code for job in stored if job is not None and job.error} == {
        "invalid_api_key"
    }
    assert len(upstream.requests) == 1


async def test_a_key_with_too_many_unfinished_jobs_gets_a_429_and_the_rest_are_unaffected() -> None:
    upstream = StandInUpstream(lambda request: Scripted(head_delay=0.5))
    async with in_process_gateway(
        config("{max_queued_per_key: 2, concurrency: 1}"), upstream
    ) as app:
        accepted = [await submit(app) for _ in range(2)]
        refused = await submit(app)
        again = await submit(app, KEY, CHAT, ("idempotency-key", "k-1"))
        other = await submit(app, TEAMMATE, CHAT.replace(b"fast", b"gpt-x"))
    assert [a.status for a in accepted] == [202, 202]
    assert refused.status == again.status == 429
    assert refused.json()["error"]["code"] == "too_many_jobs"
    assert refused.headers["retry-after"] == "5"
    assert other.status == 202


async def test_a_key_whose_budget_is_spent_is_refused_at_submission_as_synchronously() -> None:
    thrifty = f"""
  - name: thrifty
    hash: "{hash_key("sk-gw-jobs-thrifty")}"
    limits: {{budget: {{usd_per_day: 0.0001}}}}
prices:
  models:
    gpt-x: {{input: 1, output: 10}}
"""
    usage = {
        **ANSWER,
        "usage": {"prompt_tokens": 1, "completion_tokens": 1000, "total_tokens": 1001},
    }
    upstream = StandInUpstream(lambda request: json_answer(usage))
    body = orjson.dumps({"model": "gpt-x", "messages": [{"role": "user"}], "max_tokens": 1})
    async with in_process_gateway(config("{}", thrifty), upstream) as app:
        key = "sk-gw-jobs-thrifty"
        first = await call(app, "POST", "/v1/chat/completions", headers=auth(key), body=body)
        # 1,000 output tokens at $10/M: $0.01 spent of a $0.0001 budget.
        sync = await call(app, "POST", "/v1/chat/completions", headers=auth(key), body=body)
        job = await submit(app, key, body)
        listed = await call(app, "GET", "/v1/jobs", headers=auth(key))
        # Where the synchronous request meets no budget (a model without a price), neither
        # does the job: it is taken.
        unpriced = body.replace(b"gpt-x", b"gpt-free")
        sync_free = await call(
            app, "POST", "/v1/chat/completions", headers=auth(key), body=unpriced
        )
        job_free = await submit(app, key, unpriced)
    assert first.status == 200
    assert sync.status == job.status == 429
    assert job.json()["error"]["code"] == sync.json()["error"]["code"] == "budget_exceeded"
    assert listed.json()["data"] == []
    assert sync_free.status == 200
    assert job_free.status == 202
