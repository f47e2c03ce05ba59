"""Request rules in the config: ``validate:`` on a route and the ``request_rules`` table, parsed
once into frozen objects, every mistake reported at load with file, line and key path."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pydantic
import pytest

from gateway.config.loader import ConfigError, load_config
from gateway.config.request_rules import RequestRules, Shape, shape_of

UPSTREAM = 'upstreams: {u: {base_url: "http://u/v1"}}\n'


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def config_file(directory: Path, text: str) -> Path:
    """gateway.yaml: one upstream on line 1, then ``text``."""
    return write(directory, "gateway.yaml", UPSTREAM + textwrap.dedent(text))


def errors(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    return [str(issue) for issue in info.value.errors]


def test_rules_load_once_into_frozen_objects_inline_or_by_name(tmp_path: Path) -> None:
    path = config_file(
        tmp_path,
        """\
        request_rules:
          strict:
            roles: [user, assistant]
            system_messages: false
            temperature: {max: 1}
            model_pattern: "gpt-4o.*"
        routes:
          - {name: chat, path: /v1/chat/completions, upstream: u, validate: strict}
          - {name: embed, path: /v1/embeddings, upstream: u, validate: {max_input_items: 8}}
          - {name: open, path: /v1/completions, upstream: u}
        """,
    )
    config = load_config(path, {})
    strict = config.request_rules["strict"]
    assert config.routes[0].rules == "strict"
    assert strict.roles == frozenset({"user", "assistant"})
    assert strict.temperature is not None
    assert strict.temperature.max == 1
    assert strict.model_pattern == re.compile("gpt-4o.*")  # compiled at load
    assert config.routes[1].rules == RequestRules(max_input_items=8)
    assert config.routes[2].rules is None
    with pytest.raises(pydantic.ValidationError):
        strict.max_n = 3  # type: ignore[misc]


def test_a_bad_regular_expression_is_reported_with_its_place(tmp_path: Path) -> None:
    path = config_file(
        tmp_path,
        """\
        request_rules:
          named:
            model_pattern: "gpt-(4o"
        routes:
          - name: chat
            path: /v1/chat/completions
            upstream: u
            validate:
              model_pattern: "[a-"
        """,
    )
    assert errors(path) == [
        f"{path}:4: request_rules.named.model_pattern: not a valid regular expression: missing ), "
        "unterminated subpattern at position 4",
        f"{path}:10: routes[0].validate.model_pattern: not a valid regular expression: "
        "unterminated character set at position 0",
    ]


def test_an_unknown_rule_set_is_reported_at_the_route(tmp_path: Path) -> None:
    path = config_file(
        tmp_path,
        """\
        request_rules:
          strict: {max_n: 1}
          broken: {max_n: 0}
        routes:
          - {name: chat, path: /v1/chat/completions, upstream: u, validate: strcit}
          - {name: text, path: /v1/completions, upstream: u, validate: broken}
        """,
    )
    # The reference to the broken set is left to the set's own error.
    assert errors(path) == [
        f"{path}:4: request_rules.broken.max_n: Input should be greater than or equal to 1",
        f"{path}:6: routes[0].validate: unknown rule set 'strcit'; defined: strict",
    ]


def test_rules_need_a_route_with_an_openai_shaped_body(tmp_path: Path) -> None:
    path = config_file(
        tmp_path,
        """\
        routes:
          - {name: any, path: "/v1/{rest:path}", upstream: u, validate: {max_n: 1}}
          - name: list
            path: /v1/chat/completions
            methods: [GET]
            upstream: u
            validate: {max_n: 1}
        """,
    )
    assert errors(path) == [
        f"{path}:3: routes[0].validate: request rules apply to OpenAI's chat/completions, "
        "completions, embeddings and responses bodies; neither the upstream path '/{rest:path}' "
        "nor the path '/v1/{rest:path}' ends in one of them",
        f"{path}:8: routes[1].validate: request rules check bodies: the route serves no POST, "
        "PUT or PATCH",
    ]


def test_rule_values_are_checked_where_they_are_written(tmp_path: Path) -> None:
    path = config_file(
        tmp_path,
        """\
        request_rules:
          a: {min_messages: 5, max_messages: 2}
          b: {temperature: {min: 1, max: 0.5}, top_p: {}}
          c: {roles: [system], system_messages: false}
          d: {roles: [user, wizard], max_tools: -1, max_messages_count: 3}
        routes:
          - {name: chat, path: /v1/chat/completions, upstream: u, validate: 7}
        """,
    )
    assert errors(path) == [
        f"{path}:3: request_rules.a: 'min_messages' (5) is above 'max_messages' (2)",
        f"{path}:4: request_rules.b.temperature: 'min' (1) is above 'max' (0.5)",
        f"{path}:4: request_rules.b.top_p: give 'min', 'max' or both",
        f"{path}:5: request_rules.c: 'roles' allows only system messages, which "
        "'system_messages' refuses",
        f"{path}:6: request_rules.d.roles[1]: Input should be 'system', 'developer', 'user', "
        "'assistant', 'tool' or 'function'",
        f"{path}:6: request_rules.d.max_tools: Input should be greater than or equal to 0",
        f"{path}:6: request_rules.d.max_messages_count: Extra inputs are not permitted",
        f"{path}:8: routes[0].validate: expected a mapping of rules, or the name of a set in "
        "'request_rules'",
    ]


def test_rule_sets_merge_by_name_across_included_files(tmp_path: Path) -> None:
    main = config_file(
        tmp_path,
        """\
        include: [teams.yaml]
        request_rules:
          strict: {max_n: 1}
        routes:
          - {name: chat, path: /v1/chat/completions, upstream: u, validate: team}
        """,
    )
    write(tmp_path, "teams.yaml", "request_rules:\n  team: {max_messages: 10}\n")
    config = load_config(main, {})
    assert set(config.request_rules) == {"strict", "team"}
    more = write(tmp_path, "teams.yaml", "request_rules:\n  strict: {max_n: 2}\n")
    assert errors(main) == [
        f"{main}:6: routes[0].validate: unknown rule set 'team'; defined: strict",
        f"{more}:2: request_rules.strict: rule set 'strict' is already defined at {main}:4",
    ]


@pytest.mark.parametrize(
    ("paths", "shape"),
    [
        (("/chat/completions", "/v1/chat/completions"), Shape.CHAT),
        (("/openai/deployments/{deployment}/chat/completions/",), Shape.CHAT),
        (("/completions",), Shape.COMPLETIONS),
        (("/embeddings",), Shape.EMBEDDINGS),
        (("/responses",), Shape.RESPONSES),
        (("/generate", "/v1/responses"), Shape.RESPONSES),  # the public path, failing the other
        (("/responses/{id}",), None),
        (("/{rest:path}", "/v1/{rest:path}"), None),
    ],
)
def test_a_routes_shape_is_read_from_its_upstream_path_then_its_public_path(
    paths: tuple[str, ...], shape: Shape | None
) -> None:
    assert shape_of(*paths) is shape
