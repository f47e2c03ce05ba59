"""Waiting for capacity (``limits.max_wait``): one table of scenarios, run against the Redis
script (a real ``redis-server`` per test, through the lean client, redis-py and Redis Cluster)
and the local limiter (a frozen clock), which must agree.

Rates are chosen so that slots are easy to read: 60 requests per minute with a burst of 1 is a
slot every 1000 ms; 600 tokens per minute with a burst of 10 is 100 ms per token. Against the
local limiter the clock stands still, so waits are exact; against Redis its own clock runs on
while a scenario plays (a few milliseconds), which can only shorten a wait or raise a level by
what refilled meanwhile: the checks allow exactly that and no more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest

from gateway.auth import hash_key
from gateway.config.loader import ConfigError, parse_config_text
from gateway.config.model import Limits, LimitsSection, RedisSettings
from gateway.context import RequestContext
from gateway.http.body import ClientDisconnected
from gateway.limits import (
    QUEUE_WAIT_HEADER,
    Decision,
    Limiter,
    LocalLimiter,
    Planner,
    RedisLimiter,
    build_limiter,
    wait_for_slot,
)
from gateway.limits.redis_limiter import CLIENT_OVERRIDE_ENV
from gateway.limits.waiting import DEFAULT_MAX_WAITING
from gateway.types import Message, Receive

from .factories import make_key
from .test_limiter_spec import CLIENTS

HASH = hash_key("sk-test-wait")


class FrozenClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- The table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Admit:
    """Ask for a request; expect it admitted now, admitted after ``ms`` ("wait"), or refused
    with a retry of ``ms`` (-1: never) by a bucket of ``kind``."""

    expect: str
    ms: int = 0
    tokens: int = 0
    route: str = "chat"
    kind: str | None = None


@dataclass(frozen=True)
class GiveBack:
    """The request of step ``step`` (admitted after a wait) leaves before its slot."""

    step: int


@dataclass(frozen=True)
class Waited:
    """The wait of the request of step ``step`` is over: its place in the room is free."""

    step: int


@dataclass(frozen=True)
class Levels:
    """Every bucket's level now, in plan order."""

    expect: tuple[float, ...]


Step = Admit | GiveBack | Waited | Levels


@dataclass(frozen=True)
class Scenario:
    name: str
    limits: Limits
    steps: Sequence[Step]
    routes: dict[str, Limits] = field(default_factory=dict)


RPM = {"requests_per_minute": 60, "request_burst": 1}  # a slot every 1000 ms
TPM = {"tokens_per_minute": 600, "token_burst": 10}  # 100 ms per token

