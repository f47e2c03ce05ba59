"""Request rules (a route's ``validate:``) through the real pipeline, in process.

Each rule is crossed by one body and refused with 400 in OpenAI's shape, with the exact JSON
path in ``param`` and OpenAI's ``code``; bodies within every rule pass byte for byte; a refusal
never reaches the upstream and costs the key nothing; a route without rules passes anything.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from gateway.app import Gateway
from gateway.config.loader import parse_config_text
from gateway.config.request_rules import RequestRules, Shape
from gateway.policies.validation import compile_rules, request_validators
from tests.policies.full_rules import AUTH, CONFIG, KEY, LIMITED
from tests.support.standin import StandInUpstream, call, in_process_gateway, json_answer

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"
NO_SYSTEM = "/no-system/chat/completions"
NO_SYSTEM_RESPONSES = "/no-system/responses"


def user(content: object = "hi") -> dict[str, Any]:
    return {"role": "user", "content": content}


def chat(**fields: Any) -> dict[str, Any]:
    """A chat body within every rule of the 'full' set, with ``fields`` replaced."""
    return {"model": "gpt-4o", "messages": [user()], **fields}


def body(**fields: Any) -> dict[str, Any]:
    """A body naming an allowed model, for the shapes other than chat."""
    return {"model": "gpt-4o", **fields}


# (id, path, body, param, code): one row per way to break a rule.
REFUSALS: list[tuple[str, str, object, str | None, str]] = [
    # The body itself.
    ("body-not-an-object", CHAT, [], None, "invalid_type"),
    ("body-a-string", CHAT, "hello", None, "invalid_type"),
    # messages: present, an array, within a count.
    ("msg-missing", CHAT, {"model": "gpt-4o"}, "messages", "missing_required_parameter"),
    ("msg-not-array", CHAT, chat(messages={"role": "user"}), "messages", "invalid_type"),
    ("min_messages", CHAT, chat(messages=[]), "messages", "array_below_min_length"),
    ("max_messages", CHAT, chat(messages=[user()] * 5), "messages", "array_above_max_length"),
    ("msg-not-object", CHAT, chat(messages=[user(), "hi"]), "messages[1]", "invalid_type"),
    # roles: from the allowed set; system/developer only where allowed.
    (
        "role-missing",
        CHAT,
        chat(messages=[user(), {"content": "x"}]),
        "messages[1].role",
        "missing_required_parameter",
    ),
    (
        "role-not-string",
        CHAT,
        chat(messages=[{"role": 1, "content": "x"}]),
        "messages[0].role",
        "invalid_type",
    ),
    (
        "role-unhashable",
        CHAT,
        chat(messages=[{"role": ["user"], "content": "x"}]),
        "messages[0].role",
        "invalid_type",
    ),
    (
        "role-unknown",
        CHAT,
        chat(messages=[user(), user(), user(), {"role": "wizard"}]),
        "messages[3].role",
        "invalid_value",
    ),
    (
        "roles",
        CHAT,
        chat(messages=[{"role": "developer", "content": "x"}]),
        "messages[0].role",
        "invalid_value",
    ),
    (
        "system_messages-system",
        NO_SYSTEM,
        chat(messages=[{"role": "system", "content": "x"}, user()]),
        "messages[0].role",
        "invalid_value",
    ),
    (
        "system_messages-developer",
        NO_SYSTEM,
        chat(messages=[user(), {"role": "developer", "content": "x"}]),
        "messages[1].role",
        "invalid_value",
    ),
    # Content length, per message and in all.
    (
        "max_message_chars",
        CHAT,
        chat(messages=[user(), user("x" * 21)]),
        "messages[1].content",
        "string_above_max_length",
    ),
    (
        "max_message_chars-parts",
        CHAT,
        chat(
            messages=[
                user(
                    [
                        {"type": "text", "text": "x" * 15},
                        {"type": "image_url", "image_url": {"url": "u"}},
                        {"type": "text", "text": "x" * 6},
                    ]
                )
            ]
        ),
        "messages[0].content",
        "string_above_max_length",
    ),
    (
        "max_total_chars",
        CHAT,
        chat(messages=[user("x" * 20)] * 3),
        "messages",
        "string_above_max_length",
    ),
    ("content-not-text", CHAT, chat(messages=[user(7)]), "messages[0].content", "invalid_type"),
    (
        "content-part-not-object",
        CHAT,
        chat(messages=[user(["x"])]),
        "messages[0].content[0]",
        "invalid_type",
    ),
    (
        "content-part-text-not-string",
        CHAT,
        chat(messages=[user([{"type": "text", "text": 5}])]),
        "messages[0].content[0].text",
        "invalid_type",
    ),
    # Output tokens: whichever field the shape has.
    ("max_tokens-above", CHAT, chat(max_tokens=101), "max_tokens", "integer_above_max_value"),
    ("max_tokens-below", CHAT, chat(max_tokens=0), "max_tokens", "integer_below_min_value"),
    ("max_tokens-decimal", CHAT, chat(max_tokens=1.5), "max_tokens", "invalid_type"),
    ("max_tokens-boolean", CHAT, chat(max_tokens=True), "max_tokens", "invalid_type"),
    (
        "max_completion_tokens",
        CHAT,
        chat(max_completion_tokens=500),
        "max_completion_tokens",
        "integer_above_max_value",
    ),
    (
        "completions-max_tokens",
        COMPLETIONS,
        body(prompt="p", max_tokens=101),
        "max_tokens",
        "integer_above_max_value",
    ),
    (
        "max_output_tokens",
        RESPONSES,
        body(input="i", max_output_tokens=101),
        "max_output_tokens",
        "integer_above_max_value",
    ),
    # temperature, top_p.
    ("temperature-above", CHAT, chat(temperature=1.5), "temperature", "decimal_above_max_value"),
    ("temperature-below", CHAT, chat(temperature=-0.1), "temperature", "decimal_below_min_value"),
    ("temperature-string", CHAT, chat(temperature="hot"), "temperature", "invalid_type"),
    ("top_p-below", CHAT, chat(top_p=0.05), "top_p", "decimal_below_min_value"),
    ("responses-top_p", RESPONSES, body(input="i", top_p=2), "top_p", "decimal_above_max_value"),
    # stop: count and length.
    ("max_stop", CHAT, chat(stop=["a", "b", "c"]), "stop", "array_above_max_length"),
    ("max_stop_chars", CHAT, chat(stop=["a", "bbbbbb"]), "stop[1]", "string_above_max_length"),
    ("max_stop_chars-string", CHAT, chat(stop="bbbbbb"), "stop", "string_above_max_length"),
    ("stop-entry-not-string", CHAT, chat(stop=[1]), "stop[0]", "invalid_type"),
    ("stop-not-string", CHAT, chat(stop=1), "stop", "invalid_type"),
    (
        "completions-max_stop",
        COMPLETIONS,
        body(prompt="p", stop=["a", "b", "c"]),
        "stop",
        "array_above_max_length",
    ),
    # n.
    ("max_n", CHAT, chat(n=3), "n", "integer_above_max_value"),
    ("n-string", CHAT, chat(n="2"), "n", "invalid_type"),
    ("completions-max_n", COMPLETIONS, body(prompt="p", n=3), "n", "integer_above_max_value"),
    # The model name pattern: the whole name must match.
    ("model-missing", CHAT, {"messages": [user()]}, "model", "missing_required_parameter"),
    ("model_pattern", CHAT, chat(model="gpt-5"), "model", "invalid_value"),
    ("model_pattern-whole-name", CHAT, chat(model="gpt-4o-mini-2"), "model", "invalid_value"),
    ("model-too-long", CHAT, chat(model="g" * 257), "model", "string_above_max_length"),
    ("model-not-string", CHAT, chat(model=4), "model", "invalid_type"),
    (
        "embeddings-model_pattern",
        EMBEDDINGS,
        body(model="text-embedding-3-small", input="i"),
        "model",
        "invalid_value",
    ),
    # tools, and the deprecated functions.
    ("max_tools", CHAT, chat(tools=[{}, {}]), "tools", "array_above_max_length"),
    ("tools-not-array", CHAT, chat(tools={}), "tools", "invalid_type"),
    ("max_tools-functions", CHAT, chat(functions=[{}, {}]), "functions", "array_above_max_length"),
    (
        "responses-max_tools",
        RESPONSES,
        body(input="i", tools=[{}, {}]),
        "tools",
        "array_above_max_length",
    ),
    # Inputs: embeddings' input, completions' prompt, responses' input and instructions.
    ("max_input_items", EMBEDDINGS, body(input=["a", "b", "c"]), "input", "array_above_max_length"),
    ("max_input_chars", EMBEDDINGS, body(input="x" * 31), "input", "string_above_max_length"),
    (
        "max_input_chars-array",
        EMBEDDINGS,
        body(input=["x" * 16, "x" * 15]),
        "input",
        "string_above_max_length",
    ),
    (
        "max_input_chars-tokens",
        EMBEDDINGS,
        body(input=list(range(31))),
        "input",
        "string_above_max_length",
    ),
    ("input-token-not-integer", EMBEDDINGS, body(input=[1, "x"]), "input[1]", "invalid_type"),
    ("input-entry-boolean", EMBEDDINGS, body(input=["a", True]), "input[1]", "invalid_type"),
    ("input-object", EMBEDDINGS, body(input={"text": "a"}), "input", "invalid_type"),
    (
        "prompt-max_input_items",
        COMPLETIONS,
        body(prompt=["a", "b", "c"]),
        "prompt",
        "array_above_max_length",
    ),
    (
        "prompt-max_input_chars-tokens",
        COMPLETIONS,
        body(prompt=[list(range(20)), list(range(11))]),
        "prompt",
        "string_above_max_length",
    ),
    (
        "responses-max_input_items",
        RESPONSES,
        body(input=[user(), user(), user()]),
        "input",
        "array_above_max_length",
    ),
    (
        "responses-max_input_chars",
        RESPONSES,
        body(input="x" * 20, instructions="y" * 11),
        "input",
        "string_above_max_length",
    ),
    (
        "responses-max_input_chars-parts",
        RESPONSES,
        body(input=[user([{"type": "input_text", "text": "x" * 31}])]),
        "input",
        "string_above_max_length",
    ),
    (
        "responses-max_input_chars-output",
        RESPONSES,
        body(input=[{"type": "function_call_output", "call_id": "c", "output": "x" * 31}]),
        "input",
        "string_above_max_length",
    ),
    (
        "responses-roles",
        RESPONSES,
        body(input=[{"role": "wizard", "content": "x"}]),
        "input[0].role",
        "invalid_value",
    ),
    ("responses-item-not-object", RESPONSES, body(input=["x"]), "input[0]", "invalid_type"),
    ("responses-input-number", RESPONSES, body(input=5), "input", "invalid_type"),
    (
        "instructions-not-string",
        RESPONSES,
        body(input="i", instructions=5),
        "instructions",
        "invalid_type",
    ),
    (
        "system_messages-instructions",
        NO_SYSTEM_RESPONSES,
        body(input="i", instructions="be brief"),
        "instructions",
        "invalid_value",
    ),
    (
        "system_messages-responses",
        NO_SYSTEM_RESPONSES,
        body(input=[{"role": "developer", "content": "x"}]),
        "input[0].role",
        "invalid_value",
    ),
]

# (id, path, body): bodies within every rule; each passes, and goes upstream as the client sent
# it.
PASSES: list[tuple[str, str, dict[str, Any]]] = [
    ("chat-minimal", CHAT, chat()),
    (
        "chat-at-every-limit",
        CHAT,
        chat(
            model="gpt-4o-mini",
            messages=[
                {"role": "system", "content": "be brief"},
                user([{"type": "text", "text": "what is"}, {"type": "image_url", "image_url": {}}]),
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]},
                {"role": "tool", "tool_call_id": "c", "content": "x" * 20},
            ],
            max_tokens=100,
            max_completion_tokens=1,
            temperature=1,
            top_p=0.1,
            stop=["a", "bbbbb"],
            n=2,
            tools=[{"type": "function"}],
        ),
    ),
    ("nulls", CHAT, chat(max_tokens=None, temperature=None, stop=None, tools=None)),
    ("stop-string-and-alias", CHAT, chat(stop="abc", model="fast")),
    (
        "completions-tokens-other-shapes-rules-ignored",
        COMPLETIONS,
        body(prompt=[1, 2, 3], max_completion_tokens=900, tools=[{}, {}]),
    ),
    ("completions-two-prompts", COMPLETIONS, body(prompt=["a", "b"], stop="s")),
    ("embeddings-at-limit", EMBEDDINGS, body(input=["x" * 15, "x" * 15], temperature=9, n=9)),
    ("embeddings-token-arrays", EMBEDDINGS, body(input=[[1, 2], [3]])),
    (
        "responses-string",
        RESPONSES,
        body(input="x" * 20, instructions="y" * 10, max_output_tokens=1),
    ),
    (
        "responses-items",
        RESPONSES,
        body(input=[user(), {"type": "function_call_output", "output": "o"}], stop=["a"] * 9),
    ),
    (
        "no-system-other-roles",
        NO_SYSTEM,
        chat(messages=[user(), {"role": "function", "name": "f", "content": "x"}]),
    ),
    ("no-system-responses", NO_SYSTEM_RESPONSES, body(input=[user()])),
]


@pytest.fixture
def upstream() -> StandInUpstream:
    return StandInUpstream(lambda request: json_answer({"id": "x", "object": "x"}))


@pytest.fixture
async def gateway(upstream: StandInUpstream) -> AsyncIterator[Gateway]:
    async with in_process_gateway(CONFIG, upstream) as app:
        yield app


@pytest.mark.parametrize(
    ("path", "document", "param", "code"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
async def test_each_rule_refuses_with_the_json_path_and_openais_code(
    gateway: Gateway,
    upstream: StandInUpstream,
    path: str,
    document: object,
    param: str | None,
    code: str,
) -> None:
    response = await call(gateway, "POST", path, headers=AUTH, body=orjson.dumps(document))
    assert response.status == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code)
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert upstream.requests == []


@pytest.mark.parametrize(("path", "document"), [p[1:] for p in PASSES], ids=[p[0] for p in PASSES])
async def test_bodies_within_the_rules_pass_byte_for_byte(
    gateway: Gateway, upstream: StandInUpstream, path: str, document: dict[str, Any]
) -> None:
    sent = orjson.dumps(document)
    response = await call(gateway, "POST", path, headers=AUTH, body=sent)
    assert response.status == 200, response.body
    if document.get("model") != "fast":  # a model alias renames, as without rules
        assert bytes(upstream.requests[0].body) == sent


async def test_messages_say_what_was_wrong_and_the_limit_in_openais_words(
    gateway: Gateway,
) -> None:
    cases = [
        (
            chat(messages=[user()] * 5),
            "Invalid 'messages': array too long. Expected an array "
            "with maximum length 4, but got an array with length 5 instead.",
        ),
        (
            chat(temperature=1.5),
            "Invalid 'temperature': decimal above maximum value. Expected "
            "a value <= 1, but got 1.5 instead.",
        ),
        (
            chat(max_tokens=0),
            "Invalid 'max_tokens': integer below minimum value. Expected a "
            "value >= 1, but got 0 instead.",
        ),
        (
            chat(messages=[{"role": "wizard"}]),
            "Invalid value: 'wizard'. Supported values are: "
            "'system', 'assistant', 'user', and 'tool'.",
        ),
        (
            chat(max_tokens="9"),
            "Invalid type for 'max_tokens': expected an integer, but got a string instead.",
        ),
        ({"model": "gpt-4o"}, "Missing required parameter: 'messages'."),
    ]
    for document, message in cases:
        response = await call(gateway, "POST", CHAT, headers=AUTH, body=orjson.dumps(document))
        assert response.json()["error"]["message"] == message


async def test_a_refusal_quotes_at_most_a_short_excerpt_of_the_clients_value(
    gateway: Gateway,
) -> None:
    long = "wizard" * 10_000
    for document in (chat(messages=[{"role": long}]), chat(model=long[:250])):
        response = await call(gateway, "POST", CHAT, headers=AUTH, body=orjson.dumps(document))
        message = response.json()["error"]["message"]
        assert len(message) < 200
        assert f"'{long[:40]}...'" in message


async def test_a_refused_request_costs_the_key_nothing(
    gateway: Gateway, upstream: StandInUpstream
) -> None:
    bad = orjson.dumps(chat(temperature=9))
    for _ in range(3):
        refused = await call(gateway, "POST", CHAT, headers=LIMITED, body=bad)
        assert refused.status == 400
    assert upstream.requests == []
    # The key's one request a minute is still there, and it is only one.
    within = orjson.dumps(chat())
    assert (await call(gateway, "POST", CHAT, headers=LIMITED, body=within)).status == 200
    assert (await call(gateway, "POST", CHAT, headers=LIMITED, body=within)).status == 429
    assert len(upstream.requests) == 1


async def test_a_route_without_rules_passes_anything(
    gateway: Gateway, upstream: StandInUpstream
) -> None:
    bodies = [
        orjson.dumps({"messages": 5, "temperature": "hot", "n": 1e9, "stop": [1] * 99}),
        orjson.dumps([1, 2, 3]),
        b"",
    ]
    for sent in bodies:
        response = await call(gateway, "POST", "/open/chat/completions", headers=AUTH, body=sent)
        assert response.status == 200
        assert bytes(upstream.requests[-1].body) == sent
    binary = [("authorization", f"Bearer {KEY}"), ("content-type", "application/octet-stream")]
    response = await call(gateway, "POST", "/open/chat/completions", headers=binary, body=b"\0")
    assert response.status == 200


async def test_a_body_that_cannot_be_checked_is_refused(
    gateway: Gateway, upstream: StandInUpstream
) -> None:
    form = [("authorization", f"Bearer {KEY}"), ("content-type", "multipart/form-data; b=x")]
    response = await call(gateway, "POST", CHAT, headers=form, body=b"--x--")
    assert response.status == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
    for sent in (b"", b"{not json", b"\xff"):
        response = await call(gateway, "POST", CHAT, headers=AUTH, body=sent)
        assert response.status == 400
        assert response.json()["error"]["code"] == "invalid_json"
    assert upstream.requests == []


async def test_rules_apply_on_a_route_that_does_not_read_the_model(
    gateway: Gateway, upstream: StandInUpstream
) -> None:
    path = "/inline/chat/completions"
    two = orjson.dumps(chat(messages=[user(), user()], model="fast"))
    refused = await call(gateway, "POST", path, headers=AUTH, body=two)
    assert refused.json()["error"]["param"] == "messages"
    one = orjson.dumps(chat(model="fast"))
    assert (await call(gateway, "POST", path, headers=AUTH, body=one)).status == 200
    # model_in_body: false, so the alias is not applied: the body goes as sent.
    assert bytes(upstream.requests[0].body) == one


async def test_the_model_rules_still_apply_after_the_request_rules(
    gateway: Gateway, upstream: StandInUpstream
) -> None:
    response = await call(
        gateway, "POST", CHAT, headers=AUTH, body=orjson.dumps(chat(model="fast"))
    )
    assert response.status == 200
    sent = upstream.requests[0]
    assert sent.url.startswith("http://other.test/v1/")
    assert orjson.loads(sent.body)["model"] == "small-model-v2"


async def test_a_get_on_a_route_with_rules_is_not_checked() -> None:
    config = CONFIG.replace(
        "{name: chat, path: /v1/chat/completions, upstream: main, validate: full}",
        "{name: chat, path: /v1/chat/completions, methods: [GET, POST], upstream: main, "
        "validate: full}",
    )
    upstream = StandInUpstream(lambda request: json_answer({"data": []}))
    async with in_process_gateway(config, upstream) as app:
        response = await call(app, "GET", CHAT, headers=[("authorization", f"Bearer {KEY}")])
    assert response.status == 200


def test_rules_that_do_not_apply_to_a_shape_cost_nothing() -> None:
    rules = RequestRules(max_input_items=1, max_input_chars=1, max_stop=1, max_n=1)
    assert compile_rules(rules, Shape.RESPONSES).checks[1:] == ()  # the input check only
    assert len(compile_rules(RequestRules(max_messages=1), Shape.EMBEDDINGS).checks) == 0
    assert len(compile_rules(RequestRules(temperature={"max": 1}), Shape.EMBEDDINGS).checks) == 0


def test_a_validator_is_built_once_per_route_with_rules_and_its_shape() -> None:
    validators = request_validators(parse_config_text(CONFIG, env={}))
    assert "open" not in validators
    assert validators["no-system-chat"].shape is Shape.CHAT
    assert validators["completions"].shape is Shape.COMPLETIONS
