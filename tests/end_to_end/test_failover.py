"""Retries, failover, fallback chains and outlier ejection, end to end: a real ``gateway serve``
process in front of real upstream servers that misbehave on cue.

Each upstream of the gateway's config is served by its own fake upstreams
(``tests/support/fakeupstream``, one real server per target, scripted by the test) and, for a
target that refuses connections, by a port that is bound but never listens. Every upstream has
a model alias of its own name, so a test reaches it by naming the model, and each test owns its
upstreams: the health one test teaches the gateway never leaks into another.

Weights a million apart (``a: 1e24, b: 1e18, c: 1``) make the gateway try the targets in that
order (all but once in a million), so that a test can say which target fails and which one
answers.

What must hold (the issue's list): the client gets a success whenever any target could serve
before the first byte; a failure after the first byte is surfaced, never retried; the retry
budget and the backoff hold, measured; a cooled-down target gets no traffic until its probe
succeeds; the official openai SDK never notices a failover; a rate-limit reservation is charged
once per client request and settled from the attempt that answered.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import httpx
import openai
import orjson
import pytest
import yaml

from gateway.auth import hash_key
from tests.conftest import DEMO_KEY
from tests.support.admin import ADMIN_KEY, admin_get
from tests.support.fakeupstream import (
    Controls,
    FakeUpstream,
    RecordedRequest,
    chat_completion_body,
    standard_chat_request,
)
from tests.support.gatewayproc import GatewayProcess

AUTH = {"authorization": f"Bearer {DEMO_KEY}"}
METERED_KEY = "sk-gw-test-metered-0123456789"
TARGET_HEADER = "x-gateway-target"
# Timings measured here allow this much for two processes talking over loopback on a machine
# that may be running other tests.
SLACK = 0.35

NO_EJECTION = {"enabled": False}
# Weights a million apart: the heavier target is tried first all but once in a million.
FIRST, SECOND, THIRD, FOURTH = 1e24, 1e18, 1e12, 1e6


@dataclass(frozen=True)
class Spec:
    """An upstream: its targets, as (target name, fake upstream name or None for a refusing
    port, weight), and its policies. One target without a name is a single ``base_url``."""

    targets: tuple[tuple[str | None, str | None, float], ...]
    retry: dict[str, Any] | None = None
    outlier: dict[str, Any] | None = None
    health_check: dict[str, Any] | None = None


UPSTREAMS: dict[str, Spec] = {
    "plain": Spec(((None, "plain", 1.0),)),
    "refusing": Spec((("a", None, FIRST), ("b", "refusing_b", 1.0)), None, NO_EJECTION),
    "hanging": Spec(
        (("a", "hanging_a", FIRST), ("b", "hanging_b", 1.0)),
        {"attempt_timeout": 0.5},
        NO_EJECTION,
    ),
    "flaky": Spec(
        ((None, "flaky", 1.0),), {"attempts": 3, "backoff_base": 0.2, "backoff_max": 0.2}
    ),
    "resting": Spec((("a", "resting_a", FIRST), ("b", "resting_b", 1.0))),
    "patient": Spec(((None, "patient", 1.0),), {"attempts": 2, "budget": 5}),
    "hasty": Spec(((None, "hasty", 1.0),), {"attempts": 2, "budget": 0.5}),
    "cutting": Spec((("a", "cutting_a", FIRST), ("b", "cutting_b", 1.0)), None, NO_EJECTION),
    "budget": Spec(
        (("a", "budget_a", FIRST), ("b", "budget_b", SECOND), ("c", "budget_c", 1.0)),
        {"attempts": 10, "budget": 0.6, "attempt_timeout": 0.4, "backoff_base": 0.01},
        NO_EJECTION,
    ),
    "backoff": Spec(
        ((None, "backoff", 1.0),), {"attempts": 4, "backoff_base": 0.3, "backoff_max": 0.3}
    ),
    "hop": Spec(
        (("a", "hop_a", FIRST), ("b", "hop_b", 1.0)),
        {"backoff_base": 0.3, "backoff_max": 0.3},
        NO_EJECTION,
    ),
    "cooldown": Spec(
        (("a", "cooldown_a", FIRST), ("b", "cooldown_b", 1.0)),
        None,
        {"consecutive_failures": 2, "base_ejection": 1.5},
    ),
    "checked": Spec(
        (("a", "checked_a", FIRST), ("b", "checked_b", 1.0)),
        None,
        {"consecutive_failures": 2, "base_ejection": 1.0},
        {"path": "/models", "interval": 0.2, "timeout": 0.5},
    ),
    "small": Spec(((None, "small", 1.0),)),
    "large": Spec(((None, "large", 1.0),)),
    "sdk": Spec(
        (("a", None, FIRST), ("b", "sdk_b", SECOND), ("c", "sdk_c", 1.0)), None, NO_EJECTION
    ),
    "metered": Spec((("a", "metered_a", FIRST), ("b", "metered_b", 1.0)), None, NO_EJECTION),
    "nowhere": Spec((("a", None, 1.0), ("b", None, 1.0)), None, NO_EJECTION),
    "logged": Spec((("a", None, FIRST), ("b", "logged_b", 1.0)), None, NO_EJECTION),
    "mixed": Spec(
        (
            ("refusing", None, FIRST),
            ("hanging", "mixed_hanging", SECOND),
            ("failing", "mixed_failing", THIRD),
            ("resting", "mixed_resting", FOURTH),
            ("healthy", "mixed_healthy", 1.0),
        ),
        {"attempt_timeout": 0.3},
    ),
}
FAKES = sorted({fake for spec in UPSTREAMS.values() for _, fake, _ in spec.targets if fake})
# A fallback chain: a small-context model, then a large-context one on another upstream.
CHAIN = {
    "upstream": "small",
    "model": "small-model",
    "fallbacks": [{"upstream": "large", "model": "large-model"}],
    "fallback_on": [{"status": 400, "code": "context_length_exceeded"}],
}
BURST = 100_000
REQUEST_BURST = 1000
# About 1000 tokens of prompt: the reservation (prompt estimate + max_tokens) and the real usage
# differ, so a charge shows which of them it was settled to.
LONG_TEXT = "policy " * 571 + "end"


class Refusing:
    """Ports bound but never listening: a connection to one is refused at once (RST), and no
    other server can take the port while the test holds it."""

    def __init__(self) -> None:
        self._sockets: list[socket.socket] = []

    def port(self) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self._sockets.append(sock)
        port: int = sock.getsockname()[1]
        return port

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()


def upstreams_config(
    fakes: dict[str, FakeUpstream], refusing: Refusing, only: tuple[str, ...] = ()
) -> dict[str, Any]:
    def url(fake: str | None) -> str:
        return fakes[fake].base_url if fake else f"http://127.0.0.1:{refusing.port()}/v1"

    config: dict[str, Any] = {}
    for name, spec in UPSTREAMS.items():
        if only and name not in only:
            continue
        entry: dict[str, Any] = {"auth": {"style": "none"}, "timeouts": {"connect": 1, "read": 10}}
        first_name, first_fake, _ = spec.targets[0]
        if first_name is None:
            entry["base_url"] = url(first_fake)
        else:
            entry["targets"] = [
                {"name": target, "base_url": url(fake), "weight": weight}
                for target, fake, weight in spec.targets
            ]
        if spec.retry is not None:
            entry["retry"] = spec.retry
        if spec.outlier is not None:
            entry["outlier"] = spec.outlier
        if spec.health_check is not None:
            entry["health_check"] = spec.health_check
        config[name] = entry
    return config


def gateway_yaml(
    fakes: dict[str, FakeUpstream],
    refusing: Refusing,
    *,
    target_header: bool = True,
    only: tuple[str, ...] = (),
) -> str:
    upstreams = upstreams_config(fakes, refusing, only)
    models: dict[str, Any] = {name: {"upstream": name} for name in upstreams}
    if not only:
        models["chain"] = CHAIN
    limits = {
        "tokens_per_minute": 1,  # refills one a minute: over a test, only requests move it
        "token_burst": BURST,
        "requests_per_minute": 1,
        "request_burst": REQUEST_BURST,
    }
    config = {
        "server": {"max_body_bytes": 65536, "target_header": target_header},
        "upstreams": upstreams,
        "routes": [{"name": "chat", "path": "/v1/chat/completions", "upstream": "plain"}],
        "models": models,
        "allow_unlisted_models": False,
        "keys": [
            {"name": "demo", "hash": hash_key(DEMO_KEY)},
            {"name": "metered", "hash": hash_key(METERED_KEY), "limits": limits},
        ],
        "admin": {"keys": [{"name": "ops", "hash": hash_key(ADMIN_KEY)}]},
    }
    text: str = yaml.safe_dump(config, sort_keys=False)
    return text


@pytest.fixture(scope="module")
def refusing() -> Iterator[Refusing]:
    ports = Refusing()
    yield ports
    ports.close()


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeUpstream]]:
    started: dict[str, FakeUpstream] = {}
    try:
        for name in FAKES:
            started[name] = FakeUpstream().start()
        yield started
    finally:
        # Each takes ~0.1 s to stop (uvicorn's shutdown): stop them side by side.
        with ThreadPoolExecutor(len(FAKES)) as pool:
            list(pool.map(FakeUpstream.stop, started.values()))


@pytest.fixture(scope="module")
def gateway(fakes: dict[str, FakeUpstream], refusing: Refusing) -> Iterator[GatewayProcess]:
    with GatewayProcess(gateway_yaml(fakes, refusing)) as process:
        yield process


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=15) as http:
        yield http


def chat(
    client: httpx.Client,
    gateway: GatewayProcess,
    model: str,
    *,
    key: str = DEMO_KEY,
    request_id: str | None = None,
    **fields: Any,
) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"}
    if request_id is not None:
        headers["x-request-id"] = request_id
    body = {**standard_chat_request(model), **fields}
    return client.post(gateway.url + "/v1/chat/completions", json=body, headers=headers)


def timed_chat(
    client: httpx.Client, gateway: GatewayProcess, model: str, **fields: Any
) -> tuple[httpx.Response, float]:
    began = time.monotonic()
    response = chat(client, gateway, model, **fields)
    return response, time.monotonic() - began


def gaps(requests: list[RecordedRequest]) -> list[float]:
    """Seconds between the arrivals of consecutive requests."""
    return [later.received_at - earlier.received_at for earlier, later in pairwise(requests)]


def drain(response: httpx.Response, parts: list[bytes]) -> None:
    """Read ``response`` to its end into ``parts``: what arrived before a failure is kept."""
    for chunk in response.iter_raw():
        parts.append(chunk)


def access_line(gateway: GatewayProcess, request_id: str, timeout: float = 3.0) -> dict[str, Any]:
    """The access log's JSON line for ``request_id`` (lines are written in batches)."""
    deadline = time.monotonic() + timeout
    while True:
        for line in gateway.logs().splitlines():
            if request_id in line and line.startswith("{"):
                record: dict[str, Any] = orjson.loads(line)
                if record.get("request_id") == request_id:
                    return record
        if time.monotonic() > deadline:
            raise AssertionError(f"no access line for {request_id}:\n{gateway.logs()[-3000:]}")
        time.sleep(0.05)