SCENARIOS = [
    Scenario(
        "slots are handed out in arrival order, up to max_wait, and a refusal debits nothing",
        Limits(**RPM, max_wait=3),
        [
            Admit("now"),
            Admit("wait", 1000),
            Admit("wait", 2000),
            Admit("wait", 3000),  # exactly max_wait away: it fits
            Admit("refused", 4000, kind="requests"),
            Admit("refused", 4000, kind="requests"),
            Levels((-3,)),  # the debt is max_wait x rate, never more
        ],
    ),
    Scenario(
        "a max_wait between two slots admits the ones before it",
        Limits(**RPM, max_wait=2.5),
        [
            Admit("now"),
            Admit("wait", 1000),
            Admit("wait", 2000),
            Admit("refused", 3000, kind="requests"),
            Levels((-2,)),
        ],
    ),
    Scenario(
        "a route's max_wait wins over the key's; 0 turns waiting off",
        Limits(**RPM, max_wait=1),
        [
            Admit("now"),
            Admit("wait", 1000, route="chat"),  # the route's 3 s
            Admit("wait", 2000, route="chat"),
            Admit("refused", 3000, route="embeddings", kind="requests"),  # the key's 1 s
            Admit("refused", 3000, route="batch", kind="requests"),  # the route's 0
            Levels((-2,)),
        ],
        routes={"chat": Limits(max_wait=3), "batch": Limits(max_wait=0)},
    ),
    Scenario(
        "token buckets wait too: a deficit refills at the bucket's rate",
        Limits(**TPM, max_wait=2),
        [
            Admit("now", tokens=10),
            Admit("wait", 500, tokens=5),
            Admit("wait", 1500, tokens=10),
            Admit("refused", 2100, tokens=6, kind="tokens"),  # would be 2.1 s away
            Admit("wait", 1600, tokens=1),  # smaller, still after every slot handed out
            Admit("refused", -1, tokens=11, kind="tokens"),  # larger than the bucket: never
            Levels((-16,)),
        ],
    ),
    Scenario(
        "all of a plan's buckets are debited or none; the slowest sets the wait",
        Limits(**RPM, **TPM, max_wait=1.5),
        [
            Admit("now", tokens=5),
            Admit("wait", 1000, tokens=10),  # requests: 1000 ms, tokens: 500 ms
            Levels((-1, -5)),
            Admit("refused", 2000, tokens=1, kind="requests"),  # tokens fit, requests do not
            Admit("refused", -1, tokens=11, kind="tokens"),
            Levels((-1, -5)),
        ],
    ),
    Scenario(
        "the last request's slot, given back, goes to the next request",
        Limits(**RPM, max_wait=3),
        [
            Admit("now"),
            Admit("wait", 1000),
            Admit("wait", 2000),
            GiveBack(2),
            Levels((-1,)),
            Admit("wait", 2000),
            Levels((-2,)),
        ],
    ),
    Scenario(
        "a slot with a request scheduled behind it is not handed out twice",
        Limits(**RPM, max_wait=3),
        [
            Admit("now"),
            Admit("wait", 1000),
            Admit("wait", 2000),
            GiveBack(1),  # the request at 2000 ms keeps its slot: the debit stands
            Levels((-2,)),
            Admit("wait", 3000),  # not 2000: that slot is taken
        ],
    ),
    Scenario(
        "a give-back returns each bucket's debit where no one is scheduled behind it",
        Limits(**RPM, **TPM, max_wait=3),
        [
            Admit("now", tokens=2),
            Admit("wait", 1000, tokens=2),
            Admit("wait", 2000, tokens=2),
            Levels((-2, 4)),
            GiveBack(1),  # requests: one is behind it; tokens: no one waits there
            Levels((-2, 6)),
            GiveBack(2),  # the last one everywhere
            Levels((-1, 8)),
        ],
    ),
    Scenario(
        "max_waiting bounds the key's requests waiting at once; past it, the 429 at once",
        Limits(**RPM, max_wait=10, max_waiting=2),
        [
            Admit("now"),
            Admit("wait", 1000),
            Admit("wait", 2000),
            Admit("refused", 3000, kind="requests"),  # fits max_wait, but the room is full
            Levels((-2,)),
            Waited(1),
            Admit("wait", 3000),
            Levels((-3,)),
        ],
    ),
]


# -- Running it ---------------------------------------------------------------------------------


@dataclass
class Side:
    """A limiter under test and how far its clock may have moved since the scenario began."""

    limiter: Limiter
    frozen: bool
    started: float = field(default_factory=time.monotonic)

    def slack_ms(self) -> float:
        return 0.0 if self.frozen else (time.monotonic() - self.started) * 1000 + 1


_REDIS = ("redis-lean", "redis-redis-py", "cluster-redis-py")


@pytest.fixture(params=["local", *_REDIS])
async def side(request: pytest.FixtureRequest) -> AsyncIterator[Side]:
    if request.param == "local":
        yield Side(LocalLimiter(clock=FrozenClock()), frozen=True)
        return
    settings, _ = CLIENTS[request.param](request)
    limiter = build_limiter(settings)
    assert isinstance(limiter, RedisLimiter)
    try:
        yield Side(limiter, frozen=False)
    finally:
        await limiter.aclose()
        assert limiter.stats.degraded == 0, limiter.stats.last_error


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_waiting_for_capacity(side: Side, scenario: Scenario) -> None:
    key = make_key("demo", limits=scenario.limits)
    planner = Planner(LimitsSection(routes=scenario.routes), [key])
    limiter = side.limiter
    decisions: dict[int, Decision] = {}
    side.started = time.monotonic()
    for i, step in enumerate(scenario.steps):
        where = f"step {i} ({step})"
        if isinstance(step, Admit):
            plan = planner.charges(key=key, route=step.route, model=None, tokens=step.tokens)
            decision = decisions[i] = await limiter.admit(plan)
            slack = side.slack_ms()
            if step.expect == "now":
                assert decision.allowed, where
                assert decision.wait_ms == 0, where
            elif step.expect == "wait":
                assert decision.allowed, where
                assert step.ms - slack <= decision.wait_ms <= step.ms, (where, decision.wait_ms)
            else:
                assert not decision.allowed, where
                assert decision.wait_ms == 0, where
                assert decision.kind == step.kind, where
                retry = decision.retry_after_ms
                if step.ms < 0:
                    assert retry == -1, where
                else:
                    assert step.ms - slack <= retry <= step.ms, (where, retry)
        elif isinstance(step, GiveBack):
            await limiter.give_back(decisions[step.step])
            limiter.waited(decisions[step.step])
        elif isinstance(step, Waited):
            limiter.waited(decisions[step.step])
        else:
            buckets = planner.charges(key=key, route="chat", model=None, tokens=0).buckets
            levels = await limiter.peek(buckets.buckets)
            slack = side.slack_ms()
            for bucket, level, expected in zip(buckets.buckets, levels, step.expect, strict=True):
                assert level is not None
                refilled = bucket.per_second * slack / 1000
                assert expected - 1e-6 <= level <= expected + refilled + 1e-6, (where, levels)


