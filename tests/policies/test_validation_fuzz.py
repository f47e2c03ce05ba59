"""Random bodies on routes with every request rule: never a 5xx, always OpenAI's error shape.

Hypothesis draws JSON values of every kind, valid OpenAI bodies with one value anywhere in them
replaced by a random one (so that every check is reached: a message's role, a content part's
text, a token id, a stop entry), and random bytes under several media types. The gateway runs
in process against a stand-in upstream that answers 200, in an event loop the test owns: the
examples of one test share it (Hypothesis runs them one after another, synchronously).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import Gateway
from tests.policies.full_rules import CONFIG, KEY
from tests.support.standin import Recorded, StandInUpstream, call, in_process_gateway, json_answer

PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/no-system/chat/completions",
    "/no-system/responses",
    "/inline/chat/completions",
)
# 200 examples per test, each well under a millisecond: a few seconds. No example database:
# nothing is written into the work tree. The function-scoped fixture is the running gateway,
# shared by the examples on purpose (it keeps nothing that one example could spoil for the
# next: the key has no limits).
FUZZ = settings(
    max_examples=200,
    deadline=timedelta(seconds=1),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=60)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=30,
)
# Bodies within every rule of the 'full' set, one per shape, reaching every kind of value the
# checks read: content parts, tool calls, function call outputs, token arrays.
VALID: tuple[tuple[str, dict[str, Any]], ...] = (
    (
        "/v1/chat/completions",
        {
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "x"}]},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]},
                {"role": "tool", "tool_call_id": "c", "content": "ok"},
            ],
            "max_tokens": 10,
            "max_completion_tokens": 10,
            "temperature": 0.5,
            "top_p": 0.5,
            "stop": ["a", "b"],
            "n": 1,
            "tools": [{"type": "function"}],
        },
    ),
    ("/v1/completions", {"model": "fast", "prompt": [[1, 2], [3]], "stop": "s", "n": 2}),
    ("/v1/embeddings", {"model": "gpt-4o", "input": ["a", "b"]}),
    ("/v1/embeddings", {"model": "gpt-4o", "input": [5, 6, 7]}),
    (
        "/v1/responses",
        {
            "model": "gpt-4o-mini",
            "instructions": "be brief",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                {"type": "function_call_output", "call_id": "c", "output": "ok"},
            ],
            "max_output_tokens": 5,
            "tools": [{"type": "function"}],
        },
    ),
)


def _places(value: object, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Every value's path in ``value``, containers included."""
    places = [path]
    if isinstance(value, dict):
        for key, inner in value.items():
            places += _places(inner, (*path, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            places += _places(inner, (*path, index))
    return places


def _replaced(document: Any, path: tuple[str | int, ...], new: object) -> Any:
    if not path:
        return new
    copy = dict(document) if isinstance(document, dict) else list(document)
    copy[path[0]] = _replaced(document[path[0]], path[1:], new)  # type: ignore[index]
    return copy


def _one_value_changed(path: str, document: dict[str, Any]) -> Any:
    """``document`` with one value, anywhere in it, replaced by a random one: every check is
    reached (a wholly random body rarely gets past the first), each with a bad value."""
    return st.tuples(st.sampled_from(_places(document)[1:]), json_values).map(
        lambda drawn: (path, _replaced(document, *drawn))
    )


requests = st.one_of(
    *(_one_value_changed(path, document) for path, document in VALID),
    st.tuples(st.sampled_from(PATHS), json_values),
)
media_types = st.sampled_from(
    ["application/json", "", "text/plain", "application/octet-stream", "multipart/form-data"]
)


class _Running:
    """The in-process gateway, started and stopped in an event loop the test owns."""

    def __init__(self) -> None:
        self.runner = asyncio.Runner()
        self.upstream = StandInUpstream(lambda request: json_answer({"id": "x"}))
        self._context = in_process_gateway(CONFIG, self.upstream)
        self.app: Gateway = self.runner.run(self._context.__aenter__())

    def post(self, path: str, body: bytes, media: str = "application/json") -> Recorded:
        headers = [("authorization", f"Bearer {KEY}")]
        if media:
            headers.append(("content-type", media))
        return self.runner.run(call(self.app, "POST", path, headers=headers, body=body))

    def close(self) -> None:
        try:
            self.runner.run(self._context.__aexit__(None, None, None))
        finally:
            self.runner.close()


@pytest.fixture
def running() -> Iterator[_Running]:
    gateway = _Running()
    try:
        yield gateway
    finally:
        gateway.close()


def assert_no_server_error(response: Recorded) -> None:
    assert response.status < 500, response.body
    if response.status == 200:
        return
    assert response.status in (400, 415), response.body
    document: Any = response.json()
    error = document["error"]
    assert set(document) == {"error"}
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert isinstance(error["message"], str)
    assert len(error["message"]) < 400
    assert error["param"] is None or isinstance(error["param"], str)
    assert isinstance(error["code"], str)


@FUZZ
@given(drawn=requests)
def test_random_json_never_yields_a_server_error(
    running: _Running, drawn: tuple[str, object]
) -> None:
    path, document = drawn
    assert_no_server_error(running.post(path, orjson.dumps(document)))


@FUZZ
@given(path=st.sampled_from(PATHS), body=st.binary(max_size=200), media=media_types)
def test_random_bytes_never_yield_a_server_error(
    running: _Running, path: str, body: bytes, media: str
) -> None:
    assert_no_server_error(running.post(path, body, media))
