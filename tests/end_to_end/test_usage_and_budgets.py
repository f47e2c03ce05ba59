"""Usage accounting and budgets across replicas (issue #12): four ``gateway serve`` processes, one
redis-server of this test's own, the fake upstream.

The fake upstream reports usage computed from each request (prompt tokens from its text, output
tokens from ``x-fake-chunks``, cached prompt tokens from ``x-fake-cached-tokens``); the test reads
what it reported back out of every response it relayed (a body's ``usage``, a stream's final
usage chunk) and prices it itself. ``GET /admin/usage`` must then show exactly those sums, per
key, per team and per model, whichever gateway answers; and a budget hammered by concurrent
requests through all four gateways must end no higher than its limit (each request's cost is
at most its reservation here, so in-flight reservations cannot carry it past), with every
refusal a 429 ``budget_exceeded`` naming its reset time and costing no rate limit.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.auth import hash_key
from gateway.openai.tokens import estimate_prompt
from tests.conftest import UPSTREAM_KEY, gateway_config
from tests.limits.conftest import RedisServer
from tests.limits.test_gateway_limits import redis_section, running
from tests.support.admin import admin_get
from tests.support.fakeupstream import FakeUpstream
from tests.support.gatewayproc import GatewayProcess

GATEWAYS = 4
MARKER = "x-usage-test"
# USD per million tokens = micro-dollars per token: (input, cached input, output). 'fast' is
# priced as the model its alias asks the upstream for; 'mystery' has no price.
PRICES = {"gpt-fake": (2.0, 0.5, 8.0), "gpt-4o-mini": (0.15, 0.075, 0.6)}
PRICED_AS = {"gpt-fake": "gpt-fake", "fast": "gpt-4o-mini", "mystery": None}
USAGE_KEYS = {"alpha": "blue", "beta": "blue", "gamma": None}  # key -> team
SPENDER = "spender"
BUDGET_MICRO = 10_000  # $0.01 a day
SPENDER_REQUESTS = 1000  # its requests bucket: 1,000 that never refill
WORDS = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do"]


def secret(name: str) -> str:
    return f"sk-gw-usage-e2e-{name}-0123456789"


def config(upstream: FakeUpstream, redis_url: str) -> str:
    keys = "".join(
        f"  - {{name: {name}, hash: {hash_key(secret(name))}"
        + (f", team: {team}" if team else "")
        + "}\n"
        for name, team in USAGE_KEYS.items()
    )
    keys += (
        f"  - name: {SPENDER}\n    hash: {hash_key(secret(SPENDER))}\n"
        f"    limits: {{requests_per_minute: 0, request_burst: {SPENDER_REQUESTS},"
        f" budget: {{usd_per_day: {BUDGET_MICRO / 1e6}}}}}\n"
    )
    prices = "".join(
        f"    {model}: {{input: {p[0]}, cached_input: {p[1]}, output: {p[2]}}}\n"
        for model, p in PRICES.items()
    )
    # on_failure closed: a degraded (per-process) decision would be a visible 503.
    extra = (
        keys + "prices:\n  models:\n" + prices + redis_section(redis_url, "closed", timeout_ms=2000)
    )
    return gateway_config(upstream.base_url, extra=extra)


@dataclass(frozen=True)
class Stack:
    gateways: list[GatewayProcess]
    upstream: FakeUpstream


@pytest.fixture(scope="module")
def stack(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    server = RedisServer(Path(tmp_path_factory.mktemp("usage-redis")))
    server.start()
    try:
        yaml = config(upstream, server.url)
        gateways = [
            GatewayProcess(yaml, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY}) for _ in range(GATEWAYS)
        ]
        with running(*gateways):
            yield Stack(gateways, upstream)
    finally:
        server.stop()


@dataclass(frozen=True)
class Sent:
    key: str
    model: str
    stream: bool
    body: dict[str, Any]
    headers: dict[str, str]


def reported_usage(response: httpx.Response, stream: bool) -> dict[str, Any]:
    """The usage the upstream reported in what the client received."""
    if not stream:
        usage: dict[str, Any] = response.json()["usage"]
        return usage
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: {")]
    finals = [orjson.loads(e)["usage"] for e in events if orjson.loads(e).get("usage")]
    assert len(finals) == 1, response.text
    return finals[0]  # type: ignore[no-any-return]


@dataclass
class Tally:
    requests: int = 0
    prompt: int = 0
    cached: int = 0
    out: int = 0
    micro: int = 0
    unpriced: int = 0

    def add(self, model: str, usage: dict[str, Any]) -> int:
        prompt, out = usage["prompt_tokens"], usage["completion_tokens"]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        self.requests += 1
        self.prompt += prompt
        self.cached += cached
        self.out += out
        priced = PRICED_AS[model]
        cost = 0
        if priced is None:
            self.unpriced += 1
        else:
            fresh, cached_price, out_price = PRICES[priced]
            cost = math.ceil((prompt - cached) * fresh + cached * cached_price + out * out_price)
        self.micro += cost
        return cost

    def view(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "input_tokens": self.prompt,
            "cached_input_tokens": self.cached,
            "output_tokens": self.out,
            "cost_usd": round(self.micro / 1e6, 6),
            "cost_micro_usd": self.micro,
            "unpriced_requests": self.unpriced,
            "requests_without_usage": 0,
        }


def varied_requests(marker: str, count: int, rng: random.Random) -> list[Sent]:
    sent = []
    for i in range(count):
        key = list(USAGE_KEYS)[i % len(USAGE_KEYS)]
        model = ("gpt-fake", "fast", "mystery")[rng.randrange(3)]
        stream = rng.random() < 0.4
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 60)))
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}]}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        headers = {
            "authorization": f"Bearer {secret(key)}",
            MARKER: marker,
            "x-fake-chunks": str(rng.randrange(0, 40)),
            "x-fake-cached-tokens": str(rng.randrange(0, 30)),
        }
        sent.append(Sent(key, model, stream, body, headers))
    return sent


async def send_all(stack: Stack, sent: list[Sent]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=50)
    clients = [httpx.AsyncClient(base_url=g.url, timeout=30, limits=limits) for g in stack.gateways]
    try:
        return await asyncio.gather(
            *(
                clients[i % GATEWAYS].post("/v1/chat/completions", json=s.body, headers=s.headers)
                for i, s in enumerate(sent)
            )
        )
    finally:
        for client in clients:
            await client.aclose()


def settled_usage(stack: Stack, query: str, requests: int) -> dict[str, Any]:
    """``/admin/usage`` from one gateway once ``requests`` have been settled (settlement runs
    just after each response, off its path)."""
    deadline = time.monotonic() + 10
    while True:
        report: dict[str, Any] = admin_get(stack.gateways[0].url, "usage" + query)
        if report["totals"]["requests"] >= requests or time.monotonic() > deadline:
            return report
        time.sleep(0.05)


def test_usage_from_four_gateways_adds_up_to_what_the_upstream_reported(stack: Stack) -> None:
    rng = random.Random(12)
    marker = f"usage-{rng.random()}"
    sent = varied_requests(marker, 160, rng)
    started = time.monotonic()
    responses = asyncio.run(send_all(stack, sent))
    took = time.monotonic() - started
    assert [r.status_code for r in responses] == [200] * len(sent)

    totals, keys, teams = Tally(), {k: Tally() for k in USAGE_KEYS}, {"blue": Tally()}
    models: dict[str, Tally] = {}
    for s, response in zip(sent, responses, strict=True):
        usage = reported_usage(response, s.stream)
        for tally in (totals, keys[s.key], models.setdefault(s.model, Tally())):
            tally.add(s.model, usage)
        if USAGE_KEYS[s.key] is not None:
            teams["blue"].add(s.model, usage)
    assert totals.cached > 0
    assert totals.unpriced > 0
    assert totals.micro > 0

    report = settled_usage(stack, "", len(sent))
    assert report["store"] == "redis"
    assert report["totals"] == totals.view()
    assert {k: v for k, v in report["keys"].items() if k in USAGE_KEYS} == {
        k: t.view() for k, t in keys.items()
    }
    assert report["teams"] == {"blue": teams["blue"].view()}
    assert report["models"] == {m: t.view() for m, t in models.items()}
    # Every gateway reads the same shared counters; the hour adds up to the day.
    for gateway in stack.gateways[1:]:
        assert admin_get(gateway.url, "usage")["totals"] == totals.view()
    hourly = admin_get(stack.gateways[2].url, "usage?granularity=hour&from=" + today())
    assert sum(row["cost_micro_usd"] for row in hourly["periods"]) == totals.micro
    print(
        f"\n{len(sent)} requests through {GATEWAYS} gateways in {took:.2f} s: "
        f"{totals.prompt} input ({totals.cached} cached), {totals.out} output tokens, "
        f"{totals.micro} micro-dollars, {totals.unpriced} unpriced; all equal in /admin/usage"
    )


def today() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")


def spender_request(rng: random.Random, marker: str) -> tuple[dict[str, Any], dict[str, str]]:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(5, 40)))
    stream = rng.random() < 0.5
    body: dict[str, Any] = {
        "model": "gpt-fake",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": text}],
    }
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    headers = {
        "authorization": f"Bearer {secret(SPENDER)}",
        MARKER: marker,
        "x-fake-chunks": str(rng.randrange(30, 51)),  # at most max_tokens: cost <= reservation
        "x-fake-cached-tokens": str(rng.randrange(0, 5)),
    }
    return body, headers


def reservation(body: dict[str, Any]) -> int:
    """What the gateway reserves for ``body`` on gpt-fake: its prompt estimate at the input
    price and its max_tokens at the output price (``Price.estimate``)."""
    fresh, _, out = PRICES["gpt-fake"]
    max_tokens: int = body["max_tokens"]
    return math.ceil(estimate_prompt(body) * fresh + max_tokens * out)


def test_a_budget_under_concurrency_ends_within_its_limit(stack: Stack) -> None:
    rng = random.Random(7)
    marker = f"budget-{rng.random()}"
    requests = [spender_request(rng, marker) for _ in range(80)]
    sent = [
        Sent(SPENDER, "gpt-fake", bool(body.get("stream")), body, headers)
        for body, headers in requests
    ]
    responses = asyncio.run(send_all(stack, sent))

    admitted = [(s, r) for s, r in zip(sent, responses, strict=True) if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(admitted) + len(refused) == len(sent), {r.status_code for r in responses}
    spent = Tally()
    for s, response in admitted:
        spent.add("gpt-fake", reported_usage(response, s.stream))
    reservations = [reservation(s.body) for s in sent]
    # The bound: spent <= budget + what requests cost beyond their reservations. Here
    # each costs at most its reservation (output <= max_tokens, the fake's prompt count <= the
    # gateway's estimate), so the budget holds exactly, whatever ran at once. At least as many
    # passed as fit when each is reserved in full.
    assert spent.micro <= BUDGET_MICRO
    assert len(admitted) >= BUDGET_MICRO // max(reservations)
    assert refused, "the budget never refused anything: make the test's budget smaller"

    day_ends = dt.datetime.combine(dt.datetime.now(dt.UTC).date(), dt.time(), dt.UTC)
    reset = (day_ends + dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    for response in refused:
        error = response.json()["error"]
        assert (error["code"], error["type"]) == ("budget_exceeded", "insufficient_quota")
        assert f"It resets at {reset}." in error["message"]
        assert "key 'spender'" in error["message"]
        seconds = int(response.headers["retry-after"])
        assert abs(seconds - ((day_ends + dt.timedelta(days=1)).timestamp() - time.time())) < 5
        assert "x-gateway-spend-remaining-usd" in response.headers
    for _, response in admitted:
        assert float(response.headers["x-gateway-spend-remaining-usd"]) >= 0

    # Settled: the budget's counter holds exactly what the admitted requests cost, as does the
    # key's usage; nothing refused reached the upstream, and refusals debited no rate limit.
    report = settled_usage(stack, f"?key={SPENDER}", len(admitted))
    assert report["totals"] == spent.view()
    [day] = [b for b in report["budgets"] if b["period"] == "day"]
    assert day["spent_micro_usd"] == spent.micro
    assert day["remaining_usd"] == round((BUDGET_MICRO - spent.micro) / 1e6, 6)
    arrived = sum(1 for r in stack.upstream.requests if r.header(MARKER) == marker)
    assert arrived == len(admitted)
    keys = admin_get(stack.gateways[1].url, "keys")["keys"]
    [bucket] = next(k for k in keys if k["name"] == SPENDER)["buckets"]
    assert bucket["available"] == SPENDER_REQUESTS - len(admitted)
    # What the reservations held beyond the real costs is back: one more request fits now.
    if BUDGET_MICRO - spent.micro >= max(reservations):
        body, headers = spender_request(rng, marker)
        more = httpx.post(
            stack.gateways[3].url + "/v1/chat/completions", json=body, headers=headers, timeout=10
        )
        assert more.status_code == 200, more.text
    print(
        f"\nbudget {BUDGET_MICRO} micro-dollars: {len(admitted)} of {len(sent)} admitted at once "
        f"over {GATEWAYS} gateways, spent {spent.micro} (reservations {min(reservations)}-"
        f"{max(reservations)} each), {len(refused)} refused"
    )