# -- Sleeping until the slot --------------------------------------------------------------------


def _waiting_decision(limiter: LocalLimiter) -> tuple[Decision, Decision]:
    """The first request of a key takes its burst; the second waits 100 ms for its slot."""
    key = make_key("demo", limits=Limits(requests_per_minute=600, request_burst=1, max_wait=1))
    plan = Planner(LimitsSection(), [key]).charges(key=key, route="chat", model=None, tokens=0)
    first = limiter.admit_now(plan)
    second = limiter.admit_now(plan)
    assert first.wait_ms == 0
    assert second.wait_ms == 100
    assert limiter.room.waiting("demo") == 1
    return first, second


def _context() -> RequestContext:
    return RequestContext(request_id="req-1", method="POST", path="/v1/chat/completions")


async def _never() -> Message:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def _disconnect_after(seconds: float) -> tuple[list[str], Receive]:
    seen: list[str] = []

    async def receive() -> Message:
        await asyncio.sleep(seconds)
        seen.append("http.disconnect")
        return {"type": "http.disconnect"}

    return seen, receive


async def test_a_waiting_request_sleeps_until_its_slot_and_keeps_it() -> None:
    limiter = LocalLimiter(clock=FrozenClock())
    _, decision = _waiting_decision(limiter)
    context = _context()
    started = time.monotonic()
    waited = await wait_for_slot(limiter, decision, _never, context)
    assert time.monotonic() - started >= 0.1
    assert 100 <= waited < 200
    assert context.queue_wait_ms == waited
    assert limiter.room.waiting("demo") == 0
    assert limiter.levels(decision.plan.buckets.buckets) == [-1.0]  # its debit stands
    headers = dict(decision.headers(waited))
    assert headers[QUEUE_WAIT_HEADER] == str(waited).encode()


async def test_a_client_that_leaves_while_waiting_gives_its_slot_back() -> None:
    limiter = LocalLimiter(clock=FrozenClock())
    _, decision = _waiting_decision(limiter)
    context = _context()
    seen, receive = _disconnect_after(0.03)
    with pytest.raises(ClientDisconnected):
        await wait_for_slot(limiter, decision, receive, context)
    assert seen == ["http.disconnect"]
    assert context.queue_wait_ms is not None
    assert 30 <= context.queue_wait_ms < 100
    assert limiter.room.waiting("demo") == 0
    assert limiter.levels(decision.plan.buckets.buckets) == [0.0]
    again = limiter.admit_now(decision.plan)
    assert again.wait_ms == 100  # the slot it left, not the one after


async def test_a_request_cancelled_while_waiting_gives_its_slot_back() -> None:
    limiter = LocalLimiter(clock=FrozenClock())
    _, decision = _waiting_decision(limiter)
    task = asyncio.ensure_future(wait_for_slot(limiter, decision, _never, _context()))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert limiter.room.waiting("demo") == 0
    assert limiter.levels(decision.plan.buckets.buckets) == [0.0]


async def test_requests_that_are_not_short_never_wait_or_take_a_place() -> None:
    limiter = LocalLimiter(clock=FrozenClock())
    key = make_key("demo", limits=Limits(requests_per_minute=600, max_wait=1))
    plan = Planner(LimitsSection(), [key]).charges(key=key, route="chat", model=None, tokens=0)
    decisions = [limiter.admit_now(plan) for _ in range(600)]
    assert all(d.allowed and d.wait_ms == 0 and d.ticket is None for d in decisions)
    assert limiter.room.waiting("demo") == 0
    assert QUEUE_WAIT_HEADER not in dict(decisions[0].headers())


