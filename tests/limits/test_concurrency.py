"""max_concurrent: requests in flight per key and per team, in one gateway process."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from gateway import errors
from gateway.auth import hash_key
from gateway.config.loader import ConfigError, parse_config_text
from gateway.limits.concurrency import ConcurrencyCaps, ConcurrencyLimiter, concurrency_caps
from tests.conftest import UPSTREAM_KEY, gateway_config
from tests.support.fakeupstream import FakeUpstream
from tests.support.gatewayproc import GatewayProcess

GREEDY_KEY = "sk-gw-test-greedy"
TEAMMATE_KEY = "sk-gw-test-teammate"
OTHER_KEY = "sk-gw-test-other"

CAPS = f"""  - name: greedy
    hash: {hash_key(GREEDY_KEY)}
    team: crowd
    limits: {{max_concurrent: 2}}
  - name: teammate
    hash: {hash_key(TEAMMATE_KEY)}
    team: crowd
  - name: other
    hash: {hash_key(OTHER_KEY)}
limits:
  teams:
    crowd: {{max_concurrent: 3}}
"""


def test_a_key_beyond_its_cap_is_refused_until_a_slot_is_released() -> None:
    limiter = ConcurrencyLimiter()
    caps = ConcurrencyCaps(key=2, team=None, team_cap=None)
    first, second = limiter.acquire("k", caps), limiter.acquire("k", caps)
    with pytest.raises(errors.GatewayError) as refused:
        limiter.acquire("k", caps)
    assert (refused.value.status, refused.value.code) == (429, "concurrency_limit_exceeded")
    first.release()
    first.release()  # a second release is a no-op, never a slot for free
    limiter.acquire("k", caps)
    assert limiter.in_flight("k") == 2
    second.release()


def test_a_team_cap_is_shared_by_its_keys_and_a_refusal_takes_nothing() -> None:
    limiter = ConcurrencyLimiter()
    a = ConcurrencyCaps(key=None, team="t", team_cap=2)
    b = ConcurrencyCaps(key=5, team="t", team_cap=2)
    limiter.acquire("a", a)
    limiter.acquire("b", b)
    with pytest.raises(errors.GatewayError, match="team 't'"):
        limiter.acquire("b", b)
    assert limiter.in_flight("b") == 1


def test_caps_come_from_the_key_the_default_and_the_team() -> None:
    config = parse_config_text(
        f"""
keys:
  - {{name: own, hash: {hash_key("a")}, limits: {{max_concurrent: 1}}}}
  - {{name: defaulted, hash: {hash_key("b")}}}
  - {{name: teamed, hash: {hash_key("c")}, team: t, limits: {{requests_per_minute: 5}}}}
limits:
  default: {{max_concurrent: 7}}
  teams: {{t: {{max_concurrent: 3}}}}
"""
    )
    caps = concurrency_caps(config)
    assert caps["own"] == ConcurrencyCaps(1, None, None)
    assert caps["defaulted"] == ConcurrencyCaps(7, None, None)
    assert caps["teamed"] == ConcurrencyCaps(None, "t", 3)


def test_max_concurrent_is_refused_on_routes_and_models() -> None:
    with pytest.raises(ConfigError, match=r"limits\.routes\.chat\.max_concurrent"):
        parse_config_text(
            """
upstreams: {u: {base_url: "http://127.0.0.1:1/v1"}}
routes: [{name: chat, path: /v1/chat/completions, upstream: u}]
limits: {routes: {chat: {max_concurrent: 1}}}
"""
        )


@pytest.fixture(scope="module")
def capped(upstream: FakeUpstream) -> Iterator[GatewayProcess]:
    # CAPS continues the keys list the config ends with, then adds the limits section.
    config = gateway_config(upstream.base_url, extra=CAPS)
    with GatewayProcess(config, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as process:
        yield process


SLOW_STREAM = {"x-fake-chunks": "6", "x-fake-interval-ms": "250"}
BODY = {"model": "gpt-fake", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


async def hold_stream(client: httpx.AsyncClient, key: str, opened: asyncio.Event) -> int:
    async with client.stream(
        "POST",
        "/v1/chat/completions",
        json=BODY,
        headers={"authorization": f"Bearer {key}", **SLOW_STREAM},
    ) as response:
        opened.set()
        async for _ in response.aiter_raw():
            pass
        return response.status_code


async def test_open_streams_hold_their_key_slot_and_other_keys_are_unaffected(
    capped: GatewayProcess,
) -> None:
    async with httpx.AsyncClient(base_url=capped.url, timeout=10) as client:
        opened = [asyncio.Event(), asyncio.Event()]
        streams = [asyncio.ensure_future(hold_stream(client, GREEDY_KEY, e)) for e in opened]
        await asyncio.gather(*(e.wait() for e in opened))

        refused = await client.post(
            "/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {GREEDY_KEY}"}
        )
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["code"] == "concurrency_limit_exceeded"
        assert refused.headers["retry-after"] == "1"

        # Another key, and a teammate within the team's cap of 3, are served meanwhile.
        for key in (OTHER_KEY, TEAMMATE_KEY):
            served = await client.post(
                "/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {key}"}
            )
            assert served.status_code == 200, served.text

        assert await asyncio.gather(*streams) == [200, 200]
        again = await client.post(
            "/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {GREEDY_KEY}"}
        )
        assert again.status_code == 200


async def test_a_team_cap_refuses_a_teammate_once_the_team_is_full(
    capped: GatewayProcess,
) -> None:
    async with httpx.AsyncClient(base_url=capped.url, timeout=10) as client:
        opened = [asyncio.Event() for _ in range(3)]
        keys = [GREEDY_KEY, GREEDY_KEY, TEAMMATE_KEY]
        streams = [
            asyncio.ensure_future(hold_stream(client, key, e))
            for key, e in zip(keys, opened, strict=True)
        ]
        await asyncio.gather(*(e.wait() for e in opened))
        refused = await client.post(
            "/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {TEAMMATE_KEY}"}
        )
        assert refused.status_code == 429
        assert "team 'crowd'" in refused.json()["error"]["message"]
        assert await asyncio.gather(*streams) == [200, 200, 200]


async def test_a_client_that_leaves_mid_stream_frees_its_slot(capped: GatewayProcess) -> None:
    async with httpx.AsyncClient(base_url=capped.url, timeout=10) as client:
        for _ in range(4):  # more than the cap, one after another
            async with client.stream(
                "POST",
                "/v1/chat/completions",
                json=BODY,
                headers={"authorization": f"Bearer {GREEDY_KEY}", **SLOW_STREAM},
            ) as response:
                assert response.status_code == 200
                async for _ in response.aiter_raw():
                    break  # leave after the first chunk
            await asyncio.sleep(0.2)  # the gateway notices the close and frees the slot
        served = await client.post(
            "/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {GREEDY_KEY}"}
        )
        assert served.status_code == 200
