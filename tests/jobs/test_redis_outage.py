"""Jobs when their Redis goes away and comes back: synchronous traffic goes on, the jobs API
answers 503 in OpenAI's shape (never a 500), the workers say so once, and jobs run again once
Redis is back (a Redis without persistence comes back empty: the queue is made anew)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import orjson
import pytest

from gateway.auth import hash_key
from tests.support.jobs import job_when_done
from tests.support.redisserver import RedisServer
from tests.support.standin import Scripted, StandInUpstream, call, in_process_gateway, json_answer

KEY = "sk-gw-jobs-outage"
AUTH = [("authorization", f"Bearer {KEY}"), ("content-type", "application/json")]
ASYNC = ("prefer", "respond-async")
BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})


def config(redis_url: str) -> str:
    return f"""
upstreams:
  main: {{base_url: "http://upstream.test/v1"}}
routes:
  - {{name: chat, path: /v1/chat/completions, upstream: main}}
allow_unlisted_models: true
keys:
  - {{name: owner, hash: "{hash_key(KEY)}"}}
redis: {{url: "{redis_url}", timeout_ms: 200}}
jobs: {{lease: 1, shutdown_grace: 0}}
"""


async def test_a_redis_outage_is_a_503_for_jobs_and_nothing_for_synchronous_requests(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    upstream = StandInUpstream(lambda request: json_answer({"ok": True}))
    try:
        async with in_process_gateway(config(server.url), upstream) as app:
            before = await call(
                app, "POST", "/v1/chat/completions", headers=[*AUTH, ASYNC], body=BODY
            )
            assert before.status == 202
            await job_when_done(app, before.json()["id"], AUTH)

            server.stop()
            caplog.clear()
            sync = await call(app, "POST", "/v1/chat/completions", headers=AUTH, body=BODY)
            submitted = await call(
                app, "POST", "/v1/chat/completions", headers=[*AUTH, ASYNC], body=BODY
            )
            polled = await call(app, "GET", f"/v1/jobs/{before.json()['id']}", headers=AUTH)
            await asyncio.sleep(3)  # the workers fail to take, over and over
            taking = [r for r in caplog.records if "taking a job" in r.getMessage()]

            server = RedisServer(tmp_path / "redis", server.port)
            server.start()
            await asyncio.sleep(1.5)
            after = await call(
                app, "POST", "/v1/chat/completions", headers=[*AUTH, ASYNC], body=BODY
            )
            assert after.status == 202, after.body
            view = await job_when_done(app, after.json()["id"], AUTH, timeout=15)
    finally:
        server.stop()
    assert sync.status == 200  # the limits fall back; the relay never needed Redis
    for answer in (submitted, polled):
        assert answer.status == 503, answer.body
        assert answer.json()["error"]["code"] == "jobs_unavailable"
        assert answer.headers["retry-after"] == "1"
    assert len(taking) == 1  # said once, not every second
    assert taking[0].levelno == logging.ERROR
    assert view["status"] == "completed"


async def test_a_store_lost_while_prefer_wait_waits_still_answers_202_with_the_job(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    upstream = StandInUpstream(lambda request: Scripted(head_delay=5.0))
    try:
        async with in_process_gateway(config(server.url), upstream) as app:
            waiting = asyncio.ensure_future(
                call(
                    app,
                    "POST",
                    "/v1/chat/completions",
                    headers=[*AUTH, ("prefer", "respond-async, wait=3")],
                    body=BODY,
                )
            )
            await asyncio.sleep(0.5)  # submitted, and waiting for the job's end
            server.stop()
            answer = await waiting
    finally:
        server.stop()
    # The job exists: its id comes back, so that the client does not submit it again.
    assert answer.status == 202, answer.body
    assert answer.json()["id"].startswith("job_")