def target_state(gateway: GatewayProcess, upstream: str, target: str) -> dict[str, Any]:
    found = admin_get(gateway.url, "upstreams")["upstreams"]
    group = next(u for u in found if u["name"] == upstream)
    state: dict[str, Any] = next(t for t in group["targets"] if t["name"] == target)
    return state


def expected_body(model: str) -> bytes:
    return chat_completion_body(standard_chat_request(model))


# -- Before the first byte, any target that can serve does ----------------------------------------


def test_a_refusing_target_is_skipped_and_the_client_gets_the_healthy_ones_answer(
    gateway: GatewayProcess, fakes: dict[str, FakeUpstream], client: httpx.Client
) -> None:
    for _ in range(3):
        response, elapsed = timed_chat(client, gateway, "refusing")
        assert response.status_code == 200, response.text
        assert response.content == expected_body("refusing")
        assert response.headers[TARGET_HEADER] == "refusing/b"
        assert elapsed < 1.0  # a refused connection costs nothing like a connect timeout
    assert len(fakes["refusing_b"].requests) == 3
    assert target_state(gateway, "refusing", "a")["failures_total"] == 3


def test_a_hanging_target_is_left_after_the_attempt_timeout(
    gateway: GatewayProcess, fakes: dict[str, FakeUpstream], client: httpx.Client
) -> None:
    hanging = fakes["hanging_a"]
    hanging.behave(Controls(hang=True))
    response, elapsed = timed_chat(client, gateway, "hanging")
    assert response.status_code == 200, response.text
    assert response.headers[TARGET_HEADER] == "hanging/b"
    assert response.content == expected_body("hanging")
    assert 0.5 <= elapsed < 0.5 + SLACK  # attempt_timeout: 0.5
    # The gateway gave up on the hanging target: it hung up rather than leave it waiting.
    (asked,) = hanging.requests
    hanging.wait_for_disconnect(timeout=3, request=asked)
    assert len(fakes["hanging_b"].requests) == 1


