from __future__ import annotations

from redis.crc import key_slot

from gateway.auth import hash_key
from gateway.config.model import ApiKey, GatewayConfig, Limits, LimitsSection
from gateway.limits import Planner
from gateway.limits.lua import ADMIT_SHA
from gateway.limits.plan import key_id

from .factories import limits, make_key, plan_for, raw_key


def test_a_key_without_limits_uses_the_default() -> None:
    key = make_key("demo")
    section = LimitsSection(default=limits(60, 10_000))
    plan = plan_for(key, 7, section=section)
    kid = key_id(key)
    assert [(b.key, b.kind, b.capacity, b.per_second) for b in plan.buckets.buckets] == [
        (f"rl:{{k:{kid}}}:rpm", "requests", 60, 1.0),
        (f"rl:{{k:{kid}}}:tpm", "tokens", 10_000, 10_000 / 60),
    ]
    assert plan.tokens == 7
    assert plan.key_name == "demo"


def test_own_limits_replace_the_default_and_null_means_no_bucket() -> None:
    key = make_key("demo", limits=limits(tpm=1000, token_burst=5000))
    section = LimitsSection(default=limits(60, 10_000))
    buckets = plan_for(key, section=section).buckets.buckets
    assert [(b.kind, b.capacity, b.per_second) for b in buckets] == [("tokens", 5000, 1000 / 60)]


def test_burst_sets_capacity_and_the_rate_sets_refill() -> None:
    key = make_key("demo", limits=limits(120, request_burst=10))
    (bucket,) = plan_for(key).buckets.buckets
    assert (bucket.capacity, bucket.per_second) == (10, 2.0)


def test_team_keys_share_the_team_bucket_and_one_hash_tag() -> None:
    a = make_key("a", team="ml", limits=limits(60))
    b = make_key("b", team="ml", limits=limits(60))
    section = LimitsSection(teams={"ml": limits(100)})
    planner = Planner(section, [a, b])
    plan_a = planner.charges(key=a, route="chat", model=None, tokens=0)
    plan_b = planner.charges(key=b, route="chat", model=None, tokens=0)
    keys_a = [x.key for x in plan_a.buckets.buckets]
    keys_b = [x.key for x in plan_b.buckets.buckets]
    assert keys_a == [f"rl:{{t:ml}}:k:{key_id(a)}:rpm", "rl:{t:ml}:rpm"]
    assert keys_b[1] == keys_a[1]  # the team's bucket is shared
    assert keys_a[0] != keys_b[0]
    assert plan_a.buckets.buckets[1].scope == "team 'ml'"
    assert len({key_slot(k.encode()) for k in keys_a + keys_b}) == 1


def test_route_and_model_buckets_are_per_key_and_in_the_keys_slot() -> None:
    key = make_key("demo", limits=limits(60))
    section = LimitsSection(
        routes={"chat": limits(10)},
        models={"gpt-4o": limits(tpm=1000), "gpt-4*": limits(tpm=500), "o*": limits(5)},
    )
    planner = Planner(section, [key])
    plan = planner.charges(key=key, route="chat", model="gpt-4o", tokens=50)
    kid = key_id(key)
    assert [(b.key, b.capacity) for b in plan.buckets.buckets] == [
        (f"rl:{{k:{kid}}}:rpm", 60),
        (f"rl:{{k:{kid}}}:r:chat:rpm", 10),
        (f"rl:{{k:{kid}}}:m:gpt-4o:tpm", 1000),
    ]
    # A pattern chooses the limits; each model matching it has its own bucket.
    turbo = planner.charges(key=key, route="embeddings", model="gpt-4-turbo", tokens=0)
    assert [(b.key, b.capacity) for b in turbo.buckets.buckets] == [
        (f"rl:{{k:{kid}}}:rpm", 60),
        (f"rl:{{k:{kid}}}:m:gpt-4-turbo:tpm", 500),
    ]
    other = planner.charges(key=key, route="embeddings", model="claude", tokens=0)
    assert len(other.buckets.buckets) == 1
    keys = [b.key for p in (plan, turbo) for b in p.buckets.buckets]
    assert len({key_slot(k.encode()) for k in keys}) == 1


def test_redis_keys_never_contain_the_raw_key_or_odd_model_names() -> None:
    key = make_key("demo", limits=limits(60))
    section = LimitsSection(models={"*": limits(tpm=100)})
    plan = plan_for(key, model="we{ird} model\n" * 10, section=section)
    for bucket in plan.buckets.buckets:
        assert raw_key("demo") not in bucket.key
        assert bucket.key.startswith(f"rl:{{k:{key_id(key)}}}:")
        assert bucket.key.count("{") == 1
        assert " " not in bucket.key
    assert key_id(key) == key.hash[7:23]


def test_combinations_are_built_once_with_their_commands() -> None:
    key = make_key("demo", limits=limits(60, 1000))
    planner = Planner(LimitsSection(), [key])
    first = planner.charges(key=key, route="chat", model="m", tokens=1)
    second = planner.charges(key=key, route="chat", model="m", tokens=2)
    assert first.buckets is second.buckets
    command = first.buckets.admit_command
    assert command[:3] == ("EVALSHA", ADMIT_SHA, "2")
    assert command[3:5] == tuple(b.key for b in first.buckets.buckets)
    assert first.buckets.settle_command[2:4] == ("1", first.buckets.buckets[1].key)


def test_a_key_from_another_snapshot_is_still_planned() -> None:
    planner = Planner(LimitsSection(default=limits(5)), [])
    plan = planner.charges(key=make_key("late"), route="chat", model=None, tokens=0)
    assert [b.capacity for b in plan.buckets.buckets] == [5]


def test_planner_from_config() -> None:
    key = make_key("demo")
    config = GatewayConfig(keys=(key,), limits=LimitsSection(default=limits(30)))
    plan = Planner.from_config(config).charges(key=key, route="r", model=None, tokens=0)
    assert [b.capacity for b in plan.buckets.buckets] == [30]


def test_a_rebuilt_planner_keeps_the_plans_of_unchanged_keys_only() -> None:
    limits = LimitsSection(default=Limits(requests_per_minute=60))
    same = ApiKey(name="same", hash=hash_key("a"))
    changed = ApiKey(name="changed", hash=hash_key("b"))
    first = Planner(limits, [same, changed])
    plan = first.charges(key=same, route="chat", model=None, tokens=0)
    edited = ApiKey(name="changed", hash=hash_key("b"), limits=Limits(requests_per_minute=5))
    second = Planner(limits, [same, edited], previous=first)
    assert second.charges(key=same, route="chat", model=None, tokens=0).buckets is plan.buckets
    (bucket,) = second.charges(key=edited, route="chat", model=None, tokens=0).buckets.buckets
    assert bucket.capacity == 5
    # Other limits: nothing is reused.
    third = Planner(LimitsSection(default=Limits(requests_per_minute=1)), [same], previous=second)
    (bucket,) = third.charges(key=same, route="chat", model=None, tokens=0).buckets.buckets
    assert bucket.capacity == 1
