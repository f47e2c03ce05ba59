"""``${NAME}`` references in config strings, expanded from the environment.

``${NAME}`` is the variable's value, ``${NAME:-default}`` the default when the variable is unset
or empty, and ``$${`` a literal ``${``. Mapping keys are never expanded (the document builder
only passes values here). Secrets come from the environment and are never echoed
(docs/design.md §2), so every value expanded is recorded with its name, and the loader replaces
it by ``${NAME}`` wherever a message would show it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from gateway.config.checks import KeyPath

__all__ = ["expand_references"]

_REFERENCE = re.compile(r"\$\$\{|\$\{(?:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})?")
# Environment values at least this long never appear in a message; shorter ones would make
# unrelated words disappear. Upstream credentials, headers and query are redacted from 3.
_REDACT_FROM = 8
_REDACT_SECRETS_FROM = 3
_SECRET_SECTIONS = (("auth",), ("headers",), ("query",))


def expand_references(
    text: str, env: Mapping[str, str], path: KeyPath, secrets: dict[str, str]
) -> tuple[str, list[str]]:
    """``text``, the value at ``path``, with its references expanded from ``env``, and the
    problems found, each once. Every value that must not appear in a message is added to
    ``secrets`` (value -> variable name)."""
    problems: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        name, default = match.groups()
        if match.group() == "$${":
            return "${"
        if name is None:
            problems.append(
                "a '${' must start ${NAME} or ${NAME:-default}; write $${ for a literal '${'"
            )
            return ""
        value = env.get(name)
        if default is not None and not value:
            return default
        if value is None:
            problems.append(f"environment variable {name} is not set")
            return ""
        secret = path[:1] == ("upstreams",) and path[2:3] in _SECRET_SECTIONS
        shortest = _REDACT_SECRETS_FROM if secret else _REDACT_FROM
        # The model strips whitespace from every string, secrets included, so a value
        # exported with a trailing newline is used, and shown in messages, without it.
        # Python's strip removes at least what pydantic's does, so its result is inside
        # whatever the model keeps.
        for form in (value, value.strip()):
            if len(form) >= shortest:
                secrets[form] = name
        return value

    expanded = _REFERENCE.sub(substitute, text)
    return expanded, list(dict.fromkeys(problems))
