"""Retries, failover and fallback chains in process (``gateway/pipeline/failover.py``): several
targets behind the stand-in seam, told apart by their host.

The end-to-end tests (``tests/end_to_end/test_failover.py``) check the same rules with real
processes, real sockets and measured timings; these pin the decisions themselves.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import orjson

from gateway.app import Gateway
from gateway.auth import hash_key
from gateway.upstream.health import TargetHealth
from gateway.upstream.seam import OutboundRequest, UpstreamConnectError, UpstreamTimeout
from tests.support.standin import Scripted, StandInUpstream, call, in_process_gateway, json_answer

KEY = "sk-gw-failover"
AUTH = [("authorization", f"Bearer {KEY}"), ("content-type", "application/json")]
CHAT = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
OK = {"id": "chatcmpl-1", "object": "chat.completion"}


def config(upstream: str, models: str = "", server: str = "") -> str:
    return f"""
server: {{access_log: true{server}}}
upstreams:
{upstream}
routes:
  - {{name: chat, path: /v1/chat/completions, upstream: main}}
models:
{models or "  {}"}
allow_unlisted_models: true
keys:
  - {{name: demo, hash: {hash_key(KEY)}}}
"""


THREE = """\
  main:
    targets:
      - {name: a, base_url: "http://a.test/v1"}
      - {name: b, base_url: "http://b.test/v1"}
      - {name: c, base_url: "http://c.test/v1"}
    retry: {backoff_base: 0.001, backoff_max: 0.002}
    outlier: {consecutive_failures: 2, base_ejection: 60}