def test_the_resets_a_waited_request_reports_are_as_of_the_end_of_its_wait() -> None:
    limiter = LocalLimiter(clock=FrozenClock())
    _, decision = _waiting_decision(limiter)
    assert decision.reset_ms == (200,)  # from -1 to full (1) at 10 per second
    assert dict(decision.headers(100))[b"x-ratelimit-reset-requests"] == b"100ms"
    assert dict(decision.headers(250))[b"x-ratelimit-reset-requests"] == b"0s"


async def test_redis_down_the_local_fallback_waits_and_gives_back_the_same_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(CLIENT_OVERRIDE_ENV, raising=False)
    # Nothing listens on port 1: every call fails at once and the local limiter decides.
    limiter = build_limiter(RedisSettings(url="redis://127.0.0.1:1", on_failure="local"))
    assert isinstance(limiter, RedisLimiter)
    key = make_key("demo", limits=Limits(**RPM, max_wait=3))
    plan = Planner(LimitsSection(), [key]).charges(key=key, route="chat", model=None, tokens=0)
    try:
        first = await limiter.admit(plan)
        second = await limiter.admit(plan)
        assert first.degraded
        assert second.degraded
        assert 990 <= second.wait_ms <= 1000
        await limiter.give_back(second)
        limiter.waited(second)
        third = await limiter.admit(plan)
        assert 990 <= third.wait_ms <= 1000  # the slot given back
    finally:
        await limiter.aclose()


# -- Configuration ------------------------------------------------------------------------------

_BASE = """
upstreams: {u: {base_url: "http://127.0.0.1:1/v1"}}
routes:
  - {name: chat, path: /v1/chat/completions, upstream: u}
  - {name: batch, path: /v1/batches, upstream: u}
keys:
"""


def _planned(config_text: str, route: str = "chat") -> tuple[int, int]:
    config = parse_config_text(_BASE + config_text)
    key = config.keys[0]
    plan = Planner.from_config(config).charges(key=key, route=route, model=None, tokens=0)
    return plan.buckets.max_wait_ms, plan.buckets.max_waiting


def test_max_wait_comes_from_the_key_or_its_route_which_wins() -> None:
    own = f"  - {{name: a, hash: {HASH}, limits: {{requests_per_minute: 60, max_wait: 2}}}}\n"
    assert _planned(own) == (2000, DEFAULT_MAX_WAITING)
    defaulted = (
        f"  - {{name: a, hash: {HASH}}}\n"
        "limits: {default: {requests_per_minute: 60, max_wait: 0.5, max_waiting: 7}}\n"
    )
    assert _planned(defaulted) == (500, 7)
    routed = own + "limits: {routes: {chat: {max_wait: 5}, batch: {max_wait: 0}}}\n"
    assert _planned(routed, "chat") == (5000, DEFAULT_MAX_WAITING)
    assert _planned(routed, "batch")[0] == 0


def test_a_plan_that_cannot_wait_pays_nothing_for_waiting() -> None:
    key = make_key("demo", limits=Limits(**RPM))
    plan = Planner(LimitsSection(), [key]).charges(key=key, route="chat", model=None, tokens=0)
    assert plan.buckets.max_wait_ms == 0
    assert plan.buckets.no_wait_command is plan.buckets.admit_command


@pytest.mark.parametrize(
    ("limits", "path"),
    [
        ("{teams: {t: {max_wait: 1}}}", r"limits\.teams\.t\.max_wait"),
        ("{models: {gpt-4o: {max_wait: 1}}}", r"limits\.models\.gpt-4o\.max_wait"),
        ("{routes: {chat: {max_waiting: 3}}}", r"limits\.routes\.chat\.max_waiting"),
        ("{default: {max_wait: 601}}", r"max_wait"),
        ("{default: {max_wait: -1}}", r"max_wait"),
        ("{default: {max_waiting: 0}}", r"max_waiting"),
    ],
)
def test_waiting_is_refused_where_it_does_not_apply(limits: str, path: str) -> None:
    with pytest.raises(ConfigError, match=path):
        parse_config_text(
            _BASE + f"  - {{name: a, hash: {HASH}, team: t}}\nallow_unlisted_models: true\n"
            f"limits: {limits}\n"
        )