def test_a_503_then_healthy_target_is_retried_after_a_backoff(
    gateway: GatewayProcess, fakes: dict[str, FakeUpstream], client: httpx.Client
) -> None:
    flaky = fakes["flaky"]
    flaky.script(Controls(status=503))
    response = chat(client, gateway, "flaky")
    assert response.status_code == 200, response.text
    assert response.content == expected_body("flaky")
    assert response.headers[TARGET_HEADER] == "flaky"  # a single base_url: the upstream's name
    first, second = flaky.requests
    assert first.body == second.body  # the same request, replayed byte for byte
    (gap,) = gaps(flaky.requests)
    assert gap < 0.2 + SLACK  # backoff_max: 0.2


def test_a_429_with_retry_after_rests_that_target_and_the_request_goes_elsewhere(
    gateway: GatewayProcess, fakes: dict[str, FakeUpstream], client: httpx.Client
) -> None:
    rested, other = fakes["resting_a"], fakes["resting_b"]
    rested.script(Controls(status=429, retry_after=1))
    response, elapsed = timed_chat(client, gateway, "resting")
    rested_at = time.monotonic()
    assert response.status_code == 200, response.text
    assert response.headers[TARGET_HEADER] == "resting/b"
    assert elapsed < SLACK  # another target could serve: nothing was waited for
    # While it rests, the first choice gets no traffic at all.
    for _ in range(4):
        response = chat(client, gateway, "resting")
        assert response.headers[TARGET_HEADER] == "resting/b"
    assert time.monotonic() - rested_at < 0.9, "too slow to see the rest"
    assert len(rested.requests) == 1
    assert len(other.requests) == 5
    # Its rest is over: it is back in rotation (and first again, by its weight).
    time.sleep(max(0.0, rested_at + 1.1 - time.monotonic()))
    response = chat(client, gateway, "resting")
    assert response.status_code == 200, response.text
    assert response.headers[TARGET_HEADER] == "resting/a"
    assert len(rested.requests) == 2