"""


def host(request: OutboundRequest) -> str:
    return request.url.split("/")[2].split(".")[0]


def by_host(**answers: Callable[[], Scripted]) -> StandInUpstream:
    return StandInUpstream(lambda request: answers[host(request)]())


def refuse() -> Scripted:
    return Scripted(fault=UpstreamConnectError("refused"))


def ok() -> Scripted:
    return json_answer(OK)


def unavailable() -> Scripted:
    return json_answer({"error": {"message": "overloaded", "code": None}}, 503)


def hosts(upstream: StandInUpstream) -> list[str]:
    return [host(request) for request in upstream.requests]


async def test_a_refusing_target_is_left_for_a_healthy_one_and_the_response_names_it() -> None:
    upstream = by_host(a=refuse, b=refuse, c=ok)
    log = io.StringIO()
    async with in_process_gateway(config(THREE), upstream, access_stream=log) as gateway:
        response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
    assert response.status == 200
    assert response.json() == OK
    assert response.headers["x-gateway-target"] == "main/c"
    tried = hosts(upstream)
    assert tried[-1] == "c"
    assert len(tried) == len(set(tried))
    line = orjson.loads(log.getvalue().splitlines()[-1])
    assert line["target"] == "main/c"
    assert line.get("attempts", 1) == len(tried)  # written when there was more than one
    assert line.get("retries", []) == [f"{name}:connect" for name in tried[:-1]]


async def test_the_body_is_replayed_byte_for_byte_to_every_target() -> None:
    upstream = by_host(a=refuse, b=refuse, c=refuse)
    async with in_process_gateway(config(THREE), upstream) as gateway:
        await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
    assert len(upstream.requests) == 3
    assert all(request.body == CHAT for request in upstream.requests)


async def test_when_every_target_fails_to_connect_the_client_gets_a_502_naming_the_last() -> None:
    upstream = by_host(a=refuse, b=refuse, c=refuse)
    async with in_process_gateway(config(THREE), upstream) as gateway:
        response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
    assert response.status == 502
    assert response.json()["error"]["type"]
    assert response.headers["x-gateway-target"] == f"main/{hosts(upstream)[-1]}"
    assert "a.test" not in response.body.decode()


async def test_when_every_attempt_answers_503_the_last_503_is_relayed_as_sent() -> None:
    upstream = by_host(a=unavailable, b=unavailable, c=unavailable)
    async with in_process_gateway(config(THREE), upstream) as gateway:
        response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
    assert response.status == 503
    assert response.json() == {"error": {"message": "overloaded", "code": None}}
    assert len(upstream.requests) == 3
    # The answers that were retried were closed, the relayed one read to its end.
    assert [r.closed for r in upstream.responses] == [True, True, False]
    assert upstream.responses[-1].released


async def test_a_status_not_listed_is_relayed_at_once() -> None:
    upstream = by_host(a=lambda: json_answer({"error": {"message": "bad"}}, 400), b=ok, c=ok)
    upstream.respond = lambda request: json_answer({"error": {"message": "bad"}}, 400)
    async with in_process_gateway(config(THREE), upstream) as gateway:
        response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
    assert response.status == 400
    assert len(upstream.requests) == 1


async def test_a_429_with_retry_after_rests_its_target_and_the_next_requests_go_elsewhere() -> None:
    def busy() -> Scripted:
        return Scripted(
            429, ((b"retry-after", b"30"), (b"content-type", b"application/json")), (b"{}",)
        )

    upstream = by_host(a=busy, b=ok, c=ok)
    yaml = THREE.replace(
        'base_url: "http://b.test/v1"', 'base_url: "http://b.test/v1", weight: 0.000001'
    )
    async with in_process_gateway(config(yaml), upstream) as gateway:
        for _ in range(20):
            response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
            assert response.status == 200
    assert hosts(upstream).count("a") <= 1  # asked once at most, then left to rest


async def test_consecutive_failures_eject_a_target_and_it_gets_no_traffic_while_ejected() -> None:
    upstream = by_host(a=unavailable, b=ok, c=ok)
    async with in_process_gateway(config(THREE), upstream) as gateway:
        for _ in range(40):
            response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
            assert response.status == 200
        health = next(
            t.health for t in gateway.runtime().upstreams["main"].targets if t.target == "a"
        )
        assert health.probation
        assert health.ejected_total == 1
        before = hosts(upstream).count("a")
        for _ in range(20):
            await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
        assert hosts(upstream).count("a") == before == 2  # consecutive_failures: 2


async def test_targets_are_never_all_ejected() -> None:
    upstream = by_host(a=unavailable, b=unavailable, c=unavailable)
    async with in_process_gateway(config(THREE), upstream) as gateway:
        for _ in range(30):
            await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
        group = gateway.runtime().upstreams["main"]
        ejected = [t.target for t in group.targets if t.health.probation]
        # max_ejected_percent 50 of three: one.
        assert len(ejected) == 1
        assert group.usable_targets() == 2


async def test_an_ejected_target_is_probed_by_one_request_once_its_time_is_up() -> None:
    state = {"a": unavailable}
    upstream = StandInUpstream(
        lambda request: state[host(request)]() if host(request) == "a" else ok()
    )
    yaml = THREE.replace("base_ejection: 60", "base_ejection: 0.05")
    async with in_process_gateway(config(yaml), upstream) as gateway:
        health = next(
            t.health for t in gateway.runtime().upstreams["main"].targets if t.target == "a"
        )
        while not health.probation:
            await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
        state["a"] = ok
        time.sleep(0.06)
        for _ in range(30):
            await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
        assert not health.probation  # its probe succeeded: back in service
        assert health.ejections == 1  # the next ejection would last longer


async def test_failover_never_after_first_byte() -> None:
    def cut() -> Scripted:
        return Scripted(
            200,
            ((b"content-type", b"text/event-stream"),),
            (b"data: {}\n\n", b"data: {}\n\n"),
            cut_after=1,
        )

    upstream = by_host(a=cut, b=cut, c=cut)
    async with in_process_gateway(config(THREE), upstream) as gateway:
        response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
    assert response.status == 200
    assert not response.complete  # cut, not ended cleanly
    assert len(upstream.requests) == 1


async def test_a_timeout_is_not_retried_when_on_timeout_is_false() -> None:
    upstream = by_host(
        a=lambda: Scripted(fault=UpstreamTimeout("slow")),
        b=lambda: Scripted(fault=UpstreamTimeout("slow")),
        c=lambda: Scripted(fault=UpstreamTimeout("slow")),
    )
    yaml = THREE.replace("retry: {", "retry: {on_timeout: false, ")
    async with in_process_gateway(config(yaml), upstream) as gateway:
        response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
    assert response.status == 504
    assert len(upstream.requests) == 1


async def test_the_attempt_timeout_moves_on_from_a_target_that_hangs() -> None:
    upstream = by_host(a=lambda: Scripted(head_delay=30), b=ok, c=ok)
    yaml = THREE.replace("retry: {", "retry: {attempt_timeout: 0.05, ")
    yaml = yaml.replace(
        'base_url: "http://b.test/v1"', 'base_url: "http://b.test/v1", weight: 0.000001'
    )
    yaml = yaml.replace(
        'base_url: "http://c.test/v1"', 'base_url: "http://c.test/v1", weight: 0.000001'
    )
    async with in_process_gateway(config(yaml), upstream) as gateway:
        started = time.monotonic()
        response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
        elapsed = time.monotonic() - started
    assert response.status == 200
    assert hosts(upstream)[0] == "a"
    assert 0.05 <= elapsed < 1.0


async def test_a_target_model_map_renames_the_model_for_that_target_only() -> None:
    yaml = """\
  main:
    targets:
      - {name: a, base_url: "http://a.test/v1", models: {gpt-4o: a-deployment}}
      - {name: b, base_url: "http://b.test/v1"}
    retry: {attempts: 2}
