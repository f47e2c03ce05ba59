"""Usage accounting and budgets through the whole pipeline, in process (no Redis).

A stand-in upstream (``tests/support/standin.py``) answers each request with the usage the test
asks for in an ``x-test-usage: prompt,cached,completion`` header (a stream with its final
usage chunk when the request streams with ``include_usage``), so every count and cost below is
computed from what the upstream reported. ``tests/end_to_end/test_usage_and_budgets.py`` does
the same with four gateway processes and a real Redis.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from gateway.app import Gateway
from gateway.auth import hash_key
from gateway.limits import LocalLimiter
from gateway.upstream.seam import OutboundRequest, UpstreamConnectError
from tests.support.admin import ADMIN_HEADERS, ADMIN_SECTION
from tests.support.standin import Scripted, StandInUpstream, call, in_process_gateway

# Micro-dollars per token (= USD per million tokens): (input, cached input, output).
PRICES = {"gpt-4o": (2.5, 1.25, 10.0), "small-v2": (0.5, 0.5, 1.5)}
SECRETS = {
    name: f"sk-gw-accounting-{name}-0123456789" for name in ("solo", "alice", "bob", "tight")
}
CONFIG = f"""
server: {{access_log: false}}
upstreams:
  main: {{base_url: http://upstream.test/v1}}
routes:
  - {{name: chat, path: /v1/chat/completions, upstream: main}}
models:
  fast: {{upstream: main, model: small-v2}}
allow_unlisted_models: true
prices:
  models:
    gpt-4o: {{input: 2.5, cached_input: 1.25, output: 10}}
    small-v2: {{input: 0.5, output: 1.5}}
keys:
  - {{name: solo, hash: {hash_key(SECRETS["solo"])}}}
  - name: alice
    team: ml
    hash: {hash_key(SECRETS["alice"])}
    limits: {{requests_per_minute: 0, request_burst: 100, budget: {{usd_per_day: 0.05}}}}
  - {{name: bob, team: ml, hash: {hash_key(SECRETS["bob"])}}}
  - name: tight
    hash: {hash_key(SECRETS["tight"])}
    limits: {{requests_per_minute: 0, request_burst: 1, budget: {{usd_per_day: 1}}}}
limits:
  teams:
    ml: {{budget: {{usd_per_month: 0.2}}}}
{ADMIN_SECTION}"""


def respond(request: OutboundRequest) -> Scripted:
    headers = dict(request.headers)
    body = orjson.loads(bytes(request.body))
    if "x-test-status" in headers:
        status = int(headers["x-test-status"])
        return Scripted(status, chunks=(b'{"error": {"message": "no"}}',))
    prompt, cached, completion = (int(n) for n in headers.get("x-test-usage", "0,0,0").split(","))
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    if body.get("stream"):
        events = [b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n']
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return Scripted(
            headers=((b"content-type", b"text/event-stream"),),
            chunks=tuple(events),
            cut_after=1 if "x-test-cut" in headers else None,
        )
    return Scripted(chunks=(orjson.dumps({"id": "chatcmpl-1", "usage": usage}),))


def cost(model: str, prompt: int, cached: int, completion: int) -> int:
    fresh, cached_price, out = PRICES[model]
    return math.ceil((prompt - cached) * fresh + cached * cached_price + completion * out)


@pytest.fixture
def upstream() -> StandInUpstream:
    return StandInUpstream(respond)


@pytest.fixture
async def gateway(upstream: StandInUpstream) -> AsyncIterator[Gateway]:
    async with in_process_gateway(CONFIG, upstream) as app:
        yield app


async def chat(
    gateway: Gateway,
    key: str,
    model: str,
    usage: tuple[int, int, int] = (0, 0, 0),
    *,
    extra: tuple[tuple[str, str], ...] = (),
    **body: Any,
) -> Any:
    headers = [
        ("authorization", f"Bearer {SECRETS[key]}"),
        ("content-type", "application/json"),
        ("x-test-usage", ",".join(map(str, usage))),
        *extra,
    ]
    document = {"model": model, "messages": [{"role": "user", "content": "hello"}], **body}
    return await call(
        gateway, "POST", "/v1/chat/completions", headers=headers, body=orjson.dumps(document)
    )


async def usage(gateway: Gateway, query: str = "") -> dict[str, Any]:
    answer = await call(gateway, "GET", "/admin/usage" + query, headers=list(ADMIN_HEADERS.items()))
    assert answer.status == 200, answer.body
    document: dict[str, Any] = answer.json()
    return document


def budget(report: dict[str, Any], owner: str, name: str, period: str) -> dict[str, Any]:
    for line in report["budgets"]:
        if (line["owner"], line["name"], line["period"]) == (owner, name, period):
            found: dict[str, Any] = line
            return found
    raise AssertionError(f"no {period} budget of {owner} {name}")


def counts(
    requests: int, prompt: int, cached: int, out: int, micro: int, **more: int
) -> dict[str, Any]:
    return {
        "requests": requests,
        "input_tokens": prompt,
        "cached_input_tokens": cached,
        "output_tokens": out,
        "cost_usd": round(micro / 1_000_000, 6),
        "cost_micro_usd": micro,
        "unpriced_requests": more.get("unpriced", 0),
        "requests_without_usage": more.get("nousage", 0),
    }


async def test_every_request_is_counted_per_key_team_and_model(gateway: Gateway) -> None:
    assert (await chat(gateway, "solo", "gpt-4o", (100, 20, 50))).status == 200
    assert (await chat(gateway, "alice", "fast", (200, 0, 10))).status == 200
    assert (await chat(gateway, "bob", "mystery", (30, 0, 5))).status == 200
    streamed = await chat(
        gateway, "bob", "gpt-4o", (40, 0, 8), stream=True, stream_options={"include_usage": True}
    )
    assert streamed.status == 200

    solo = cost("gpt-4o", 100, 20, 50)  # 80 * 2.5 + 20 * 1.25 + 50 * 10 = 725
    alice = cost("small-v2", 200, 0, 10)  # the alias's upstream model is priced: 115
    bob = cost("gpt-4o", 40, 0, 8)  # 180; 'mystery' has no price
    assert (solo, alice, bob) == (725, 115, 180)
    report = await usage(gateway)
    assert report["totals"] == counts(4, 370, 20, 73, solo + alice + bob, unpriced=1)
    assert report["keys"] == {
        "solo": counts(1, 100, 20, 50, solo),
        "alice": counts(1, 200, 0, 10, alice),
        "bob": counts(2, 70, 0, 13, bob, unpriced=1),
        "tight": counts(0, 0, 0, 0, 0),
    }
    assert report["teams"] == {"ml": counts(3, 270, 0, 23, alice + bob, unpriced=1)}
    assert report["models"] == {
        "gpt-4o": counts(2, 140, 20, 58, solo + bob),
        "fast": counts(1, 200, 0, 10, alice),  # under the name the client used
        "mystery": counts(1, 30, 0, 5, 0, unpriced=1),
    }
    today = [row for row in report["periods"] if row["requests"]]
    assert len(today) == 1
    assert today[0]["cost_micro_usd"] == solo + alice + bob
    assert report["store"] == "local"

    # Narrowed: a team's own counters, a key, a model, by hour.
    team = await usage(gateway, "?team=ml&granularity=month")
    assert team["totals"] == report["teams"]["ml"]
    assert set(team["keys"]) == {"alice", "bob"}
    assert (await usage(gateway, "?key=solo"))["totals"] == report["keys"]["solo"]
    by_model = await usage(gateway, "?model=gpt-4o&granularity=hour")
    assert by_model["totals"] == report["models"]["gpt-4o"]
    assert by_model["keys"]["bob"] == counts(1, 40, 0, 8, bob)


async def test_a_spent_budget_refuses_with_its_reset_time_and_charges_no_rate_limit(
    gateway: Gateway, upstream: StandInUpstream
) -> None:
    # alice: $0.05 a day. Each request reserves its prompt estimate at the input price plus
    # 1,000 output tokens at $10/M (10,000 micro-dollars), and costs 100 in + 1,000 out.
    spent = 0
    for _ in range(4):
        answer = await chat(gateway, "alice", "gpt-4o", (100, 0, 1000), max_tokens=1000)
        assert answer.status == 200
        spent += cost("gpt-4o", 100, 0, 1000)
        assert answer.headers["x-gateway-spend-remaining-usd"]  # after this one's reservation
    assert spent == 41_000
    report = await usage(gateway, "?key=alice")
    assert budget(report, "key", "alice", "day")["spent_micro_usd"] == spent
    assert budget(report, "team", "ml", "month")["spent_micro_usd"] == spent
    levels = (await call(gateway, "GET", "/admin/keys", headers=list(ADMIN_HEADERS.items()))).json()
    before = next(k for k in levels["keys"] if k["name"] == "alice")["buckets"][0]["available"]
    assert before == 96

    # A fifth may cost up to $0.01 more: past the budget. Refused before the rate limit.
    sent = len(upstream.requests)
    refused = await chat(gateway, "alice", "gpt-4o", (100, 0, 1000), max_tokens=1000)
    assert refused.status == 429
    error = refused.json()["error"]
    assert error["code"] == "budget_exceeded"
    assert error["type"] == "insufficient_quota"
    assert "key 'alice' has spent $0.041 of its $0.05 daily budget" in error["message"]
    day_ends = (time.time() // 86_400 + 1) * 86_400
    reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(day_ends))
    assert f"It resets at {reset}." in error["message"]
    assert abs(int(refused.headers["retry-after"]) - (day_ends - time.time())) <= 2
    assert refused.headers["x-gateway-spend-remaining-usd"] == "0.009"
    assert len(upstream.requests) == sent  # nothing went upstream
    levels = (await call(gateway, "GET", "/admin/keys", headers=list(ADMIN_HEADERS.items()))).json()
    after = next(k for k in levels["keys"] if k["name"] == "alice")["buckets"][0]["available"]
    assert after == before  # the refusal cost no rate limit

    # A request small enough for what is left still passes; an unpriced model always does.
    assert (await chat(gateway, "alice", "gpt-4o", (10, 0, 10), max_tokens=50)).status == 200
    assert (await chat(gateway, "alice", "mystery", (10, 0, 10))).status == 200


async def test_a_limit_refusal_gives_the_budget_reservation_back(gateway: Gateway) -> None:
    first = await chat(gateway, "tight", "gpt-4o", (100, 0, 100), max_tokens=100)
    assert first.status == 200
    charged = cost("gpt-4o", 100, 0, 100)
    refused = await chat(gateway, "tight", "gpt-4o", (100, 0, 100), max_tokens=100)
    assert refused.status == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    # The header says what is left without the refused request's reservation.
    remaining = 1_000_000 - charged
    assert refused.headers["x-gateway-spend-remaining-usd"] == f"{remaining / 1e6:.6f}".rstrip("0")
    report = await usage(gateway, "?key=tight")
    assert budget(report, "key", "tight", "day")["spent_micro_usd"] == charged


async def test_what_a_request_without_usage_counts_and_is_charged(gateway: Gateway) -> None:
    reserve_before = budget(await usage(gateway, "?key=alice"), "key", "alice", "day")
    assert reserve_before["spent_micro_usd"] == 0
    # An upstream error without usage: a request, no tokens, the reservation refunded.
    failed = await chat(gateway, "alice", "gpt-4o", extra=(("x-test-status", "500"),))
    assert failed.status == 500
    # A stream that did not ask for usage: counted as without usage, the reservation kept.
    streamed = await chat(gateway, "alice", "gpt-4o", (50, 0, 5), stream=True, max_tokens=200)
    assert streamed.status == 200
    report = await usage(gateway, "?key=alice")
    assert report["totals"] == counts(2, 0, 0, 0, 0, nousage=1)
    kept = budget(report, "key", "alice", "day")["spent_micro_usd"]
    # Its reservation: the prompt estimate (one message of 5 characters: 4 + 2 tokens) at
    # the input price, and its 200 output tokens at the output price.
    assert kept == math.ceil(6 * 2.5 + 200 * 10.0)
    # A stream the upstream cuts short (it asked for usage, none came): the same.
    cut = await chat(
        gateway,
        "alice",
        "gpt-4o",
        (50, 0, 5),
        extra=(("x-test-cut", "1"),),
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=200,
    )
    assert cut.status == 200
    assert not cut.complete
    report = await usage(gateway, "?key=alice")
    assert report["totals"]["requests_without_usage"] == 2
    assert budget(report, "key", "alice", "day")["spent_micro_usd"] == 2 * kept


async def test_an_upstream_that_never_answers_refunds_the_reservation(
    upstream: StandInUpstream,
) -> None:
    upstream.respond = lambda request: Scripted(fault=UpstreamConnectError("refused"))
    async with in_process_gateway(CONFIG, upstream) as gateway:
        assert (await chat(gateway, "alice", "gpt-4o", max_tokens=100)).status == 502
        report = await usage(gateway, "?key=alice")
    assert budget(report, "key", "alice", "day")["spent_micro_usd"] == 0
    assert report["totals"] == counts(1, 0, 0, 0, 0)


async def test_spend_headers_only_where_a_budget_applies(gateway: Gateway) -> None:
    budgeted = await chat(gateway, "alice", "gpt-4o", (10, 0, 10), max_tokens=100)
    # After this request's reservation: the team's month ($0.2) and alice's day ($0.05), the
    # smallest of what is left: 50,000 - (6 * 2.5 + 100 * 10) rounded up.
    assert budgeted.headers["x-gateway-spend-remaining-usd"] == "0.048985"
    plain = await chat(gateway, "solo", "gpt-4o", (10, 0, 10))
    assert "x-gateway-spend-remaining-usd" not in plain.headers
    # The caller's own limits replace the upstream's only where the key has limits.
    assert "x-ratelimit-limit-requests" in budgeted.headers
    assert "x-ratelimit-limit-requests" not in plain.headers


async def test_the_spend_metric_counts_dollars_by_key_and_model(gateway: Gateway) -> None:
    await chat(gateway, "solo", "gpt-4o", (100, 20, 50))
    await chat(gateway, "solo", "gpt-4o", (100, 20, 50))
    scraped = (await call(gateway, "GET", "/metrics")).body.decode()
    line = 'gateway_spend_usd_total{key="solo",model="gpt-4o"} '
    assert line + str(2 * 725 / 1e6) in scraped, [
        row for row in scraped.splitlines() if "spend" in row
    ]


async def test_a_default_budget_is_each_keys_own(upstream: StandInUpstream) -> None:
    config = CONFIG.replace(
        "limits:\n  teams:", "limits:\n  default: {budget: {usd_per_day: 0.001}}\n  teams:"
    )
    async with in_process_gateway(config, upstream) as gateway:
        for key in ("solo", "bob"):  # neither has limits of its own
            assert (await chat(gateway, key, "gpt-4o", (10, 0, 90), max_tokens=90)).status == 200
            refused = await chat(gateway, key, "gpt-4o", (10, 0, 90), max_tokens=90)
            assert refused.json()["error"]["code"] == "budget_exceeded", refused.body
        report = await usage(gateway)
    days = {(line["owner"], line["name"]) for line in report["budgets"] if line["period"] == "day"}
    assert {("key", "solo"), ("key", "bob")} <= days


async def test_without_usage_or_budgets_nothing_is_accounted(upstream: StandInUpstream) -> None:
    config = CONFIG.replace("budget: {usd_per_day: 0.05}", "max_concurrent: 100")
    config = config.replace("budget: {usd_per_day: 1}", "max_concurrent: 100")
    config = config.replace("ml: {budget: {usd_per_month: 0.2}}", "ml: {max_concurrent: 10}")
    config += "usage: {enabled: false}\n"
    async with in_process_gateway(config, upstream) as gateway:
        accounts = gateway.runtime().accounts
        assert all(accounts.of(name) is None for name in SECRETS)
        assert (await chat(gateway, "solo", "gpt-4o", (10, 0, 10))).status == 200
        report = await usage(gateway)
        limiter = gateway.runtime().limiter
    assert isinstance(limiter, LocalLimiter)
    assert len(limiter.ledger) == 0
    assert report["usage_enabled"] is False
    assert report["totals"]["requests"] == 0
