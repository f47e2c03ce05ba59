"""The route table: literal paths, patterns, aliases, deprecation, 405 and raw paths."""

from __future__ import annotations

import pytest

from gateway.config.model import Route
from gateway.routing import (
    Match,
    MethodMismatch,
    PathVerdict,
    RouteTable,
    judge_path,
    relative_raw_path,
)


def table() -> RouteTable:
    return RouteTable(
        [
            Route(
                name="chat",
                path="/v1/chat/completions",
                upstream="openai",
                aliases=[
                    {"path": "/chat/completions"},
                    {
                        "path": "/openai/v1/chat/completions",
                        "deprecated": "2026-01-01",
                        "sunset": "2027-06-30",
                        "successor": "/v1/chat/completions",
                    },
                ],
            ),
            Route(
                name="file",
                path="/v1/files/{file_id}/content",
                methods=["GET"],
                upstream="openai",
            ),
            Route(
                name="passthrough",
                path="/v1/{rest:path}",
                methods=["GET", "POST"],
                upstream="openai",
            ),
            Route(name="deep", path="/v1/a/{rest:path}", methods=["POST"], upstream="openai"),
        ]
    )


@pytest.mark.parametrize(
    ("method", "path", "route", "upstream_path"),
    [
        ("POST", "/v1/chat/completions", "chat", "/chat/completions"),
        ("POST", "/chat/completions", "chat", "/chat/completions"),
        ("POST", "/openai/v1/chat/completions", "chat", "/chat/completions"),
        ("GET", "/v1/files/file-abc/content", "file", "/files/file-abc/content"),
        # Percent-encoding reaches the upstream as the client wrote it.
        ("GET", "/v1/files/a%2Fb/content", "file", "/files/a%2Fb/content"),
        ("GET", "/v1/batches/b1", "passthrough", "/batches/b1"),
        # The literal route serves POST; other methods fall to the catch-all.
        ("GET", "/v1/chat/completions", "passthrough", "/chat/completions"),
        # The longer literal prefix wins among catch-alls.
        ("POST", "/v1/a/b/c", "deep", "/a/b/c"),
    ],
)
def test_request_resolves_to_route_and_upstream_path(
    method: str, path: str, route: str, upstream_path: str
) -> None:
    match = table().match(method, path)
    assert isinstance(match, Match)
    assert match.endpoint.route.name == route
    assert match.upstream_path == upstream_path


def test_unknown_path_is_none_and_never_redirected() -> None:
    assert table().match("POST", "/chat/completions/") is None
    assert table().match("POST", "/nope") is None


def test_path_known_for_other_methods_is_method_mismatch_with_allowed_methods() -> None:
    match = table().match("DELETE", "/v1/files/f/content")
    assert match == MethodMismatch(("GET", "POST"))


def test_deprecated_alias_carries_deprecation_sunset_and_successor_link() -> None:
    match = table().match("POST", "/openai/v1/chat/completions")
    assert isinstance(match, Match)
    endpoint = match.endpoint
    assert endpoint.deprecated
    # RFC 9745: Deprecation is an @epoch date; RFC 8594: Sunset is an HTTP-date.
    assert dict(endpoint.deprecation_headers) == {
        b"deprecation": b"@1767225600",
        b"sunset": b"Wed, 30 Jun 2027 00:00:00 GMT",
    }
    assert endpoint.successor_link("/llm") == (
        b"link",
        b'</llm/v1/chat/completions>; rel="successor-version"',
    )


def test_current_paths_carry_no_deprecation() -> None:
    match = table().match("POST", "/v1/chat/completions")
    assert isinstance(match, Match)
    assert not match.endpoint.deprecated
    assert match.endpoint.successor_link("") is None