"""
    upstream = by_host(a=refuse, b=ok)
    upstream.respond = lambda request: refuse() if host(request) == "a" else ok()
    # Weighted random could start at b: ask until a was tried first.
    async with in_process_gateway(config(yaml), upstream) as gateway:
        for _ in range(50):
            await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
            if upstream.requests[0:1] and host(upstream.requests[0]) == "a":
                break
            upstream.requests.clear()
    sent = {host(request): request.body for request in upstream.requests}
    assert orjson.loads(sent["a"])["model"] == "a-deployment"
    assert sent["b"] == CHAT  # the client's bytes, untouched


FALLBACK_UPSTREAMS = """\
  main:
    base_url: "http://a.test/v1"
  big:
    base_url: "http://b.test/v1"
"""
FALLBACK_MODELS = """\
  gpt-4o:
    upstream: main
    fallbacks: [{upstream: big, model: gpt-4o-long}]
    fallback_on: [{status: 400, code: context_length_exceeded}]
"""


def too_long(code: str) -> Callable[[], Scripted]:
    return lambda: json_answer({"error": {"message": "too long", "code": code}}, 400)


async def test_a_fallback_chain_moves_on_a_listed_error_code_with_the_next_model() -> None:
    upstream = by_host(a=too_long("context_length_exceeded"), b=ok)
    async with in_process_gateway(config(FALLBACK_UPSTREAMS, FALLBACK_MODELS), upstream) as gateway:
        response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
    assert response.status == 200
    assert response.headers["x-gateway-target"] == "big"
    assert hosts(upstream) == ["a", "b"]
    assert orjson.loads(upstream.requests[1].body)["model"] == "gpt-4o-long"


async def test_an_error_with_another_code_is_relayed_whole_and_the_chain_stops() -> None:
    upstream = by_host(a=too_long("invalid_value"), b=ok)
    async with in_process_gateway(config(FALLBACK_UPSTREAMS, FALLBACK_MODELS), upstream) as gateway:
        response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
    assert response.status == 400
    assert response.json()["error"]["code"] == "invalid_value"
    assert hosts(upstream) == ["a"]


async def test_a_chain_moves_on_when_its_step_cannot_connect() -> None:
    upstream = by_host(a=refuse, b=ok)
    async with in_process_gateway(config(FALLBACK_UPSTREAMS, FALLBACK_MODELS), upstream) as gateway:
        response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
    assert response.status == 200
    assert hosts(upstream) == ["a", "b"]


async def test_the_target_header_can_be_turned_off() -> None:
    upstream = by_host(a=ok, b=ok, c=ok)
    async with in_process_gateway(
        config(THREE, server=", target_header: false"), upstream
    ) as gateway:
        response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
    assert response.status == 200
    assert "x-gateway-target" not in response.headers


async def test_a_single_base_url_never_waits_for_its_own_retry_after() -> None:
    def busy() -> Scripted:
        return Scripted(429, ((b"retry-after", b"30"),), (b"{}",))

    upstream = by_host(a=busy)
    yaml = '  main:\n    base_url: "http://a.test/v1"\n'
    async with in_process_gateway(config(yaml), upstream) as gateway:
        started = time.monotonic()
        for _ in range(3):
            response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
            assert response.status == 429
        assert time.monotonic() - started < 1.0
    assert len(upstream.requests) == 3  # relayed every time, as without the gateway


async def test_with_retries_a_single_target_s_retry_after_is_waited_within_the_budget() -> None:
    def busy_then_ok() -> Scripted:
        if len(upstream.requests) == 1:
            return Scripted(429, ((b"retry-after-ms", b"200"),), (b"{}",))
        return ok()

    upstream = by_host(a=busy_then_ok)
    yaml = '  main:\n    base_url: "http://a.test/v1"\n    retry: {attempts: 2, budget: 5}\n'
    async with in_process_gateway(config(yaml), upstream) as gateway:
        started = time.monotonic()
        response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
        elapsed = time.monotonic() - started
    assert response.status == 200
    assert 0.2 <= elapsed < 1.0


async def test_a_retry_after_beyond_the_budget_is_not_waited_and_the_429_is_relayed() -> None:
    def busy() -> Scripted:
        return Scripted(429, ((b"retry-after", b"10"),), (b'{"error": "slow down"}',))

    upstream = by_host(a=busy)
    yaml = '  main:\n    base_url: "http://a.test/v1"\n    retry: {attempts: 3, budget: 2}\n'
    async with in_process_gateway(config(yaml), upstream) as gateway:
        started = time.monotonic()
        response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
        elapsed = time.monotonic() - started
    assert response.status == 429
    assert response.body == b'{"error": "slow down"}'
    assert response.headers["retry-after"] == "10"
    assert elapsed < 0.5
    assert len(upstream.requests) == 1


# -- nothing is left behind, whatever ends the request -------------------------------------

TWO_AND_BIG = """\
  main:
    targets:
      - {name: a, base_url: "http://a.test/v1"}
      - {name: a2, base_url: "http://a2.test/v1"}
    retry: {attempts: 1}
  big:
    base_url: "http://b.test/v1"
