"""One specification of the usage and budget store, run against every store the gateway builds.

The ``SPEND`` and ``SETTLE`` scripts (``gateway/limits/lua.py``) against a redis-server of the
test's own through the lean client and through redis-py, and against a Redis Cluster (every key
of one request in one hash slot, or the script fails with CROSSSLOT); and the in-process ledger
(``gateway/accounting/local_ledger.py``), which must mean the same. Entries are built the way
the pipeline builds them (``Accounts.entry``), from a config with budgets.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from gateway.accounting.accounts import Accounts
from gateway.accounting.periods import PeriodClock
from gateway.config.model import GatewayConfig, RedisSettings
from gateway.limits import Limiter, LocalLimiter, Plan, Planner, RedisLimiter, build_limiter
from gateway.limits.redis_limiter import CLIENT_OVERRIDE_ENV
from gateway.openai.usage import Usage
from tests.limits.conftest import RedisServer

MOMENT = dt.datetime(2026, 12, 3, 14, 30, tzinfo=dt.UTC).timestamp()
HASH = {
    name: "sha256:" + digit * 64 for name, digit in (("alice", "a"), ("bob", "b"), ("solo", "c"))
}
CONFIG = GatewayConfig.model_validate(
    {
        "keys": [
            {
                "name": "alice",
                "team": "ml",
                "hash": HASH["alice"],
                "limits": {
                    "tokens_per_minute": 0,
                    "token_burst": 1000,
                    "budget": {"usd_per_day": 0.001},
                },
            },
            {"name": "bob", "team": "ml", "hash": HASH["bob"]},
            {"name": "solo", "hash": HASH["solo"]},
        ],
        "limits": {"teams": {"ml": {"budget": {"usd_per_month": 0.003}}}},
        "prices": {"models": {"gpt-4o": {"input": 2.5, "cached_input": 1.25, "output": 10}}},
    }
)
CLIENTS = ["local", "redis-lean", "redis-redis-py", "cluster-redis-py"]


@pytest.fixture(params=CLIENTS)
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Limiter]:
    if request.param == "local":
        yield LocalLimiter()
        return
    server = None
    if request.param == "cluster-redis-py":
        nodes: list[RedisServer] = request.getfixturevalue("flushed_redis_cluster")
        settings = RedisSettings(url=nodes[0].url, cluster=True, timeout_ms=10_000)
    else:
        server = RedisServer(tmp_path / "redis")
        server.start()
        if request.param == "redis-redis-py":
            monkeypatch.setenv(CLIENT_OVERRIDE_ENV, "redis-py")
        settings = RedisSettings(url=server.url, timeout_ms=10_000)
    limiter = build_limiter(settings)
    assert isinstance(limiter, RedisLimiter)
    try:
        yield limiter
    finally:
        await limiter.aclose()
        if server is not None:
            server.stop()
        assert limiter.stats.degraded == 0, limiter.stats.last_error
        assert limiter.stats.usage_pending == 0


@pytest.fixture
def accounts() -> Accounts:
    return Accounts(CONFIG, clock=PeriodClock(lambda: MOMENT))


async def spent(store: Limiter, accounts: Accounts) -> dict[str, int]:
    """Every budget counter now: ``key alice day``, ``team ml month``..."""
    lines = list(accounts.all_budgets())
    periods = accounts.clock.now()
    values = await store.read_counters([line.key(periods) for line in lines])
    return {
        f"{line.owner} {line.name} {line.kind}": v for line, v in zip(lines, values, strict=True)
    }


@dataclass(frozen=True)
class SpendCase:
    steps: tuple[tuple[str, int], ...]  # (key, micro-dollars reserved)
    allowed: tuple[bool, ...]
    final: dict[str, int]


# alice: $0.001 a day (1,000 micro-dollars), and her team's $0.003 a month; bob: the team's.
SPEND_CASES = {
    "a reservation is taken on every budget that applies": SpendCase(
        (("alice", 400), ("bob", 100)), (True, True), {"key alice day": 400, "team ml month": 500}
    ),
    "a reservation that would pass a budget is refused": SpendCase(
        (("alice", 400), ("alice", 400), ("alice", 400), ("alice", 200)),
        (True, True, False, True),
        {"key alice day": 1000, "team ml month": 1000},
    ),
    "all or none: the team's month refuses, the key's day keeps nothing": SpendCase(
        (("bob", 2500), ("alice", 600)),
        (True, False),
        {"key alice day": 0, "team ml month": 2500},
    ),
    "a spent budget refuses even a request that reserves nothing": SpendCase(
        (("alice", 1000), ("alice", 0)),
        (True, False),
        {"key alice day": 1000, "team ml month": 1000},
    ),
    "a request larger than the budget is refused and writes nothing": SpendCase(
        (("alice", 1001),), (False,), {"key alice day": 0, "team ml month": 0}
    ),
}


@pytest.mark.parametrize("case", list(SPEND_CASES))
async def test_reservations(store: Limiter, accounts: Accounts, case: str) -> None:
    spec = SPEND_CASES[case]
    periods = accounts.clock.now()
    decisions = []
    for key, reserve in spec.steps:
        account = accounts.keys[key]
        decisions.append(await store.reserve(account.spend_plan(reserve, periods)))
    assert tuple(d.allowed for d in decisions) == spec.allowed
    assert not any(d.degraded for d in decisions)
    assert await spent(store, accounts) == spec.final
    # What a refusal saw: the counters as they were, nothing reserved.
    for decision in decisions:
        if not decision.allowed:
            assert decision.limiting() is not None


USAGE = Usage(input_tokens=100, output_tokens=50, total_tokens=150, cache_read_tokens=20)
COST = 80 * 2.5 + 20 * 1.25 + 50 * 10  # 725 micro-dollars


@pytest.mark.parametrize(
    ("ending", "usage", "failed", "charged", "fields"),
    [
        (
            "reported",
            USAGE,
            False,
            COST,
            {
                "gpt-4o|req": 1,
                "gpt-4o|in": 100,
                "gpt-4o|cached": 20,
                "gpt-4o|out": 50,
                "gpt-4o|usd": 725,
            },
        ),
        (
            "nothing reported (a cut stream)",
            None,
            False,
            400,
            {"gpt-4o|req": 1, "gpt-4o|nousage": 1},
        ),
        ("the upstream failed", None, True, 0, {"gpt-4o|req": 1}),
    ],
)
async def test_a_settlement_counts_usage_and_corrects_the_reservation_in_one_call(
    store: Limiter,
    accounts: Accounts,
    ending: str,
    usage: Usage | None,
    failed: bool,
    charged: int,
    fields: dict[str, int],
) -> None:
    periods = accounts.clock.now()
    alice = accounts.keys["alice"]
    # Her token bucket too: 1,000 tokens that never refill, 300 reserved at admission.
    planner = Planner(CONFIG.limits, CONFIG.keys)
    plan = planner.charges(key=CONFIG.keys[0], route="chat", model="gpt-4o", tokens=300)
    decision = await store.admit(plan)
    assert decision.remaining == (700,)
    spend = await store.reserve(alice.spend_plan(400, periods))
    assert spend.allowed
    entry, cost = accounts.entry(
        alice, model="gpt-4o", answered_model=None, usage=usage, failed=failed, spend=spend
    )
    assert cost == (COST if usage is not None else None)
    tokens = usage.total_tokens if usage is not None else (0 if failed else None)
    await store.settle(decision, tokens, entry)

    assert await spent(store, accounts) == {"key alice day": charged, "team ml month": charged}
    hashes = await store.read_hashes(alice.usage_keys(periods))
    assert len(hashes) == 6  # the key's and the team's hour, day and month
    assert all(found == fields for found in hashes), hashes
    expected_level = {"reported": 850, "nothing reported (a cut stream)": 700}.get(ending, 1000)
    assert await store.peek(plan.buckets.buckets) == [expected_level]


async def test_a_release_gives_the_whole_reservation_back(
    store: Limiter, accounts: Accounts
) -> None:
    spend = await store.reserve(accounts.keys["alice"].spend_plan(400, accounts.clock.now()))
    await store.release(spend)
    assert await spent(store, accounts) == {"key alice day": 0, "team ml month": 0}


async def test_usage_without_buckets_or_budgets_is_counted_for_a_key_without_team(
    store: Limiter, accounts: Accounts
) -> None:
    solo = accounts.keys["solo"]
    for _ in range(3):
        entry, _ = accounts.entry(
            solo, model="gpt-4o", answered_model=None, usage=USAGE, failed=False, spend=None
        )
        await store.settle(None, None, entry)
    hashes = await store.read_hashes(solo.usage_keys(accounts.clock.now()))
    assert len(hashes) == 3
    assert all(found["gpt-4o|usd"] == 3 * COST and found["gpt-4o|req"] == 3 for found in hashes)


async def test_concurrent_reservations_never_pass_a_budget(
    store: Limiter, accounts: Accounts
) -> None:
    plan = accounts.keys["alice"].spend_plan(30, accounts.clock.now())
    decisions = await asyncio.gather(*(store.reserve(plan) for _ in range(100)))
    assert sum(d.allowed for d in decisions) == 33  # 33 * 30 = 990 of 1,000
    assert (await spent(store, accounts))["key alice day"] == 990


@pytest.mark.parametrize("client", ["lean", "redis-py"])
async def test_counters_expire_and_survive_a_script_flush(
    redis_server: RedisServer, accounts: Accounts, monkeypatch: pytest.MonkeyPatch, client: str
) -> None:
    if client == "redis-py":
        monkeypatch.setenv(CLIENT_OVERRIDE_ENV, "redis-py")
    store = build_limiter(RedisSettings(url=redis_server.url, timeout_ms=10_000))
    raw = redis.Redis.from_url(redis_server.url)
    try:
        alice = accounts.keys["alice"]
        periods = accounts.clock.now()
        spend = await store.reserve(alice.spend_plan(400, periods))
        raw.script_flush()  # as after a Redis restart: EVALSHA fails, EVAL loads it again
        entry, _ = accounts.entry(
            alice, model="gpt-4o", answered_model=None, usage=USAGE, failed=False, spend=spend
        )
        await store.settle(None, None, entry)
        day = 86_400_000
        ttls = [raw.pttl(key) for key in alice.usage_keys(periods)]
        for got, days in zip(ttls, [8, 400, 1830] * 2, strict=True):
            assert days * day - 60_000 < got <= days * day, ttls
        counters = [raw.pttl(key) for key in spend.plan.keys]
        assert 3 * day - 60_000 < counters[0] <= 3 * day  # the key's day
        assert 63 * day - 60_000 < counters[1] <= 63 * day  # the team's month
        assert await spent(store, accounts) == {"key alice day": COST, "team ml month": COST}
        # Nothing is named after a key: only its hash's first 16 hex digits.
        assert all(b"sha256" not in key for key in raw.keys("*"))
    finally:
        raw.close()
        await store.aclose()


def test_the_plans_prefixes_put_a_key_and_its_team_in_one_slot(accounts: Accounts) -> None:
    alice, solo = accounts.keys["alice"], accounts.keys["solo"]
    periods = accounts.clock.now()
    team_keys = [*alice.usage_keys(periods), *alice.spend_plan(0, periods).keys]
    assert all("{t:ml}" in key for key in team_keys)
    assert all("{k:cccccccccccccccc}" in key for key in solo.usage_keys(periods))
    plan = Planner(CONFIG.limits, CONFIG.keys).charges(
        key=CONFIG.keys[0], route="chat", model=None, tokens=0
    )
    assert isinstance(plan, Plan)
    assert all("{t:ml}" in b.key for b in plan.buckets.buckets)
