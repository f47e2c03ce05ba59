"""API keys: hashed storage, the three header styles, route and model rules."""

from __future__ import annotations

import pytest

from gateway.auth import KeyRing, hash_key, new_key, presented_key
from gateway.config.model import ApiKey
from gateway.errors import GatewayError


def ring() -> KeyRing:
    return KeyRing(
        [
            ApiKey(name="all", hash=hash_key("sk-gw-all")),
            ApiKey(
                name="narrow",
                hash=hash_key("sk-gw-narrow"),
                routes=["chat"],
                models=["gpt-4o*", "fast"],
            ),
        ]
    )


@pytest.mark.parametrize(
    "headers",
    [
        [(b"authorization", b"Bearer sk-gw-all")],
        [(b"authorization", b"bearer   sk-gw-all ")],
        [(b"x-api-key", b"sk-gw-all")],
        [(b"api-key", b"sk-gw-all")],
    ],
)
def test_key_is_accepted_in_each_header_style(headers: list[tuple[bytes, bytes]]) -> None:
    assert ring().authenticate(headers).name == "all"


def test_missing_key_is_401_missing_api_key() -> None:
    with pytest.raises(GatewayError) as refused:
        ring().authenticate([(b"authorization", b"Basic abc")])
    assert (refused.value.status, refused.value.code) == (401, "missing_api_key")


def test_unknown_key_is_401_and_not_echoed() -> None:
    with pytest.raises(GatewayError) as refused:
        ring().authenticate([(b"authorization", b"Bearer sk-gw-wrong-secret")])
    assert (refused.value.status, refused.value.code) == (401, "invalid_api_key")
    assert b"sk-gw-wrong-secret" not in refused.value.body()


def test_route_and_model_rules() -> None:
    narrow = ring().authenticate([(b"x-api-key", b"sk-gw-narrow")])
    assert narrow.may_use_route("chat")
    assert not narrow.may_use_route("embeddings")
    assert narrow.may_use_model("gpt-4o-mini")
    assert narrow.may_use_model("fast")
    assert not narrow.may_use_model("faster")
    assert not narrow.may_use_model("o1")


def test_principal_carries_a_key_id_not_the_key() -> None:
    principal = ring().authenticate([(b"x-api-key", b"sk-gw-all")])
    assert principal.key_id == hash_key("sk-gw-all")[7:23]
    assert "sk-gw-all" not in repr(principal)


def test_new_keys_are_unique_and_hash_to_the_configured_format() -> None:
    first, second = new_key(), new_key()
    assert first != second
    assert first.startswith("sk-gw-")
    assert len(hash_key(first)) == len("sha256:") + 64
    assert presented_key([(b"authorization", b"Bearer " + first.encode())]) == first


def test_a_rebuilt_ring_keeps_unchanged_principals_and_rebuilds_changed_ones() -> None:
    """A reload of 10,000 keys must not recompile every key's model rule on the event loop."""
    same = ApiKey(name="same", hash=hash_key("a"), models=("gpt-*",))
    changed = ApiKey(name="changed", hash=hash_key("b"), models=("gpt-*",))
    first = KeyRing([same, changed])
    edited = ApiKey(name="changed", hash=hash_key("b"), models=("o1-*",))
    second = KeyRing([same, edited], previous=first)
    auth_same = [(b"authorization", b"Bearer a")]
    auth_changed = [(b"authorization", b"Bearer b")]
    assert second.authenticate(auth_same) is first.authenticate(auth_same)
    assert second.authenticate(auth_changed).may_use_model("o1-mini")
    assert not second.authenticate(auth_changed).may_use_model("gpt-4o")


def test_keys_with_the_same_model_list_share_one_compiled_rule() -> None:
    ring = KeyRing(
        [
            ApiKey(name=f"k{i}", hash=hash_key(f"key-{i}"), models=("gpt-*", "o1-*"))
            for i in range(3)
        ]
    )
    rules = {ring.authenticate([(b"x-api-key", f"key-{i}".encode())]).models for i in range(3)}
    assert len(rules) == 1
