"""load_config: YAML in, a frozen GatewayConfig or every error as file:line: key path out."""

from __future__ import annotations

import datetime as dt
import ipaddress
import textwrap
from collections.abc import Mapping
from pathlib import Path

import pydantic
import pytest

from gateway.config.loader import ConfigError, ConfigIssue, load_config, parse_config_text
from gateway.config.model import GatewayConfig

HASH_A = "sha256:" + "a" * 64
HASH_B = "sha256:" + "b" * 64
SECRET = "sk-proj-Sup3rS3cretValue"
ENV = {"OPENAI_API_KEY": SECRET}
NOT_A_NUMBER = "Input should be a valid number, unable to parse string as a number"

MINIMAL = """\
upstreams:
  openai:
    base_url: https://api.openai.com/v1
    auth: {key: "${OPENAI_API_KEY}"}
routes:
  - name: chat
    path: /v1/chat/completions
    upstream: openai
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def errors(path: Path, env: Mapping[str, str] = ENV) -> list[str]:
    """The issues loading ``path`` reports, as printed."""
    with pytest.raises(ConfigError) as info:
        load_config(path, env)
    assert str(info.value) == "\n".join(str(issue) for issue in info.value.errors)
    return [str(issue) for issue in info.value.errors]


def text_errors(text: str, env: Mapping[str, str] = ENV) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config_text(textwrap.dedent(text), "gw.yaml", env)
    return [str(issue) for issue in info.value.errors]


# --- valid configs ---------------------------------------------------------------------------


def test_minimal_config_loads_into_frozen_objects_with_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "gateway.yaml", MINIMAL), ENV)
    assert isinstance(config, GatewayConfig)
    assert config.routes[0].methods == ("POST",)
    assert config.routes[0].target_path() == "/chat/completions"
    assert config.upstreams["openai"].auth.key is not None
    assert config.upstreams["openai"].auth.key.get_secret_value() == SECRET
    assert config.server.port == 8080
    assert config.redis.url is None
    with pytest.raises(pydantic.ValidationError):
        config.server.port = 1  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        config.routes = ()  # type: ignore[misc]


def test_explicitly_empty_routes_is_the_default_config(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway.yaml", "# nothing yet\nroutes: []\n")
    assert load_config(path, {}) == GatewayConfig()


def test_a_file_without_routes_is_refused_saying_why(tmp_path: Path) -> None:
    # What a reload reads between an editor's truncate and its write: serving it would answer
    # every request with 404.
    for text in ("", "# nothing yet\n", "upstreams: {u: {base_url: 'http://u'}}\n"):
        path = write(tmp_path, "gateway.yaml", text)
        assert errors(path, {}) == [
            f"{path}: no routes: every request would get 404. A file caught between an "
            "editor's truncate and its write reads as empty, so a config without routes is "
            "refused; write 'routes: []' to serve none on purpose"
        ]


def test_routes_declared_in_an_include_count(tmp_path: Path) -> None:
    main = write(tmp_path, "gateway.yaml", "include: [routes.yaml]\n")
    write(tmp_path, "routes.yaml", "routes: []\n")
    assert load_config(main, {}).routes == ()


def test_text_in_memory_may_leave_routes_out() -> None:
    # It cannot be caught half-written.
    assert parse_config_text("", env={}) == GatewayConfig()


def test_full_config_loads_every_section(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gateway.yaml",
        f"""\
        server:
          host: 0.0.0.0
          port: ${{PORT:-9000}}
          root_path: /llm
          trusted_proxies: [10.0.0.0/8, "fd00::/8"]
          max_body_bytes: 1048576
          access_log: false
        redis:
          url: redis://redis:6379/0
          on_failure: closed
        upstreams:
          openai:
            base_url: ${{OPENAI_BASE_URL:-https://api.openai.com/v1/}}
            auth: {{key: "${{OPENAI_API_KEY}}"}}
            timeouts: {{connect: 2, read: 300}}
          anthropic:
            base_url: https://api.anthropic.com/v1
            auth: {{style: x-api-key, key: "${{ANTHROPIC_API_KEY}}"}}
            headers: {{anthropic-version: "2023-06-01"}}
        routes:
          - name: chat
            path: /v1/chat/completions
            upstream: openai
            stream_usage: true
            aliases:
              - path: /chat/completions
                deprecated: 2025-01-01
                sunset: 2026-01-01
                successor: /v1/chat/completions
          - name: files
            path: /v1/files/{{file_id}}
            methods: [get, DELETE]
            upstream: openai
        models:
          claude: {{upstream: anthropic, model: claude-sonnet-4-5}}
          gpt-4.1: {{upstream: openai}}
        keys:
          - {{name: alice, hash: "{HASH_A}", team: research, models: ["gpt-*", claude]}}
          - {{name: bob, hash: "{HASH_B}", routes: [chat], limits: {{requests_per_minute: 5}}}}
        limits:
          default: {{requests_per_minute: 60, tokens_per_minute: 100000}}
          teams: {{research: {{tokens_per_minute: 1000000}}}}
          routes: {{files: {{requests_per_minute: 10}}}}
          models: {{"gpt-*": {{token_burst: 5000}}}}
        """,
    )
    config = load_config(path, {**ENV, "ANTHROPIC_API_KEY": "sk-ant-1", "PORT": "9443"})
    assert config.server.port == 9443
    assert config.server.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
    )
    assert config.redis.on_failure == "closed"
    assert config.upstreams["openai"].base_url == "https://api.openai.com/v1"
    assert config.upstreams["openai"].timeouts.read == 300
    assert config.upstreams["anthropic"].headers == {"anthropic-version": "2023-06-01"}
    alias = config.routes[0].aliases[0]
    assert (alias.deprecated, alias.sunset) == (dt.date(2025, 1, 1), dt.date(2026, 1, 1))
    assert config.routes[1].methods == ("GET", "DELETE")
    assert config.models["claude"].model == "claude-sonnet-4-5"
    assert config.keys[1].limits is not None
    assert config.keys[1].limits.requests_per_minute == 5
    assert config.limits.teams["research"].tokens_per_minute == 1_000_000


def test_parse_config_text_reports_the_given_filename() -> None:
    assert parse_config_text(MINIMAL, env=ENV).routes[0].name == "chat"
    with pytest.raises(ConfigError) as info:
        parse_config_text("server: {port: x}\n", env={})
    assert [str(e) for e in info.value.errors] == [
        "<string>:1: server.port: Input should be a valid integer, unable to parse string as an "
        "integer"
    ]


def test_yaml_anchors_aliases_and_merge_keys_are_allowed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gateway.yaml",
        """\
        upstreams:
          a: &upstream
            base_url: http://a:8000/v1
            timeouts: {read: 30}
          b:
            <<: *upstream
            base_url: http://b:8000/v1
        routes: []
        """,
    )
    config = load_config(path, {})
    assert config.upstreams["b"].base_url == "http://b:8000/v1"
    assert config.upstreams["b"].timeouts.read == 30


def test_mapping_keys_are_names_not_yaml_booleans_or_numbers(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gateway.yaml",
        """\
        upstreams: {u: {base_url: "http://u"}}
        models:
          yes: {upstream: u}
          3.5: {upstream: u}
        routes: []
        """,
    )
    assert set(load_config(path, {}).models) == {"yes", "3.5"}


# --- YAML-level errors -----------------------------------------------------------------------


def test_yaml_syntax_error_reports_the_line_of_the_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway.yaml", "server:\n  port: 1\n routes: []\n")
    (message,) = errors(path)
    assert message.startswith(f"{path}:3: YAML: ")


def test_duplicate_mapping_key_reports_both_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gateway.yaml",
        """\
        upstreams:
          openai:
            base_url: http://one
          openai:
            base_url: http://two
        routes: []
        """,
    )
    assert errors(path) == [f"{path}:4: upstreams.openai: duplicate key (lines 2 and 4)"]


def test_duplicate_top_level_key_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway.yaml", "routes: []\nserver: {}\nroutes: []\n")
    assert errors(path) == [f"{path}:3: routes: duplicate key (lines 1 and 3)"]


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway.yaml", "- a\n- b\n")
    assert errors(path) == [f"{path}:1: the top level must be a mapping of sections"]


def test_more_than_one_yaml_document_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway.yaml", "server: {}\n---\nredis: {}\n")
    (message,) = errors(path)
    assert message == (
        f"{path}:2: YAML: expected a single document in the stream but found another document"
    )


def test_unknown_tag_and_bad_date_are_reported_at_their_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gateway.yaml",
        """\
        upstreams:
          u: {base_url: !env URL}
        routes:
          - name: r
            path: /r
            upstream: u
            aliases: [{path: /old, deprecated: 2025-13-01}]
        """,
    )
    assert errors(path) == [
        f"{path}:2: upstreams.u.base_url: could not determine a constructor for the tag '!env'",
        f"{path}:7: routes[0].aliases[0].deprecated: invalid value: month must be in 1..12",
    ]


def test_recursive_alias_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway.yaml", "routes: &r\n  - *r\n")
    # An alias is its anchored node, so the line is the anchor's.
    assert errors(path) == [f"{path}:1: routes[0]: an alias refers to a node that contains it"]


def test_a_merged_value_is_reported_at_the_anchors_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gateway.yaml",
        """\
        upstreams:
          a: &base
            base_url: http://a
            timeouts: {read: slow}
          b:
            <<: *base
            base_url: http://b
        routes: []
        """,
    )
    assert errors(path) == [
        f"{path}:4: upstreams.a.timeouts.read: {NOT_A_NUMBER}",
        f"{path}:4: upstreams.b.timeouts.read: {NOT_A_NUMBER}",
    ]


def test_a_complex_mapping_key_is_reported_and_the_rest_of_its_mapping_kept(
    tmp_path: Path,
) -> None:
    # The key, a whole collection, is passed over before its value is read.
    path = write(
        tmp_path, "gateway.yaml", "server:\n  ? [a, [b]]\n  : {c: d}\n  port: x\nroutes: []\n"
    )
    assert errors(path, {}) == [
        f"{path}:2: server: a mapping key must be a plain name",
        f"{path}:4: server.port: Input should be a valid integer, unable to parse string as an "
        "integer",
    ]


def test_errors_inside_flow_collections_point_at_their_own_lines(tmp_path: Path) -> None:
    """Positions are kept only where they differ from the line of the enclosing key; a flow
    collection over several lines keeps them, one on a single line points at that line (in an
    included file too)."""
    path = write(
        tmp_path,
        "gateway.yaml",
        """\
        upstreams:
          u: {base_url: "http://u", timeouts: {connect: x,
                read: y}}
        routes:
          - {name: a, path: /a, upstream: u,
             methods: [GET, "BR EW"]}
          - name: b
            path: /b
            upstream: u
            aliases: [{path: /old-b, deprecated: someday}]
        include: [keys.yaml]
        """,
    )
    keys = write(
        tmp_path,
        "keys.yaml",
        f'keys: [{{name: k1, hash: "{HASH_A}", team: t}}, {{name: k2, hash: "sha256:a", '
        "team: t}]\n",
    )
    assert errors(path, {}) == [
        f"{path}:2: upstreams.u.timeouts.connect: {NOT_A_NUMBER}",
        f"{path}:3: upstreams.u.timeouts.read: {NOT_A_NUMBER}",
        f"{path}:6: routes[0].methods: unknown method 'BR EW'; use one of GET, POST, PUT, PATCH, "
        "DELETE, HEAD, OPTIONS",
        f"{path}:10: routes[1].aliases[0].deprecated: Input should be a valid boolean, unable to "
        "interpret input; or a valid date or datetime, input is too short",
        f"{keys}:1: keys[1].hash: must be the key's hash, 'sha256:' and 64 lowercase hex digits: "
        "run 'gateway keys new NAME' and paste the hash it prints (for an existing key: echo "
        '"$KEY" | gateway keys hash)',
    ]


def test_missing_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert errors(path) == [f"{path}: cannot read: No such file or directory"]


# --- validation errors -----------------------------------------------------------------------


def test_invalid_value_reports_file_line_and_key_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gateway.yaml",
        """\
        server:
          port: 8080
        redis:
          url: redis://localhost
        upstreams:
          openai:
            base_url: api.openai.com/v1
        routes: []
        """,
    )
    assert errors(path) == [
        f"{path}:7: upstreams.openai.base_url: "
        "must be an http:// or https:// URL in ASCII, without credentials, query or fragment "
        "(credentials go in 'auth')"
    ]


def test_missing_field_points_at_the_list_item(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gateway.yaml",
        """\
        upstreams: {u: {base_url: "http://u"}}
        routes:
          - name: a
            path: /a
            upstream: u
          - path: /b
            upstream: u
        """,
    )
    assert errors(path) == [f"{path}:6: routes[1].name: Field required"]


def test_unknown_key_is_reported_at_its_own_line(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway.yaml", "server:\n  port: 1\n  prot: 2\nbogus: 1\nroutes: []\n")
    assert errors(path) == [
        f"{path}:3: server.prot: Extra inputs are not permitted",
        f"{path}:4: bogus: Extra inputs are not permitted",
    ]


def test_object_level_error_points_at_the_object(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gateway.yaml",
        """\
        upstreams: {u: {base_url: "http://u"}}
        routes:
          - name: files
            path: /v1/files/{id}
            upstream: u
            aliases:
              - path: /files/{file_id}
        """,
    )
    assert errors(path) == [
        f"{path}:3: routes[0]: alias '/files/{{file_id}}' must use the same parameters as "
        "'/v1/files/{id}'"
    ]


def test_union_errors_become_one_message(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gateway.yaml",
        """\
        upstreams: {u: {base_url: "http://u"}}
        routes:
          - {name: r, path: /r, upstream: u, aliases: [{path: /old, deprecated: soon}]}
        """,
    )
    assert errors(path) == [
        f"{path}:3: routes[0].aliases[0].deprecated: Input should be a valid boolean, unable to "
        "interpret input; or a valid date or datetime, input is too short"
    ]


def test_invalid_upstream_name_is_reported_at_the_name(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gateway.yaml",
        'upstreams:\n  "my upstream": {base_url: "http://u"}\nroutes: []\n',
    )
    assert errors(path) == [
        f'{path}:2: upstreams["my upstream"]: invalid name: '
        "String should match pattern '^[A-Za-z0-9][A-Za-z0-9_.:-]*$'"
    ]


def test_every_error_is_reported_at_once_in_line_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gateway.yaml",
        """\
        routes:
          - {name: chat, path: v1/chat, upstream: openai}
        upstreams:
          openai: {base_url: "ftp://x", auth: {style: basic}}
        server: {port: 70000}
        """,
    )
    assert errors(path) == [
        f"{path}:2: routes[0].path: must start with '/'",
        f"{path}:4: upstreams.openai.base_url: "
        "must be an http:// or https:// URL in ASCII, without credentials, query or fragment "
        "(credentials go in 'auth')",
        f"{path}:4: upstreams.openai.auth.style: "
        "Input should be 'bearer', 'api-key', 'x-api-key' or 'none'",
        f"{path}:5: server.port: Input should be less than or equal to 65535",
    ]


def test_duplicate_route_path_reports_both_routes_with_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gateway.yaml",
        """\
        upstreams: {openai: {base_url: "http://u"}}
        routes:
          - name: chat
            path: /v1/chat
            upstream: openai
          - name: chat-legacy
            path: /v1/completions
            upstream: openai
            aliases:
              - path: /v1/chat
        """,
    )
    assert errors(path) == [
        f"{path}:10: routes[1].aliases[0].path: '/v1/chat' is already served by route 'chat' "
        f"({path}:4)"
    ]


def test_dangling_references_are_reported_with_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gateway.yaml",
        f"""\
        upstreams: {{openai: {{base_url: "http://u"}}}}
        routes:
          - {{name: chat, path: /v1/chat, upstream: opneai}}
        models:
          gpt-4o: {{upstream: azure}}
        keys:
          - name: alice
            hash: "{HASH_A}"
            routes: [chat, embeddings]
        limits:
          teams: {{research: {{}}}}
        """,
    )
    assert errors(path) == [
        f"{path}:3: routes[0].upstream: unknown upstream 'opneai'; defined: openai",
        f"{path}:5: models.gpt-4o.upstream: unknown upstream 'azure'; defined: openai",
        f"{path}:9: keys[0].routes[1]: unknown route 'embeddings'; defined: chat",
        f"{path}:11: limits.teams.research: unknown team 'research': no key has it",
    ]


def test_field_errors_and_dangling_references_are_reported_in_one_run(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gateway.yaml",
        """\
        upstreams: {openai: {base_url: "http://u"}}
        routes:
          - {name: chat, path: v1/chat, upstream: openai}
          - {name: embed, path: /v1/embeddings, upstream: opneai}
        x: 1
        """,
    )
    assert errors(path) == [
        f"{path}:3: routes[0].path: must start with '/'",
        f"{path}:4: routes[1].upstream: unknown upstream 'opneai'; defined: openai",
        f"{path}:5: x: Extra inputs are not permitted",
    ]


def test_references_to_an_invalid_entry_are_left_to_its_own_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gateway.yaml",
        f"""\
        upstreams:
          openai: {{base_url: "ftp://u"}}
          local: {{base_url: "http://local/v1"}}
        routes:
          - {{name: chat, path: /v1/chat, upstream: openai, methods: [FETCH]}}
          - {{name: local, path: /v1/local, upstream: openai}}
        models:
          gpt: {{upstream: openai}}
        keys:
          - {{name: a, hash: "{HASH_A}", routes: [chat, local, gone], team: t}}
          - {{name: b, hash: "nope", team: research}}
        limits:
          teams: {{research: {{}}, t: {{}}}}
          routes: {{chat: {{}}}}
        """,
    )
    assert errors(path) == [
        f"{path}:2: upstreams.openai.base_url: "
        "must be an http:// or https:// URL in ASCII, without credentials, query or fragment "
        "(credentials go in 'auth')",
        f"{path}:5: routes[0].methods: unknown method 'FETCH'; use one of GET, POST, PUT, "
        "PATCH, DELETE, HEAD, OPTIONS",
        f"{path}:10: keys[0].routes[2]: unknown route 'gone'; defined: local",
        f"{path}:11: keys[1].hash: must be the key's hash, 'sha256:' and 64 lowercase hex "
        "digits: run 'gateway keys new NAME' and paste the hash it prints (for an existing "
        'key: echo "$KEY" | gateway keys hash)',
    ]


def test_indices_in_messages_are_those_of_the_file_when_earlier_entries_are_invalid(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        "gateway.yaml",
        """\
        upstreams: {u: {base_url: "http://u"}}
        routes:
          - {name: bad, path: nope, upstream: u}
          - {name: a, path: /v1/chat, upstream: u}
          - {name: b, path: /v1/chat, upstream: u}
        """,
    )
    assert errors(path) == [
        f"{path}:3: routes[0].path: must start with '/'",
        f"{path}:5: routes[2].path: '/v1/chat' is already served by route 'a' ({path}:4)",
    ]


# --- environment variables -------------------------------------------------------------------


def test_env_substitution_with_defaults_and_escapes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gateway.yaml",
        """\
        server:
          port: ${PORT}
          root_path: ${PREFIX:-/llm}
          host: ${HOST:-127.0.0.2}
        upstreams:
          u:
            base_url: http://${UPSTREAM_HOST}:8000/v1
            headers:
              x-template: $${NOT_EXPANDED} and $$ and $5
              x-empty: "${EMPTY}"
              x-default: "${UNSET:-}"
        routes: []
        """,
    )
    env = {"PORT": "9000", "HOST": "", "UPSTREAM_HOST": "vllm", "EMPTY": ""}
    config = load_config(path, env)
    assert config.server.port == 9000
    assert config.server.root_path == "/llm"
    assert config.server.host == "127.0.0.2"  # an empty variable takes the default, as in sh
    assert config.upstreams["u"].base_url == "http://vllm:8000/v1"
    assert config.upstreams["u"].headers == {
        "x-template": "${NOT_EXPANDED} and $$ and $5",
        "x-empty": "",
        "x-default": "",
    }


def test_env_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "from-os-environ")
    config = load_config(write(tmp_path, "gateway.yaml", MINIMAL))
    key = config.upstreams["openai"].auth.key
    assert key is not None
    assert key.get_secret_value() == "from-os-environ"


def test_missing_env_var_is_reported_by_name_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gateway.yaml",
        """\
        upstreams:
          openai:
            base_url: ${OPENAI_BASE_URL}
            auth:
              key: ${OPENAI_API_KEY}
        routes: []
        """,
    )
    # base_url would also fail validation as an empty string; that would only repeat the cause.
    assert errors(path, {}) == [
        f"{path}:3: upstreams.openai.base_url: environment variable OPENAI_BASE_URL is not set",
        f"{path}:5: upstreams.openai.auth.key: environment variable OPENAI_API_KEY is not set",
    ]


def test_malformed_reference_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway.yaml", "server:\n  host: ${HOST\nroutes: []\n")
    assert errors(path) == [
        f"{path}:2: server.host: a '${{' must start ${{NAME}} or ${{NAME:-default}}; "
        "write $${ for a literal '${'"
    ]


def test_keys_are_not_expanded(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gateway.yaml",
        'upstreams: {u: {base_url: "http://u", query: {"${H}": v}}}\nroutes: []\n',
    )
    assert load_config(path, {}).upstreams["u"].query == {"${H}": "v"}


def test_secrets_from_the_environment_never_appear_in_errors(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gateway.yaml",
        """\
        server:
          trusted_proxies: ["${OPENAI_API_KEY}"]
        upstreams:
          openai:
            base_url: ${OPENAI_API_KEY}
            auth: {key: "${OPENAI_API_KEY}", style: "${OPENAI_API_KEY}"}
            headers: {authorization: "Bearer ${OPENAI_API_KEY}", x-n: "${OPENAI_API_KEY}"}
            query: {api-key: [a, "${OPENAI_API_KEY}"]}
        routes:
          - name: chat
            path: /v1/${OPENAI_API_KEY}
            upstream: openai
            methods: ["${OPENAI_API_KEY}"]
        """,
    )
    found = errors(path)
    assert len(found) == 5
    report = "\n".join(found)
    assert SECRET not in report
    assert SECRET.lower() not in report.lower()
    assert "${OPENAI_API_KEY}" in report  # the variable is named instead


def test_secret_in_a_duplicate_route_path_is_replaced_by_its_variable(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gateway.yaml",
        """\
        upstreams: {u: {base_url: "http://u"}}
        routes:
          - {name: a, path: "/${TOKEN}", upstream: u}
          - {name: b, path: "/${TOKEN}", upstream: u}
        """,
    )
    assert errors(path, {"TOKEN": "tok-12345"}) == [
        f"{path}:4: routes[1].path: '/${{TOKEN}}' is already served by route 'a' ({path}:3)"
    ]


# A secret exported with a trailing newline (``$(cat key.txt)``, ``$'...\n'``): the model strips
# it, so the stripped value is the one used and the one a message would show.
NEWLINE_SECRET = "sk-abc123secret"
MISUSED_SECRET = """\
upstreams:
  openai:
    base_url: https://api.openai.com/v1
    auth: {key: "${OPENAI_API_KEY}"}
routes:
  - {name: chat, path: /v1/chat/completions, upstream: "${OPENAI_API_KEY}"}
"""


def test_secret_with_trailing_newline_is_redacted_in_other_fields() -> None:
    found = text_errors(MISUSED_SECRET, {"OPENAI_API_KEY": NEWLINE_SECRET + "\n"})
    assert found == [
        "gw.yaml:6: routes[0].upstream: unknown upstream '${OPENAI_API_KEY}'; defined: openai"
    ]


def test_secret_with_surrounding_whitespace_is_redacted_when_loaded_from_a_file(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, "gateway.yaml", MISUSED_SECRET)
    report = "\n".join(errors(path, {"OPENAI_API_KEY": f"  {NEWLINE_SECRET}\r\n"}))
    assert NEWLINE_SECRET not in report
    assert "'${OPENAI_API_KEY}'" in report


def test_upstream_key_is_used_stripped_so_the_stripped_key_is_what_is_redacted() -> None:
    valid = MISUSED_SECRET.replace('upstream: "${OPENAI_API_KEY}"', "upstream: openai")
    config = parse_config_text(valid, env={"OPENAI_API_KEY": NEWLINE_SECRET + "\n"})
    key = config.upstreams["openai"].auth.key
    assert key is not None
    assert key.get_secret_value() == NEWLINE_SECRET
    # Under auth the shorter minimum applies to the stripped value too.
    found = text_errors(MISUSED_SECRET, {"OPENAI_API_KEY": "k9z\n"})
    assert "'k9z'" not in "\n".join(found)


def test_minimum_length_applies_to_the_value_as_used_not_its_whitespace() -> None:
    # "nowhere" is 7 characters: padded to 8 by a newline it is still too short to be a
    # secret, and redacting it would hide an ordinary word from the message.
    text = """\
        upstreams: {u: {base_url: "http://u"}}
        routes: [{name: a, path: /a, upstream: "${UP}"}]
        """
    found = text_errors(text, {"UP": "nowhere\n"})
    assert found == ["gw.yaml:2: routes[0].upstream: unknown upstream 'nowhere'; defined: u"]


# --- includes --------------------------------------------------------------------------------


def test_includes_merge_lists_and_tables_in_order(tmp_path: Path) -> None:
    main = write(
        tmp_path,
        "gateway.yaml",
        """\
        include: [upstreams.yaml, routes/extra.yaml]
        routes:
          - {name: chat, path: /v1/chat/completions, upstream: openai}
        """,
    )
    write(
        tmp_path,
        "upstreams.yaml",
        """\
        upstreams:
          openai: {base_url: "https://api.openai.com/v1"}
        server: {port: 9999}
        """,
    )
    write(
        tmp_path,
        "routes/extra.yaml",
        """\
        include: [more.yaml]
        upstreams:
          local: {base_url: "http://localhost:8000/v1"}
        routes:
          - {name: embeddings, path: /v1/embeddings, upstream: openai}
        """,
    )
    write(
        tmp_path,
        "routes/more.yaml",
        """\
        routes:
          - {name: local, path: /local/v1/chat/completions, upstream: local}
        models:
          llama: {upstream: local}
        """,
    )
    config = load_config(main, {})
    assert [route.name for route in config.routes] == ["chat", "embeddings", "local"]
    assert list(config.upstreams) == ["openai", "local"]
    assert config.server.port == 9999
    assert config.models["llama"].upstream == "local"
    assert config.include == ("upstreams.yaml", "routes/extra.yaml")


def test_error_in_included_file_points_into_that_file(tmp_path: Path) -> None:
    main = write(
        tmp_path,
        "gateway.yaml",
        """\
        include: [conf.d/routes.yaml]
        upstreams: {openai: {base_url: "http://u"}}
        routes:
          - {name: a, path: /a, upstream: openai}
          - {name: b, path: /b, upstream: openai}
        """,
    )
    included = write(
        tmp_path,
        "conf.d/routes.yaml",
        """\
        routes:
          - name: c
            path: /c
            upstream: openai
          - name: d
            path: d
            upstream: openai
        """,
    )
    assert errors(main) == [f"{included}:6: routes[3].path: must start with '/'"]


def test_check_error_in_included_file_names_both_files(tmp_path: Path) -> None:
    main = write(
        tmp_path,
        "gateway.yaml",
        """\
        include: [more.yaml]
        upstreams: {openai: {base_url: "http://u"}}
        routes:
          - {name: chat, path: /v1/chat, upstream: openai}
        """,
    )
    more = write(
        tmp_path,
        "more.yaml",
        """\
        routes:
          - name: chat2
            path: /v1/chat
            upstream: openai
        """,
    )
    assert errors(main) == [
        f"{more}:3: routes[1].path: '/v1/chat' is already served by route 'chat' ({main}:4)"
    ]


def test_duplicate_upstream_across_files_names_both_files_and_lines(tmp_path: Path) -> None:
    main = write(
        tmp_path,
        "gateway.yaml",
        """\
        include: [more.yaml]
        upstreams:
          openai: {base_url: "http://one"}
        routes: []
        """,
    )
    more = write(
        tmp_path, "more.yaml", 'models: {}\nupstreams:\n  openai: {base_url: "http://2"}\n'
    )
    assert errors(main) == [
        f"{more}:3: upstreams.openai: upstream 'openai' is already defined at {main}:3"
    ]


def test_single_sections_may_be_set_in_one_file_only(tmp_path: Path) -> None:
    main = write(tmp_path, "gateway.yaml", "include: [a.yaml]\nserver: {port: 1}\nroutes: []\n")
    included = write(tmp_path, "a.yaml", "redis: {}\nserver: {port: 2}\n")
    assert errors(main) == [
        f"{included}:2: server: already set at {main}:2; set it in one file only"
    ]


def test_lists_must_be_lists_in_every_file(tmp_path: Path) -> None:
    main = write(tmp_path, "gateway.yaml", "include: [a.yaml]\nroutes: []\n")
    included = write(tmp_path, "a.yaml", "routes: {}\n")
    assert errors(main) == [
        f"{included}:1: routes: must be a list in every file to be merged (first set at {main}:2)"
    ]


def test_include_cycle_is_reported(tmp_path: Path) -> None:
    main = write(tmp_path, "gateway.yaml", "include: [a.yaml]\n")
    a = write(tmp_path, "a.yaml", "include: [sub/b.yaml]\n")
    b = write(tmp_path, "sub/b.yaml", "include: [../gateway.yaml]\n")
    assert errors(main) == [f"{b}:1: include[0]: include cycle: {main} -> {a} -> {b} -> {main}"]


def test_a_file_including_itself_is_a_cycle(tmp_path: Path) -> None:
    main = write(tmp_path, "gateway.yaml", "include:\n  - gateway.yaml\n")
    assert errors(main) == [f"{main}:2: include[0]: include cycle: {main} -> {main}"]


def test_a_file_included_twice_is_reported(tmp_path: Path) -> None:
    main = write(tmp_path, "gateway.yaml", "include: [a.yaml, b.yaml]\n")
    write(tmp_path, "a.yaml", "include: [common.yaml]\n")
    b = write(tmp_path, "b.yaml", "include: [common.yaml]\n")
    write(tmp_path, "common.yaml", "upstreams: {u: {base_url: 'http://u'}}\n")
    common = tmp_path / "common.yaml"
    assert errors(main) == [
        f"{b}:1: include[0]: '{common}' is already included at {tmp_path / 'a.yaml'}:1"
    ]


def test_missing_included_file_is_reported_at_the_include_line(tmp_path: Path) -> None:
    main = write(tmp_path, "gateway.yaml", "server: {}\ninclude:\n  - ok.yaml\n  - gone.yaml\n")
    write(tmp_path, "ok.yaml", "routes: []\n")
    assert errors(main) == [
        f"{main}:4: include[1]: cannot read '{tmp_path / 'gone.yaml'}': No such file or directory"
    ]


def test_include_must_be_a_list_of_paths(tmp_path: Path) -> None:
    main = write(tmp_path, "gateway.yaml", "include: a.yaml\nroutes: []\n")
    assert errors(main) == [f"{main}:1: include: must be a list of file paths"]
    main.write_text("include: [a.yaml, 3]\nroutes: []\n")
    write(tmp_path, "a.yaml", "{}\n")
    assert errors(main) == [f"{main}:1: include[1]: must be a file path"]


def test_errors_in_several_files_are_reported_together(tmp_path: Path) -> None:
    main = write(tmp_path, "gateway.yaml", "include: [a.yaml, b.yaml]\nserver: {port: x}\n")
    a = write(tmp_path, "a.yaml", "redis: {timeout_ms: 0}\n")
    b = write(tmp_path, "b.yaml", "upstreams: [\n")
    found = errors(main)
    assert found[:2] == [
        f"{main}:2: server.port: Input should be a valid integer, unable to parse string as an "
        "integer",
        f"{a}:1: redis.timeout_ms: Input should be greater than or equal to 1",
    ]
    assert found[2].startswith(f"{b}:2: YAML: ")
    assert len(found) == 3


def test_parse_config_text_includes_relative_to_the_filename(tmp_path: Path) -> None:
    write(tmp_path, "conf/ups.yaml", "upstreams: {u: {base_url: 'http://u'}}\n")
    config = parse_config_text("include: [ups.yaml]\n", str(tmp_path / "conf" / "x.yaml"), {})
    assert list(config.upstreams) == ["u"]


# --- the error types -------------------------------------------------------------------------


def test_issue_and_error_formatting() -> None:
    issues = [
        ConfigIssue("gw.yaml", 42, "routes[3].aliases[0].path", "'/v1/chat' is taken"),
        ConfigIssue("gw.yaml", None, "", "cannot read: Permission denied"),
    ]
    error = ConfigError(issues)
    assert error.errors == tuple(issues)
    assert str(error) == (
        "gw.yaml:42: routes[3].aliases[0].path: '/v1/chat' is taken\n"
        "gw.yaml: cannot read: Permission denied"
    )
    with pytest.raises(AttributeError):
        issues[0].line = 1  # type: ignore[misc]


def test_header_values_that_would_break_the_request_line_are_refused_without_echo(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        "gateway.yaml",
        'upstreams: {u: {base_url: "http://u", headers: {x-title: "${T}"}, auth: {key: "${K}"}}}\n',
    )
    with pytest.raises(ConfigError) as refused:
        load_config(path, {"T": "ok\r\nx-injected: yes", "K": "sk-secret-1\r\nx: y"})
    text = str(refused.value)
    assert "upstreams.u.headers" in text
    assert "upstreams.u.auth.key" in text
    assert "x-injected" not in text
    assert "sk-secret-1" not in text


def test_credentials_in_base_url_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway.yaml", 'upstreams: {u: {base_url: "https://a:b@x/v1"}}\n')
    with pytest.raises(ConfigError, match="without credentials"):
        load_config(path, {})