def test_a_single_target_429_with_retry_after_within_the_budget_is_waited_for(
    gateway: GatewayProcess, fakes: dict[str, FakeUpstream], client: httpx.Client
) -> None:
    patient = fakes["patient"]
    patient.script(Controls(status=429, retry_after=1))
    response, elapsed = timed_chat(client, gateway, "patient")
    assert response.status_code == 200, response.text
    assert response.content == expected_body("patient")
    (gap,) = gaps(patient.requests)
    assert 1.0 <= gap < 1.0 + SLACK
    assert 1.0 <= elapsed < 1.0 + 2 * SLACK


def test_a_retry_after_beyond_the_budget_is_not_waited_for_and_the_429_is_relayed(
    gateway: GatewayProcess, fakes: dict[str, FakeUpstream], client: httpx.Client
) -> None:
    hasty = fakes["hasty"]
    hasty.script(Controls(status=429, retry_after=1))
    response, elapsed = timed_chat(client, gateway, "hasty")
    assert response.status_code == 429  # the upstream's own answer, as it sent it
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert elapsed < 0.5  # budget: 0.5; the rest (1 s) is past it
    assert len(hasty.requests) == 1


def test_the_client_gets_a_success_whenever_any_target_could_serve(
    gateway: GatewayProcess, fakes: dict[str, FakeUpstream], client: httpx.Client
) -> None:
    """Five targets, tried in this order: one refusing connections, one hanging, one answering
    503, one answering 429 with Retry-After: 1, and the one healthy target, last."""
    fakes["mixed_hanging"].behave(Controls(hang=True))
    fakes["mixed_failing"].behave(Controls(status=503))
    fakes["mixed_resting"].behave(Controls(status=429, retry_after=1))
    request_id = uuid.uuid4().hex
    for attempt in range(3):
        response, elapsed = timed_chat(
            client, gateway, "mixed", request_id=request_id if attempt == 0 else None
        )
        assert response.status_code == 200, response.text
        assert response.content == expected_body("mixed")
        assert response.headers[TARGET_HEADER] == "mixed/healthy"
        assert elapsed < 0.3 + SLACK  # one attempt timeout (0.3 s), the rest at once
    assert len(fakes["mixed_healthy"].requests) == 3
    assert len(fakes["mixed_resting"].requests) == 1  # then rested for the next requests
    line = access_line(gateway, request_id)
    assert line["retries"] == [
        "refusing:connect",
        "hanging:timeout",
        "failing:status_503",
        "resting:status_429",
    ]


