"""``GET /admin/usage``: its query, its refusals, and what it never shows.

What the figures add up to is specified with the pipeline in ``tests/accounting/
test_in_process.py`` and across processes in ``tests/end_to_end/test_usage_and_budgets.py``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from gateway.accounting import report
from gateway.app import Gateway
from gateway.auth import hash_key
from tests.support.admin import ADMIN_HEADERS, ADMIN_SECTION
from tests.support.standin import StandInUpstream, call, in_process_gateway, json_answer

KEY = "sk-gw-usage-endpoint-0123456789"
CONFIG = f"""
server: {{access_log: false}}
upstreams:
  main: {{base_url: http://upstream.test/v1}}
routes:
  - {{name: chat, path: /v1/chat/completions, upstream: main}}
allow_unlisted_models: true
prices:
  default: {{input: 1, output: 2}}
keys:
  - {{name: alice, team: ml, hash: {hash_key(KEY)}, limits: {{budget: {{usd_per_month: 200}}}}}}
  - {{name: solo, hash: {hash_key("sk-gw-usage-solo-0123456789")}}}
{ADMIN_SECTION}"""
ADMIN = list(ADMIN_HEADERS.items())


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    upstream = StandInUpstream(lambda request: json_answer({"usage": usage}))
    async with in_process_gateway(CONFIG, upstream) as app:
        yield app


async def get(gateway: Gateway, query: str) -> Any:
    return await call(gateway, "GET", "/admin/usage" + query, headers=ADMIN)


@pytest.mark.parametrize(
    ("query", "param", "says"),
    [
        ("?granularity=weekly", "granularity", "must be hour, day or month"),
        ("?from=yesterday", "from", "must be a date (2026-12-03), a month (2026-12)"),
        ("?to=2026-13-01", "to", "must be a date"),
        ("?from=2026-12-05&to=2026-12-01", "from", "'from' is after 'to'"),
        ("?granularity=hour&from=2026-01-01&to=2026-12-31", "granularity", "more than 1000 hours"),
        ("?key=nobody", "key", "No key is named 'nobody'"),
        ("?team=nobody", "team", "No key of the config is in team 'nobody'"),
        ("?key=solo&team=ml", "team", "Key 'solo' is not in team 'ml'"),
        ("?kye=alice", "kye", "Unknown parameter 'kye'"),
        ("?key=alice&key=solo", "key", "given more than once"),
    ],
)
async def test_a_bad_query_is_a_400_naming_the_parameter(
    gateway: Gateway, query: str, param: str, says: str
) -> None:
    answer = await get(gateway, query)
    assert answer.status == 400
    error = answer.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (
        param,
        "invalid_value",
        "invalid_request_error",
    )
    assert says in error["message"]
    assert answer.headers["cache-control"] == "no-store"


@pytest.mark.parametrize(
    ("query", "start", "end", "rows"),
    [
        (
            "?from=2026-11&to=2026-12&granularity=month",
            "2026-11-01T00:00:00Z",
            "2026-12-31T23:59:59Z",
            2,
        ),
        ("?from=2026-12-01&to=2026-12-03", "2026-12-01T00:00:00Z", "2026-12-03T23:59:59Z", 3),
        (
            "?from=2026-12-03T10:00:00Z&to=2026-12-03T12:30:00%2B00:00&granularity=hour",
            "2026-12-03T10:00:00Z",
            "2026-12-03T12:30:00Z",
            3,
        ),
        ("?from=1796169600&to=1796255999", "2026-12-02T00:00:00Z", "2026-12-02T23:59:59Z", 1),
    ],
)
async def test_times_are_dates_months_iso_or_unix_seconds(
    gateway: Gateway, query: str, start: str, end: str, rows: int
) -> None:
    document = (await get(gateway, query)).json()
    assert (document["from"], document["to"]) == (start, end)
    assert len(document["periods"]) == rows


async def test_by_default_this_month_by_day(gateway: Gateway) -> None:
    document = (await get(gateway, "")).json()
    today = dt.datetime.now(dt.UTC)
    assert document["granularity"] == "day"
    assert document["from"] == today.strftime("%Y-%m-01T00:00:00Z")
    assert len(document["periods"]) == today.day
    assert document["periods"][-1]["period"] == today.strftime("%Y-%m-%d")


async def test_a_query_that_would_read_too_many_counters_is_refused(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report, "MAX_HASHES", 10)
    answer = await get(gateway, "?from=2026-12-01&to=2026-12-04")  # 3 scopes x 4 days
    assert answer.status == 400
    assert answer.json()["error"]["param"] == "granularity"
    assert "would read 12 counters" in answer.json()["error"]["message"]
    assert (await get(gateway, "?key=alice&from=2026-12-01&to=2026-12-04")).status == 200


async def test_keys_appear_by_name_never_by_key_or_hash(gateway: Gateway) -> None:
    chat = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    client = [("authorization", f"Bearer {KEY}"), ("content-type", "application/json")]
    assert (
        await call(gateway, "POST", "/v1/chat/completions", headers=client, body=chat)
    ).status == 200
    answer = await get(gateway, "")
    text = answer.body.decode()
    assert KEY not in text
    assert hash_key(KEY)[7:23] not in text  # not even the 16 digits Redis keys carry
    document = answer.json()
    assert document["keys"]["alice"]["requests"] == 1
    assert document["keys"]["alice"]["cost_micro_usd"] == 10 * 1 + 5 * 2  # the default price
    assert document["budgets"] == [
        {
            "owner": "key",
            "name": "alice",
            "period": "month",
            "limit_usd": 200.0,
            "spent_usd": 0.00002,
            "spent_micro_usd": 20,
            "remaining_usd": 199.99998,
            "resets_at": document["budgets"][0]["resets_at"],
        }
    ]
