from __future__ import annotations

import orjson
import pytest

from gateway.config.model import LimitsSection
from gateway.limits import RATELIMIT_HEADERS, Decision, format_duration

from .factories import limits, make_key, plan_for


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0s"),
        (-5, "0s"),
        (1, "1ms"),
        (20, "20ms"),
        (999, "999ms"),
        (1000, "1s"),
        (1500, "1.5s"),
        (8640, "8.64s"),
        (59_999, "59.999s"),
        (60_000, "1m0s"),
        (90_500, "1m30.5s"),
        (360_000, "6m0s"),
        (3_600_000, "1h0m0s"),
        (3_723_004, "1h2m3.004s"),
    ],
)
def test_durations_are_formatted_like_go_and_openai(ms: int, text: str) -> None:
    assert format_duration(ms) == text


def _two_kinds_plan(tokens: int = 10) -> Decision:
    key = make_key("demo", team="ml", limits=limits(60, 1000))
    section = LimitsSection(teams={"ml": limits(600, 500)})
    plan = plan_for(key, tokens, section=section)
    kinds = [b.kind for b in plan.buckets.buckets]
    assert kinds == ["requests", "tokens", "requests", "tokens"]
    # key rpm, key tpm, team rpm, team tpm
    return Decision(plan, True, 0, (59, 990, 599, 400), (1000, 600, 100, 12_000))


def test_headers_report_the_most_constraining_bucket_of_each_kind() -> None:
    headers = dict(_two_kinds_plan().headers())
    assert headers == {
        b"x-ratelimit-limit-requests": b"60",
        b"x-ratelimit-remaining-requests": b"59",
        b"x-ratelimit-reset-requests": b"1s",
        b"x-ratelimit-limit-tokens": b"500",
        b"x-ratelimit-remaining-tokens": b"400",
        b"x-ratelimit-reset-tokens": b"12s",
    }
    assert set(headers) == RATELIMIT_HEADERS


def test_headers_never_show_a_negative_remaining() -> None:
    plan = plan_for(make_key("demo", limits=limits(tpm=100)), 10)
    decision = Decision(plan, False, 30_000, (-200,), (180_000,), 0)
    assert dict(decision.headers())[b"x-ratelimit-remaining-tokens"] == b"0"


def test_a_key_without_limits_gets_no_headers() -> None:
    plan = plan_for(make_key("free"), 10)
    assert plan.buckets.buckets == ()
    assert Decision(plan, True).headers() == []


def test_refusal_is_a_429_with_retry_headers_and_openai_body() -> None:
    plan = plan_for(make_key("demo", limits=limits(60)), 0)
    decision = Decision(plan, False, 1001, (0,), (1001,), 0)
    error = decision.error()
    assert error.status == 429
    headers = dict(error.headers)
    assert headers[b"retry-after"] == b"2"  # rounded up
    assert headers[b"retry-after-ms"] == b"1001"
    assert headers[b"x-ratelimit-remaining-requests"] == b"0"
    assert orjson.loads(error.body()) == {
        "error": {
            "message": "Rate limit reached for requests per min (RPM) on key 'demo': "
            "Limit 60, Used 60, Requested 1. Please try again in 1.001s.",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }


def test_retry_after_is_at_least_one_second() -> None:
    plan = plan_for(make_key("demo", limits=limits(6000)), 0)
    decision = Decision(plan, False, 7, (0,), (10,), 0)
    headers = dict(decision.refusal_headers())
    assert headers[b"retry-after"] == b"1"
    assert headers[b"retry-after-ms"] == b"7"


def test_a_request_larger_than_the_bucket_says_so_without_retry_after() -> None:
    key = make_key("demo", limits=limits(60, 1000))
    plan = plan_for(key, 5000)
    decision = Decision(plan, False, -1, (59, 1000), (0, 0), 1)
    assert decision.kind == "tokens"
    assert decision.retry_after_ms == -1  # waiting cannot help
    error = decision.error()
    assert error.type == "tokens"
    assert error.message == (
        "Request too large for tokens per min (TPM) on key 'demo': Limit 1000, Requested 5000. "
        "The input or output tokens must be reduced in order to run successfully."
    )
    assert b"retry-after" not in dict(error.headers)


def test_unavailable_limits_are_a_503_with_retry_after() -> None:
    plan = plan_for(make_key("demo", limits=limits(60)), 0)
    error = Decision(plan, False, 1500, degraded=True, unavailable=True).error()
    assert error.status == 503
    assert error.code == "rate_limit_unavailable"
    assert dict(error.headers)[b"retry-after"] == b"2"


def test_charges_cost_one_request_and_the_token_estimate() -> None:
    plan = plan_for(make_key("demo", limits=limits(60, 1000)), 123)
    assert [(c.bucket.kind, c.cost) for c in plan.charges] == [("requests", 1), ("tokens", 123)]