# -- After the first byte, nothing is retried or hidden --------------------------------------------


def test_failover_never_after_first_byte(
    gateway: GatewayProcess, fakes: dict[str, FakeUpstream], client: httpx.Client
) -> None:
    cutting, healthy = fakes["cutting_a"], fakes["cutting_b"]
    cutting.behave(Controls(fail_after=2))
    body = {**standard_chat_request("cutting", stream=True)}
    parts: list[bytes] = []
    url = gateway.url + "/v1/chat/completions"
    with client.stream("POST", url, json=body, headers=AUTH) as cut:
        assert cut.status_code == 200
        assert cut.headers[TARGET_HEADER] == "cutting/a"
        with pytest.raises(httpx.RemoteProtocolError):
            drain(cut, parts)
    received = b"".join(parts)
    assert received.count(b"\n\n") == 2  # the two events the upstream sent, then the cut
    assert b"[DONE]" not in received
    # Non-streamed: the head and its content-length went out; the body is short.
    with pytest.raises(httpx.RemoteProtocolError):
        chat(client, gateway, "cutting")
    assert len(cutting.requests) == 2  # each asked once
    assert healthy.requests == []  # never asked to cover for it


# -- The budget and the backoff, measured ----------------------------------------------------------


def test_the_retry_budget_bounds_the_total_time(
    gateway: GatewayProcess, fakes: dict[str, FakeUpstream], client: httpx.Client
) -> None:
    """Three hanging targets, 0.4 s per attempt, a 0.6 s budget and up to 10 attempts: no
    attempt may start after 0.6 s, so the client has its 504 after at most two attempts (at
    0 s and 0.4 s), by 0.8 s, rather than after ten."""
    targets = [fakes["budget_a"], fakes["budget_b"], fakes["budget_c"]]
    for fake in targets:
        fake.behave(Controls(hang=True))
    response, elapsed = timed_chat(client, gateway, "budget")
    assert response.status_code == 504, response.text
    assert response.json()["error"]["type"]  # the gateway's own, OpenAI-shaped
    arrivals = sorted(r.received_at for fake in targets for r in fake.requests)
    assert len(arrivals) >= 2  # the budget allowed a second attempt
    started = [at - arrivals[0] for at in arrivals]
    assert max(started) < 0.6, f"an attempt started after the budget: {started}"
    assert 0.6 <= elapsed < 0.6 + 0.4 + SLACK  # budget + the last attempt's timeout