@pytest.mark.parametrize(
    ("raw_path", "path", "root_path", "expected"),
    [
        (b"/v1/models", "/v1/models", "", "/v1/models"),
        # Prefix kept by the proxy: strip it.
        (b"/llm/v1/models", "/llm/v1/models", "/llm", "/v1/models"),
        # Prefix stripped by the proxy (uvicorn prepends root_path to path only).
        (b"/v1/models", "/llm/v1/models", "/llm", "/v1/models"),
        (b"/teams/ml/llm/v1/x%2Fy", "/teams/ml/llm/v1/x/y", "/teams/ml/llm", "/v1/x%2Fy"),
        # A path that merely starts with the same letters is not under the prefix.
        (b"/llmx/v1", "/llmx/v1", "/llm", "/llmx/v1"),
        (None, "/v1/models", "", "/v1/models"),
    ],
)
def test_relative_raw_path(
    raw_path: bytes | None, path: str, root_path: str, expected: str
) -> None:
    assert relative_raw_path(raw_path, path, root_path) == expected


@pytest.mark.parametrize(
    ("raw_path", "verdict"),
    [
        ("/v1/chat/completions", PathVerdict.SAFE),
        ("/v1/files/file-abc/content", PathVerdict.SAFE),
        ("/v1/models/", PathVerdict.SAFE),  # a trailing slash is an empty last segment
        ("/v1/files/caf%C3%A9", PathVerdict.SAFE),
        ("/v1/files/a%20b", PathVerdict.SAFE),
        ("/v1/files/.hidden", PathVerdict.SAFE),
        ("/v1/files/a..b", PathVerdict.SAFE),
        ("/v1/models/org%2Fmodel", PathVerdict.ENCODED_SLASH),
        ("/v1/models/org%2fmodel", PathVerdict.ENCODED_SLASH),
        ("/v1/../secret", PathVerdict.UNSAFE),
        ("/v1/./chat", PathVerdict.UNSAFE),
        ("/v1//chat", PathVerdict.UNSAFE),
        ("/v1/%2e%2e/secret", PathVerdict.UNSAFE),
        ("/v1/%2E/chat", PathVerdict.UNSAFE),
        ("/v1/models/..%2F..%2Fsecret", PathVerdict.UNSAFE),
        ("/v1/models/a%2F%2Fb", PathVerdict.UNSAFE),  # an empty segment once decoded
        ("/v1/models/a%5Cb", PathVerdict.UNSAFE),
        ("/v1/models/a\\b", PathVerdict.UNSAFE),
        ("/v1/models/a%00b", PathVerdict.UNSAFE),
        ("/v1/models/a%0Ab", PathVerdict.UNSAFE),
        ("/v1/models/a%7fb", PathVerdict.UNSAFE),
        ("/v1/models/..;/secret", PathVerdict.UNSAFE),  # Tomcat and Jetty read it as ..
        ("/v1/models/.;x/chat", PathVerdict.UNSAFE),
        ("/v1/models/x%3Fapi-version%3D9", PathVerdict.UNSAFE),  # a query once decoded
        ("/v1/models/x%23frag", PathVerdict.UNSAFE),
        ("/v1/models/%252e%252e%252fsecret", PathVerdict.UNSAFE),  # encoded twice
        ("/v1/files/100%2525", PathVerdict.SAFE),  # a literal %25 that stays a percent
        ("/v1/files/a;b", PathVerdict.SAFE),
    ],
)
def test_paths_are_judged_by_what_they_mean_once_decoded(
    raw_path: str, verdict: PathVerdict
) -> None:
    assert judge_path(raw_path) is verdict


def slash_table() -> RouteTable:
    return RouteTable(
        [
            Route(
                name="model",
                path="/v1/models/{model}",
                methods=["GET"],
                upstream="openai",
                encoded_slashes="model",
            ),
            Route(name="file", path="/v1/files/{id}/{part}", methods=["GET"], upstream="openai"),
        ]
    )


@pytest.mark.parametrize(
    ("raw_path", "confined"),
    [
        ("/v1/models/org%2Fmodel", True),
        ("/v1/files/a%2Fb/content", False),  # the route allows no encoded slash
    ],
)
def test_encoded_slashes_are_allowed_only_in_the_parameter_the_route_names(
    raw_path: str, confined: bool
) -> None:
    match = slash_table().match("GET", raw_path)
    assert isinstance(match, Match)
    assert match.encoded_slashes_confined(raw_path) is confined


def test_encoded_slashes_must_name_a_parameter_of_the_path() -> None:
    with pytest.raises(ValueError, match="does not define"):
        Route(name="m", path="/v1/models/{model}", upstream="openai", encoded_slashes="id")
