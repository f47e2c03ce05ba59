"""The path-template syntax, read by the config models, the cross-checks, the router and the
OpenAPI document from one module."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.config.routes import Route
from gateway.config.templates import (
    Param,
    check_path_pattern,
    pattern_params,
    segment_param,
    split_template,
)


@pytest.mark.parametrize(
    ("segment", "expected"),
    [
        ("{id}", Param("id", catch_all=False)),
        ("{rest:path}", Param("rest", catch_all=True)),
        ("{_x1}", Param("_x1", catch_all=False)),
        ("files", None),
        ("{}", None),
        ("{1x}", None),
        ("{a-b}", None),
        ("{id}.json", None),
        ("{id:int}", None),
    ],
)
def test_a_segment_is_a_parameter_only_as_a_whole(segment: str, expected: Param | None) -> None:
    assert segment_param(segment) == expected


def test_a_pattern_names_its_whole_segment_parameters() -> None:
    assert pattern_params("/v1/{org}/files/{rest:path}") == {"org", "rest"}
    assert pattern_params("/v1/models") == set()


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("v1/x", "must start with '/'"),
        ("/v1/x?y=1", "must not contain a query string or fragment"),
        ("/v1/{a-b}", "segment '{a-b}' must be literal, '{name}' or '{name:path}'"),
        ("/v1/{rest:path}/x", "a '{name:path}' segment must be the last one"),
        ("/v1/{id}/{id}", "parameter {id} appears twice"),
    ],
)
def test_a_bad_pattern_says_what_is_wrong(path: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("?", r"\?").replace("{", r"\{")):
        check_path_pattern(path)


def test_a_good_pattern_is_returned_as_written() -> None:
    assert check_path_pattern("/v1/files/{file_id}/{rest:path}") == (
        "/v1/files/{file_id}/{rest:path}"
    )


def test_a_template_splits_into_literals_around_its_parameters() -> None:
    assert split_template("/v1/files/{id}/content/{rest:path}") == [
        "/v1/files/",
        Param("id", catch_all=False),
        "/content/",
        Param("rest", catch_all=True),
        "",
    ]
    assert split_template("/v1/models") == ["/v1/models"]


def test_a_segment_with_a_trailing_newline_is_not_a_parameter() -> None:
    assert segment_param("{id}\n") is None
    with pytest.raises(ValueError, match="must be literal"):
        check_path_pattern("/v1/{id}\n")


def test_an_upstream_path_may_not_use_a_placeholder_the_path_lacks_even_inside_a_segment() -> None:
    # Accepted before, then every request to the route failed in the router.
    with pytest.raises(ValidationError, match="'upstream_path' uses \\['foo'\\]"):
        Route(name="r", path="/v1/files/{id}", upstream="u", upstream_path="/files/{foo}.json")
    route = Route(name="r", path="/v1/files/{id}", upstream="u", upstream_path="/f/{id}.json")
    assert route.upstream_path == "/f/{id}.json"