def test_backoff_waits_between_attempts_on_the_same_target(
    gateway: GatewayProcess, fakes: dict[str, FakeUpstream], client: httpx.Client
) -> None:
    """A target tried again waits a random backoff of at most backoff_max (full jitter: 0 to
    0.3 s here); moving to a target not yet tried does not wait."""
    again = fakes["backoff"]
    for _ in range(2):
        again.script(*[Controls(status=503)] * 3)
        response = chat(client, gateway, "backoff")
        assert response.status_code == 200, response.text
    asked = again.requests
    waits = gaps(asked[:4]) + gaps(asked[4:])  # four attempts per client request
    assert len(waits) == 6
    assert max(waits) < 0.3 + SLACK, waits
    # Six uniform draws of 0-0.3 s average 0.15 s; they sum under 0.15 s once in 50,000 runs.
    assert sum(waits) > 0.15, waits

    first, other = fakes["hop_a"], fakes["hop_b"]
    for _ in range(3):
        first.script(Controls(status=503))
        response = chat(client, gateway, "hop")
        assert response.headers[TARGET_HEADER] == "hop/b"
    hops = [
        moved.received_at - left.received_at
        for left, moved in zip(first.requests, other.requests, strict=True)
    ]
    assert max(hops) < 0.1, hops


# -- Outlier ejection ------------------------------------------------------------------------------


