"""The model list a caller gets: the upstream's entries it may call, and the aliases it may call."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from gateway.auth import KeyRing, Principal, hash_key
from gateway.config.model import ApiKey, ModelAlias, Route
from gateway.openai.models_list import list_for_caller, model_as_alias, rewrites_list

UPSTREAM_LIST: dict[str, Any] = {
    "object": "list",
    "data": [
        {"id": "gpt-4o-mini", "object": "model", "created": 1, "owned_by": "openai", "x": 1},
        {"id": "gpt-4o", "object": "model", "created": 2, "owned_by": "openai"},
        {"id": "whisper-1", "object": "model", "created": 3, "owned_by": "openai-internal"},
    ],
}
ALIASES = {
    "fast": ModelAlias(upstream="openai", model="gpt-4o-mini"),
    "gpt-4o": ModelAlias(upstream="openai"),
    "local": ModelAlias(upstream="vllm", model="llama"),
}


def principal(*models: str) -> Principal:
    key = ApiKey(name="k", hash=hash_key("sk-gw-k"), models=models)
    return KeyRing([key]).authenticate([(b"authorization", b"Bearer sk-gw-k")])


def listed(
    key: Principal,
    *,
    unlisted: bool = True,
    aliases: dict[str, ModelAlias] = ALIASES,
    document: Any = UPSTREAM_LIST,
) -> list[dict[str, Any]]:
    body = list_for_caller(
        orjson.dumps(document),
        principal=key,
        aliases=aliases,
        unlisted=unlisted,
        upstream="openai",
    )
    assert body is not None
    rewritten = orjson.loads(body)
    assert rewritten["object"] == "list"
    data: list[dict[str, Any]] = rewritten["data"]
    return data


def ids(entries: list[dict[str, Any]]) -> list[str]:
    return [entry["id"] for entry in entries]


def test_a_wide_key_sees_the_upstreams_models_and_every_alias() -> None:
    entries = listed(principal("*"))
    assert ids(entries) == ["gpt-4o-mini", "gpt-4o", "whisper-1", "fast", "local"]
    assert entries[0] == UPSTREAM_LIST["data"][0]  # kept unchanged, extra fields too


def test_an_alias_entry_carries_its_targets_created_and_owner() -> None:
    entries = {entry["id"]: entry for entry in listed(principal("*"))}
    assert entries["fast"] == {"id": "fast", "object": "model", "created": 1, "owned_by": "openai"}


def test_an_alias_whose_target_is_not_listed_here_is_owned_by_the_gateway() -> None:
    entries = {entry["id"]: entry for entry in listed(principal("*"))}
    assert entries["local"] == {
        "id": "local",
        "object": "model",
        "created": 0,
        "owned_by": "gateway",
    }


def test_a_key_sees_only_the_models_it_may_call() -> None:
    assert ids(listed(principal("fast", "whisper-*"))) == ["whisper-1", "fast"]
    assert ids(listed(principal("nothing-*"))) == []


def test_unlisted_models_are_dropped_when_they_are_not_routable() -> None:
    assert ids(listed(principal("*"), unlisted=False)) == ["gpt-4o", "fast", "local"]


def test_an_upstream_entry_named_like_an_alias_that_goes_elsewhere_is_replaced() -> None:
    aliases = {"gpt-4o": ModelAlias(upstream="openai", model="gpt-4o-mini")}
    entries = listed(principal("*"), aliases=aliases)
    assert ids(entries) == ["gpt-4o-mini", "whisper-1", "gpt-4o"]
    assert entries[-1]["created"] == 1  # gpt-4o-mini's, the model it now names


def test_other_top_level_members_are_kept() -> None:
    document = {**UPSTREAM_LIST, "has_more": False}
    body = list_for_caller(
        orjson.dumps(document), principal=principal("*"), aliases={}, unlisted=True, upstream="o"
    )
    assert body is not None
    assert orjson.loads(body)["has_more"] is False


def test_entries_that_cannot_be_checked_are_left_out() -> None:
    document = {"object": "list", "data": [{"id": 3}, "gpt-4o", {"object": "model"}]}
    assert listed(principal("*"), document=document, aliases={}) == []


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"data": {}}', b'{"object": "list"}'])
def test_a_body_that_is_not_a_list_cannot_be_rewritten(body: bytes) -> None:
    assert (
        list_for_caller(body, principal=principal("*"), aliases={}, unlisted=True, upstream="o")
        is None
    )


def test_the_list_is_relayed_raw_only_when_nothing_would_change() -> None:
    assert not rewrites_list(principal("*"), {}, True)
    assert rewrites_list(principal("*"), ALIASES, True)
    assert rewrites_list(principal("*"), {}, False)
    assert rewrites_list(principal("gpt-*"), {}, True)


def test_a_model_retrieved_through_an_alias_answers_as_the_alias() -> None:
    body = model_as_alias(orjson.dumps(UPSTREAM_LIST["data"][0]), alias="fast")
    assert body is not None
    assert orjson.loads(body) == {**UPSTREAM_LIST["data"][0], "id": "fast"}
    assert model_as_alias(b"[1]", alias="fast") is None
    assert model_as_alias(b"{", alias="fast") is None


# The route options that turn these rewrites on.


def test_model_in_path_names_a_parameter_of_a_route_without_a_body() -> None:
    route = Route(
        name="model",
        path="/v1/models/{model}",
        methods=("GET", "DELETE"),
        upstream="o",
        model_in_path="model",
    )
    assert route.model_in_path == "model"
    with pytest.raises(ValidationError, match="does not define"):
        Route(name="m", path="/v1/models/{id}", methods=("GET",), upstream="o", model_in_path="m")
    with pytest.raises(ValidationError, match="upstream path"):
        Route(
            name="m",
            path="/v1/models/{model}",
            methods=("GET",),
            upstream="o",
            upstream_path="/models",
            model_in_path="model",
        )
    with pytest.raises(ValidationError, match="not \\['POST'\\]"):
        Route(name="m", path="/v1/models/{model}", upstream="o", model_in_path="model")


def test_models_list_is_a_get_route() -> None:
    assert Route(name="models", path="/v1/models", methods=("GET",), upstream="o", models_list=True)
    with pytest.raises(ValidationError, match="add GET"):
        Route(name="models", path="/v1/models", upstream="o", models_list=True)