"""


def health_of(gateway: Gateway, upstream: str, name: str) -> TargetHealth:
    return next(t.health for t in gateway.runtime().upstreams[upstream].targets if t.target == name)


async def test_a_fallback_error_body_cut_while_read_leaks_no_count_and_no_probe() -> None:
    def cut_400() -> Scripted:
        return Scripted(400, ((b"content-type", b"application/json"),), (b'{"error":',), 0)

    upstream = by_host(a=cut_400, a2=cut_400, b=ok)
    async with in_process_gateway(config(TWO_AND_BIG, FALLBACK_MODELS), upstream) as gateway:
        main = [health_of(gateway, "main", name) for name in ("a", "a2")]
        for health in main:  # both just out of an ejection: the next request probes one
            health.probation, health.ejections, health.ejected_until = True, 1, 0.0
        response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
    assert response.status == 200  # the chain moved on to big
    assert all(h.outstanding == 0 and not h.probe_in_flight for h in main)
    assert all(r.closed or r.released for r in upstream.responses)


async def test_a_client_leaving_while_a_fallback_error_body_is_read_leaks_nothing() -> None:
    def slow_400() -> Scripted:
        body = (b'{"error": {"code": "context_length_exceeded"}}',)
        return Scripted(400, ((b"content-type", b"application/json"),), body, chunk_delay=1.0)

    upstream = by_host(a=slow_400, a2=slow_400, b=ok)
    async with in_process_gateway(config(TWO_AND_BIG, FALLBACK_MODELS), upstream) as gateway:
        await call(
            gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT, disconnect_after=0.2
        )
        targets = gateway.runtime().upstreams["main"].targets
        assert sum(t.health.outstanding for t in targets) == 0
    assert all(r.closed for r in upstream.responses)


async def test_a_client_fault_on_a_probe_leaves_the_target_to_be_probed_again() -> None:
    def broken() -> Scripted:
        return Scripted(fault=RuntimeError("a bug in the HTTP client"))

    upstream = by_host(a=broken, b=ok, c=ok)
    async with in_process_gateway(config(THREE), upstream) as gateway:
        probed = health_of(gateway, "main", "a")
        probed.probation, probed.ejections, probed.ejected_until = True, 1, 0.0
        for name in ("b", "c"):  # a is the only usable candidate
            health_of(gateway, "main", name).rested_until = 1e12
        response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
    assert response.status == 502
    assert not probed.probe_in_flight


async def test_an_unreadable_retry_after_is_ignored_not_a_500() -> None:
    def odd_429() -> Scripted:
        return Scripted(429, ((b"retry-after", b"\xb2"),), (b"{}",))

    upstream = by_host(a=odd_429, b=ok, c=ok)
    yaml = THREE.replace('"http://a.test/v1"}', '"http://a.test/v1", weight: 1000000}')
    async with in_process_gateway(config(yaml), upstream) as gateway:
        for _ in range(3):
            response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
            assert response.status == 200


async def test_a_client_leaving_during_a_retry_after_wait_closes_the_kept_answer() -> None:
    def busy() -> Scripted:
        return Scripted(429, ((b"retry-after", b"1"),), (b"{}",))

    upstream = by_host(a=busy)
    yaml = '  main:\n    base_url: "http://a.test/v1"\n    retry: {attempts: 2, budget: 5}\n'
    async with in_process_gateway(config(yaml), upstream) as gateway:
        await call(
            gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT, disconnect_after=0.2
        )
        assert health_of(gateway, "main", "default").outstanding == 0
    assert upstream.responses[0].closed


async def test_a_503_then_a_refused_connection_relays_the_upstreams_503() -> None:
    two = """\
  main:
    targets:
      - {name: a, base_url: "http://a.test/v1", weight: 1000000}
      - {name: b, base_url: "http://b.test/v1"}
    outlier: {enabled: false}
"""
    upstream = by_host(a=unavailable, b=refuse)
    async with in_process_gateway(config(two), upstream) as gateway:
        response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
    assert response.status == 503  # the upstream's own answer beats the gateway's 502
    assert response.json()["error"]["message"] == "overloaded"


async def test_a_chain_moves_on_rather_than_wait_for_a_rested_primary() -> None:
    def busy() -> Scripted:
        return Scripted(429, ((b"retry-after", b"2"),), (b"{}",))

    upstreams = TWO_AND_BIG.replace("    retry: {attempts: 1}\n", "")
    models = "  gpt-4o:\n    upstream: main\n    fallbacks: [{upstream: big, model: gpt-4o-long}]\n"
    upstream = by_host(a=busy, a2=busy, b=ok)
    async with in_process_gateway(config(upstreams, models), upstream) as gateway:
        await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
        started = time.monotonic()
        response = await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
        elapsed = time.monotonic() - started
    assert response.status == 200
    assert response.headers["x-gateway-target"] == "big"
    assert elapsed < 0.5