def test_a_cooled_down_target_gets_no_traffic_until_its_probe_succeeds(
    gateway: GatewayProcess, fakes: dict[str, FakeUpstream], client: httpx.Client
) -> None:
    """Two failures in a row eject a target for 1.5 s: no request reaches it meanwhile. Then
    exactly one request probes it (the others, sent at the same time, go elsewhere); its
    success puts the target back in rotation."""
    ejected, other = fakes["cooldown_a"], fakes["cooldown_b"]
    ejected.behave(Controls(status=503))
    for _ in range(2):
        response = chat(client, gateway, "cooldown")
        assert response.status_code == 200, response.text
        assert response.headers[TARGET_HEADER] == "cooldown/b"
    assert len(ejected.requests) == 2
    assert target_state(gateway, "cooldown", "a")["state"] == "ejected"

    ejected.behave(Controls(delay=0.5))  # healthy again, and slow enough to watch its probe
    for _ in range(10):
        response = chat(client, gateway, "cooldown")
        assert response.headers[TARGET_HEADER] == "cooldown/b"
    assert len(ejected.requests) == 2, "an ejected target received traffic"

    deadline = time.monotonic() + 3
    while target_state(gateway, "cooldown", "a")["state"] != "probation":
        assert time.monotonic() < deadline, "the ejection did not end"
        time.sleep(0.02)
    served: list[str] = []
    start = threading.Barrier(5)

    def one(own: httpx.Client) -> None:
        start.wait(5)
        answer = chat(own, gateway, "cooldown")
        served.append(f"{answer.status_code} {answer.headers.get(TARGET_HEADER)}")

    with contextlib.ExitStack() as stack:
        # Made beforehand (an SSL context takes tens of ms): the five requests leave together.
        clients = [stack.enter_context(httpx.Client(timeout=10, verify=False)) for _ in range(5)]
        threads = [threading.Thread(target=one, args=(own,)) for own in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    assert sorted(served) == ["200 cooldown/a"] + ["200 cooldown/b"] * 4  # one probe at once
    assert len(ejected.requests) == 3
    assert target_state(gateway, "cooldown", "a")["state"] == "in service"

    ejected.behave(None)
    for _ in range(3):
        assert chat(client, gateway, "cooldown").headers[TARGET_HEADER] == "cooldown/a"
    assert len(ejected.requests) == 6
    assert len(other.requests) == 2 + 10 + 4


def test_with_active_checks_an_ejected_target_gets_no_traffic_until_a_check_passes(
    gateway: GatewayProcess, fakes: dict[str, FakeUpstream], client: httpx.Client
) -> None:
    """With ``health_check``, probing is the checks' job: once its ejection time is over, a
    target still failing its checks gets no request, and the first passing check brings it
    back."""
    ejected, other = fakes["checked_a"], fakes["checked_b"]

    def chats() -> int:
        return sum(r.path.endswith("/chat/completions") for r in ejected.requests)

    ejected.behave(Controls(status=503))  # its chats and its checks
    for _ in range(2):
        response = chat(client, gateway, "checked")
        assert response.status_code == 200, response.text
        assert response.headers[TARGET_HEADER] == "checked/b"
    assert chats() == 2
    ejected_at = time.monotonic()
    time.sleep(max(0.0, ejected_at + 1.2 - time.monotonic()))  # base_ejection: 1.0
    for _ in range(5):
        assert chat(client, gateway, "checked").headers[TARGET_HEADER] == "checked/b"
    assert chats() == 2, "a target failing its checks was probed with traffic"

    ejected.behave(None)
    recovered = time.monotonic()
    deadline = recovered + 3
    while target_state(gateway, "checked", "a")["state"] != "in service":
        assert time.monotonic() < deadline, "a passing check did not bring the target back"
        time.sleep(0.02)
    passed = [r for r in ejected.requests if r.path == "/v1/models" and r.received_at > recovered]
    assert passed, "back in service without a check"
    for _ in range(3):
        assert chat(client, gateway, "checked").headers[TARGET_HEADER] == "checked/a"
    assert chats() == 5
    assert len([r for r in other.requests if r.path.endswith("/chat/completions")]) == 7


# -- Fallback chains -------------------------------------------------------------------------------


def test_a_fallback_chain_moves_to_the_next_model_on_a_context_length_error(
    gateway: GatewayProcess, fakes: dict[str, FakeUpstream], client: httpx.Client
) -> None:
    small, large = fakes["small"], fakes["large"]
    small.script(Controls(status=400, error_code="context_length_exceeded"))
    response = chat(client, gateway, "chain")
    assert response.status_code == 200, response.text
    assert response.headers[TARGET_HEADER] == "large"
    assert response.json()["model"] == "large-model"
    assert [r.json()["model"] for r in small.requests] == ["small-model"]
    assert [r.json()["model"] for r in large.requests] == ["large-model"]

    # Another 400 is the client's to see, whole, and the chain stops there.
    small.script(Controls(status=400, error_code="invalid_value"))
    response = chat(client, gateway, "chain")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_value"
    assert response.headers[TARGET_HEADER] == "small"
    assert len(large.requests) == 1


# -- Clients ---------------------------------------------------------------------------------------


def test_the_openai_sdk_never_notices_a_failover(
    gateway: GatewayProcess, fakes: dict[str, FakeUpstream]
) -> None:
    """Every request meets a refusing target, then one answering 503, then a healthy one; the
    SDK (its own retries off, so they hide nothing) sees what the healthy one would have said."""
    failing, healthy = fakes["sdk_b"], fakes["sdk_c"]
    failing.behave(Controls(status=503))
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "Say something deterministic."}
    ]
    ids = [uuid.uuid4().hex for _ in range(2)]
    with (
        openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=DEMO_KEY, max_retries=0) as sdk,
        openai.OpenAI(base_url=healthy.base_url, api_key="unused", max_retries=0) as direct,
    ):
        via = sdk.chat.completions.create(
            model="sdk", messages=messages, extra_headers={"x-request-id": ids[0]}
        )
        assert (
            via.model_dump()
            == direct.chat.completions.create(model="sdk", messages=messages).model_dump()
        )

        def collect(client: openai.OpenAI, **extra: Any) -> list[dict[str, Any]]:
            stream = client.chat.completions.create(
                model="sdk",
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                **extra,
            )
            return [chunk.model_dump() for chunk in stream]

        chunks = collect(sdk, extra_headers={"x-request-id": ids[1]})
        assert chunks == collect(direct)
        assert chunks[-1]["usage"] is not None
    for request_id in ids:
        line = access_line(gateway, request_id)
        assert line["attempts"] == 3
        assert line["retries"] == ["a:connect", "b:status_503"]
        assert line["target"] == "sdk/c"
    assert len(failing.requests) == 2


