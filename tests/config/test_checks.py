"""check_config: the cross-reference rules, on configs built in memory (no files, no lines)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config.checks import check_config, format_path, parse_path
from gateway.config.model import GatewayConfig

HASH_A = "sha256:" + "a" * 64
HASH_B = "sha256:" + "b" * 64


def config(**sections: Any) -> GatewayConfig:
    """A valid base (one upstream, one chat route, one key) with ``sections`` replacing parts."""
    data: dict[str, Any] = {
        "upstreams": {"openai": {"base_url": "https://api.openai.com/v1"}},
        "routes": [{"name": "chat", "path": "/v1/chat/completions", "upstream": "openai"}],
        "keys": [{"name": "alice", "hash": HASH_A}],
    }
    data.update(sections)
    return GatewayConfig.model_validate(data)


def route(name: str, path: str, **more: Any) -> dict[str, Any]:
    return {"name": name, "path": path, "upstream": "openai", **more}


def test_a_consistent_config_has_no_problems() -> None:
    assert check_config(config()) == []


def test_duplicate_route_name_names_the_first_route() -> None:
    routes = [route("chat", "/v1/chat/completions"), route("chat", "/v1/completions")]
    assert check_config(config(routes=routes)) == [
        ("routes[1].name", "route name 'chat' is already used by routes[0]")
    ]


def test_route_upstream_must_exist_and_known_ones_are_listed() -> None:
    routes = [{"name": "chat", "path": "/v1/chat/completions", "upstream": "opnai"}]
    assert check_config(config(routes=routes)) == [
        ("routes[0].upstream", "unknown upstream 'opnai'; defined: openai")
    ]


def test_route_upstream_with_no_upstreams_at_all() -> None:
    assert check_config(config(upstreams={})) == [
        ("routes[0].upstream", "unknown upstream 'openai': none is defined")
    ]


def test_model_alias_upstream_must_exist() -> None:
    models = {"gpt-4.1": {"upstream": "azure"}}
    assert check_config(config(models=models)) == [
        ('models["gpt-4.1"].upstream', "unknown upstream 'azure'; defined: openai")
    ]


def test_key_routes_are_star_or_route_names() -> None:
    keys = [{"name": "alice", "hash": HASH_A, "routes": ["*", "chat", "embeddings"]}]
    assert check_config(config(keys=keys)) == [
        ("keys[0].routes[2]", "unknown route 'embeddings'; defined: chat")
    ]


def test_key_models_must_be_listed_or_patterns_unless_unlisted_models_are_allowed() -> None:
    keys = [{"name": "alice", "hash": HASH_A, "models": ["gpt-4o", "gpt-4*", "o[13]", "llama"]}]
    models = {"gpt-4o": {"upstream": "openai"}}
    assert check_config(config(keys=keys, models=models)) == [
        (
            "keys[0].models[3]",
            "unknown model 'llama': not in 'models' and not a pattern, and "
            "allow_unlisted_models is false",
        )
    ]
    assert check_config(config(keys=keys, models=models, allow_unlisted_models=True)) == []


def test_duplicate_key_names_and_hashes() -> None:
    keys = [
        {"name": "alice", "hash": HASH_A},
        {"name": "bob", "hash": HASH_B},
        {"name": "alice", "hash": HASH_B},
    ]
    assert check_config(config(keys=keys)) == [
        ("keys[2].name", "key name 'alice' is already used by keys[0]"),
        ("keys[2].hash", "the same hash is already used by key 'bob'"),
    ]


def test_limits_teams_must_be_the_team_of_some_key() -> None:
    keys = [{"name": "alice", "hash": HASH_A, "team": "research"}]
    limits = {"teams": {"research": {"requests_per_minute": 10}, "sales": {}}}
    assert check_config(config(keys=keys, limits=limits)) == [
        ("limits.teams.sales", "unknown team 'sales': no key has it")
    ]


def test_budgets_belong_to_keys_and_teams_not_routes_or_models() -> None:
    keys = [
        {"name": "alice", "hash": HASH_A, "team": "ml", "limits": {"budget": {"usd_per_day": 5}}}
    ]
    budget = {"budget": {"usd_per_month": 100}}
    limits = {
        "default": budget,
        "teams": {"ml": budget},
        "routes": {"chat": budget},
        "models": {"gpt-4o": budget},
    }
    message = "budget applies to keys (keys[].limits, limits.default) and teams (limits.teams) only"
    assert check_config(config(keys=keys, limits=limits, allow_unlisted_models=True)) == [
        ("limits.routes.chat.budget", message),
        ("limits.models.gpt-4o.budget", message),
    ]


def test_limits_routes_must_be_route_names() -> None:
    limits: dict[str, Any] = {"routes": {"chat": {}, "images": {}}}
    assert check_config(config(limits=limits)) == [
        ("limits.routes.images", "unknown route 'images'; defined: chat")
    ]


def test_limits_models_must_be_listed_models_or_patterns() -> None:
    limits: dict[str, Any] = {"models": {"gpt-4o": {}, "o*": {}, "gpt-3.5-turbo": {}}}
    models = {"gpt-4o": {"upstream": "openai"}}
    assert check_config(config(limits=limits, models=models)) == [
        (
            'limits.models["gpt-3.5-turbo"]',
            "unknown model 'gpt-3.5-turbo': not in 'models' and not a pattern, and "
            "allow_unlisted_models is false",
        )
    ]
    assert check_config(config(limits=limits, models=models, allow_unlisted_models=True)) == []


def test_same_path_and_method_on_two_routes_is_an_overlap() -> None:
    routes = [route("chat", "/v1/chat/completions"), route("chat2", "/v1/chat/completions")]
    assert check_config(config(routes=routes)) == [
        ("routes[1].path", "'/v1/chat/completions' is already served by route 'chat'")
    ]


def test_same_path_with_other_methods_is_not_an_overlap() -> None:
    routes = [
        route("list", "/v1/files", methods=["GET"]),
        route("upload", "/v1/files", methods=["POST"]),
    ]
    assert check_config(config(routes=routes)) == []


def test_partly_shared_methods_are_named() -> None:
    routes = [
        route("read", "/v1/files/{id}", methods=["GET", "HEAD"]),
        route("write", "/v1/files/{id}", methods=["GET", "DELETE"]),
    ]
    assert check_config(config(routes=routes)) == [
        ("routes[1].path", "'/v1/files/{id}' is already served by route 'read' for GET")
    ]


def test_parameter_names_do_not_make_patterns_different() -> None:
    routes = [
        route("files", "/v1/files/{id}", methods=["GET"]),
        route("files2", "/v1/files/{file_id}", methods=["GET"]),
    ]
    assert check_config(config(routes=routes)) == [
        (
            "routes[1].path",
            "'/v1/files/{file_id}' is already served by route 'files' as '/v1/files/{id}'",
        )
    ]


def test_an_alias_overlapping_a_route_path() -> None:
    routes = [
        route("chat", "/v1/chat/completions"),
        route("legacy", "/v1/completions", aliases=[{"path": "/v1/chat/completions"}]),
    ]
    assert check_config(config(routes=routes)) == [
        (
            "routes[1].aliases[0].path",
            "'/v1/chat/completions' is already served by route 'chat'",
        )
    ]


def test_a_route_path_overlapping_an_earlier_alias_says_it_is_an_alias() -> None:
    routes = [
        route("chat", "/v1/chat/completions", aliases=[{"path": "/chat/completions"}]),
        route("other", "/chat/completions"),
    ]
    assert check_config(config(routes=routes)) == [
        ("routes[1].path", "'/chat/completions' is already served by route 'chat' as an alias")
    ]


def test_an_alias_with_other_parameter_names_names_the_alias() -> None:
    routes = [
        route("a", "/v1/files/{id}", aliases=[{"path": "/files/{id}"}]),
        route("b", "/files/{file_id}"),
    ]
    assert check_config(config(routes=routes)) == [
        (
            "routes[1].path",
            "'/files/{file_id}' is already served by route 'a' as alias '/files/{id}'",
        )
    ]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("/v1/files/{id}", "/v1/files/content"),  # a literal beats a pattern
        ("/v1/{rest:path}", "/v1/{model}"),  # a catch-all and one segment differ
        ("/v1/chat/completions", "/v1/chat/completions/"),  # no slash redirects: distinct paths
    ],
)
def test_different_patterns_may_share_requests(first: str, second: str) -> None:
    routes = [route("a", first), route("b", second)]
    assert check_config(config(routes=routes)) == []


@pytest.mark.parametrize(
    "path", ["/healthz", "/readyz", "/openapi.json", "/admin", "/admin/keys", "/admin/{rest:path}"]
)
def test_paths_of_the_gateway_itself_cannot_be_routed(path: str) -> None:
    routes = [route("mine", path, methods=["GET"])]
    assert check_config(config(routes=routes)) == [
        ("routes[0].path", f"{path!r} is reserved for the gateway itself")
    ]


def test_reserved_paths_cannot_be_aliases_and_near_misses_are_fine() -> None:
    aliases = [{"path": "/administrator"}, {"path": "/healthz"}]
    routes = [
        route("mine", "/v1/x", methods=["GET"], aliases=aliases),
        route("any", "/{name}", methods=["GET"]),  # could match /healthz: the literal wins
    ]
    assert check_config(config(routes=routes)) == [
        ("routes[0].aliases[1].path", "'/healthz' is reserved for the gateway itself")
    ]


@pytest.mark.parametrize(
    "successor",
    [
        "/v1/chat/completions",  # a route's path
        "/v2/chat",  # another alias
        "/v1/files/{file_id}",  # the same pattern under other names
        "/v1/files/file-abc",  # a concrete path the pattern serves
    ],
)
def test_alias_successor_served_by_the_route_table(successor: str) -> None:
    routes = [
        route("chat", "/v1/chat/completions", aliases=[{"path": "/v2/chat"}]),
        route(
            "files",
            "/v1/files/{id}",
            aliases=[{"path": "/files/{id}", "deprecated": True, "successor": successor}],
        ),
    ]
    assert check_config(config(routes=routes)) == []


def test_alias_successor_nobody_serves_is_an_error() -> None:
    alias = {"path": "/chat/completions", "deprecated": True, "successor": "/v1/chat/complete"}
    routes = [route("chat", "/v1/chat/completions", aliases=[alias])]
    assert check_config(config(routes=routes)) == [
        (
            "routes[0].aliases[0].successor",
            "'/v1/chat/complete' is not served by any route or alias",
        )
    ]


def test_locate_adds_where_the_other_entry_is() -> None:
    routes = [route("chat", "/v1/chat/completions"), route("chat", "/v1/chat/completions")]
    places = {"routes[0]": "a.yaml:3", "routes[0].path": "a.yaml:4"}
    assert check_config(config(routes=routes), places.get) == [
        ("routes[1].name", "route name 'chat' is already used by routes[0] (a.yaml:3)"),
        (
            "routes[1].path",
            "'/v1/chat/completions' is already served by route 'chat' (a.yaml:4)",
        ),
    ]


def test_every_problem_is_reported_at_once() -> None:
    routes = [
        route("chat", "/v1/chat/completions"),
        {"name": "chat", "path": "/healthz", "upstream": "nope"},
    ]
    problems = check_config(config(routes=routes, limits={"routes": {"x": {}}}))
    assert [path for path, _ in problems] == [
        "routes[1].name",
        "routes[1].upstream",
        "limits.routes.x",
        "routes[1].path",
    ]


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ((), ""),
        (("routes", 3, "aliases", 0, "path"), "routes[3].aliases[0].path"),
        (("models", "gpt-4.1", "upstream"), 'models["gpt-4.1"].upstream'),
        (("upstreams", "bad name"), 'upstreams["bad name"]'),
        (("limits", "models", 'a"b'), 'limits.models["a\\"b"]'),
        (("models", "42"), "models.42"),
    ],
)
def test_key_paths_print_and_parse_back(path: tuple[str | int, ...], text: str) -> None:
    assert format_path(path) == text
    assert parse_path(text) == path
