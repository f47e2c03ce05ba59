"""Path templates: the ``{name}`` and ``{name:path}`` syntax of public and upstream paths.

A public path pattern is literal segments and parameter segments: ``{name}`` matches one
segment, and a trailing ``{name:path}`` matches the rest of the path (a catch-all). An upstream
path uses the same placeholders to say where the matched values go. The syntax is defined here
only; the config models, the cross-checks, the router and the OpenAPI document all read it
through this module.

Two readings of one placeholder syntax:

- ``segment_param`` (and ``check_path_pattern``, ``pattern_params``) reads whole segments, as
  the config does to validate a public pattern and to name its parameters;
- ``split_template`` finds placeholders anywhere in the text, as the router does to build its
  matchers and to fill an upstream path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "PLACEHOLDER",
    "Param",
    "check_path_pattern",
    "pattern_params",
    "placeholder_names",
    "segment_param",
    "split_template",
]

# A parameter's name is an identifier (it becomes a regex group name in the router); ``:path``
# makes it a catch-all.
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(:path)?\}")
# A whole segment that is a placeholder (``fullmatch``: ``$`` would also allow a final newline).
_SEGMENT = re.compile(PLACEHOLDER.pattern)


@dataclass(frozen=True, slots=True)
class Param:
    """One placeholder: its name, and whether it takes the rest of the path."""

    name: str
    catch_all: bool


def segment_param(segment: str) -> Param | None:
    """The parameter ``segment`` (one ``/``-separated part of a path) is, or None if it is not
    a placeholder as a whole."""
    match = _SEGMENT.fullmatch(segment)
    if match is None:
        return None
    return Param(match.group(1), match.group(2) is not None)


def check_path_pattern(path: str) -> str:
    """A public path pattern: literal segments, ``{name}`` segments, and at most one trailing
    ``{name:path}`` segment that matches the rest of the path."""
    if not path.startswith("/"):
        raise ValueError("must start with '/'")
    if "?" in path or "#" in path:
        raise ValueError("must not contain a query string or fragment")
    segments = path.split("/")[1:]
    names: set[str] = set()
    for i, segment in enumerate(segments):
        if "{" not in segment and "}" not in segment:
            continue
        param = segment_param(segment)
        if param is None:
            raise ValueError(f"segment {segment!r} must be literal, '{{name}}' or '{{name:path}}'")
        if param.catch_all and i != len(segments) - 1:
            raise ValueError("a '{name:path}' segment must be the last one")
        if param.name in names:
            raise ValueError(f"parameter {{{param.name}}} appears twice")
        names.add(param.name)
    return path


def pattern_params(path: str) -> set[str]:
    """The names of the parameters that are whole segments of ``path``."""
    return {param.name for s in path.split("/") if (param := segment_param(s))}


def placeholder_names(path: str) -> set[str]:
    """The names of every placeholder in ``path``, whole segments or not."""
    return {match.group(1) for match in PLACEHOLDER.finditer(path)}


def split_template(path: str) -> list[str | Param]:
    """``path`` as literal text and placeholders, alternating: it starts and ends with a
    (possibly empty) literal, so the literals are one more than the placeholders."""
    pieces = PLACEHOLDER.split(path)  # literal, name, ":path"|None, literal, ...
    parts: list[str | Param] = []
    for i in range(0, len(pieces), 3):
        parts.append(pieces[i])
        if i + 1 < len(pieces):
            parts.append(Param(pieces[i + 1], pieces[i + 2] is not None))
    return parts