# -- Limits ----------------------------------------------------------------------------------------


def test_a_rate_limit_reservation_is_charged_once_however_many_attempts(
    gateway: GatewayProcess, fakes: dict[str, FakeUpstream], client: httpx.Client
) -> None:
    """Each request meets a 503 first, then a target that reports its usage. The key's buckets
    move by one request and by the usage the answer reported, once: the second request's
    headers show the first one's cost (its own reservation aside)."""
    failing, healthy = fakes["metered_a"], fakes["metered_b"]
    failing.behave(Controls(status=503))
    fields: dict[str, Any] = {
        "max_tokens": 1000,
        "messages": [{"role": "user", "content": LONG_TEXT}],
    }

    first = chat(client, gateway, "metered", key=METERED_KEY, **fields)
    assert first.status_code == 200, first.text
    assert first.headers[TARGET_HEADER] == "metered/b"
    reserved = BURST - int(first.headers["x-ratelimit-remaining-tokens"])
    cost = first.json()["usage"]["total_tokens"]
    assert 250 < cost < reserved  # the prompt, mostly: far from the reservation
    assert int(first.headers["x-ratelimit-remaining-requests"]) == REQUEST_BURST - 1

    time.sleep(0.1)  # settlement runs just after the response
    second = chat(client, gateway, "metered", key=METERED_KEY, **fields)
    assert second.status_code == 200, second.text
    assert int(second.headers["x-ratelimit-remaining-requests"]) == REQUEST_BURST - 2
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == BURST - cost - reserved
    assert len(failing.requests) == 2
    assert len(healthy.requests) == 2


# -- What the response and the log say -------------------------------------------------------------


def test_the_response_names_the_target_never_its_url(
    gateway: GatewayProcess,
    fakes: dict[str, FakeUpstream],
    refusing: Refusing,
    client: httpx.Client,
) -> None:
    served = chat(client, gateway, "refusing")
    assert served.headers[TARGET_HEADER] == "refusing/b"
    assert chat(client, gateway, "plain").headers[TARGET_HEADER] == "plain"
    failed = chat(client, gateway, "nowhere")  # every target refuses
    assert failed.status_code == 502
    assert failed.json()["error"]["type"]
    assert failed.headers[TARGET_HEADER] in ("nowhere/a", "nowhere/b")
    for response in (served, failed):
        shown = response.text + "".join(f"{k}: {v}\n" for k, v in response.headers.items())
        assert "127.0.0.1" not in shown
        assert "http://" not in shown

    quiet = gateway_yaml(fakes, refusing, target_header=False, only=("plain", "refusing"))
    with GatewayProcess(quiet) as hidden:
        for model in ("plain", "refusing"):
            response = chat(client, hidden, model)
            assert response.status_code == 200, response.text
            assert TARGET_HEADER not in response.headers


def test_the_access_line_records_each_attempt(
    gateway: GatewayProcess, fakes: dict[str, FakeUpstream], client: httpx.Client
) -> None:
    request_id = uuid.uuid4().hex
    response = chat(client, gateway, "logged", request_id=request_id)
    assert response.status_code == 200, response.text
    line = access_line(gateway, request_id)
    assert {k: line.get(k) for k in ("attempts", "target", "retries")} == {
        "attempts": 2,
        "target": "logged/b",
        "retries": ["a:connect"],
    }
    assert line["upstream"] == "logged"
    assert line["status"] == 200
    # One attempt: no list of retries to read.
    request_id = uuid.uuid4().hex
    chat(client, gateway, "plain", request_id=request_id)
    line = access_line(gateway, request_id)
    assert line["target"] == "plain"
    assert "retries" not in line
