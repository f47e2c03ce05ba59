"""YAML scalars -> Python values, as PyYAML's safe loader reads them.

A plain scalar (one without quotes or a tag) is resolved by PyYAML's implicit resolvers, the
YAML 1.1 patterns, tried by first character: ``true``, ``12``, ``1.5``, ``2025-01-01``, ``null``;
anything else is a string. A string may hold ``${NAME}`` references, expanded from the
environment (``environment``). Every distinct tag and text is constructed once: a large config
repeats the same few values thousands of times.

Numbers are bounded in length (``MAX_NUMBER_CHARS``): PyYAML's base-60 integers cost time
quadratic in their length.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import yaml

from gateway.config.checks import KeyPath
from gateway.config.environment import expand_references
from gateway.config.yamlevents import Event

__all__ = ["MAX_NUMBER_CHARS", "Scalars"]

# The longest plain scalar read as a number.
MAX_NUMBER_CHARS = 64
_NUMBER_TAGS = frozenset({"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"})
_STR_TAG = "tag:yaml.org,2002:str"

# How a problem with a value is reported: its line, its key path, the message.
Fail = Callable[[int, KeyPath, str], None]


class Scalars:
    """The values of one file's scalars; ``fail`` reports a value that cannot be read (which is
    then None), and ``secrets`` collects the environment values expanded (value -> name)."""

    def __init__(self, env: Mapping[str, str], secrets: dict[str, str], fail: Fail) -> None:
        self.env = env
        self.secrets = secrets
        self.fail = fail
        self.resolvers = yaml.resolver.Resolver.yaml_implicit_resolvers
        self.resolvable = frozenset(self.resolvers)  # first characters that may not be a string
        self.constructor = yaml.constructor.SafeConstructor()
        self.constructed: dict[tuple[str, str], object] = {}
        self.plain: dict[str, object] = {}  # plain scalar without ${NAME} -> its value

    def value(self, event: Event, path: KeyPath) -> object:
        """The value of the scalar ``event``, written at ``path``."""
        value: str = event.value
        tag: str | None = event.tag
        # A plain scalar without a tag or ${NAME} is the same value wherever it is written: the
        # builder looks it up in ``self.plain`` before calling here.
        cacheable = tag is None and event.implicit[0] and "$" not in value
        if tag is None or tag == "!":
            tag = _STR_TAG
            if event.implicit[0]:  # plain: resolved like PyYAML, by a pattern per first letter
                for candidate, pattern in self.resolvers.get(value[:1], ()):
                    if pattern.match(value):
                        tag = candidate
                        break
        if tag == _STR_TAG:
            if "$" in value:
                return self.expand(value, event.start_mark.line + 1, path)
            constructed: object = value
        elif len(value) > MAX_NUMBER_CHARS and tag in _NUMBER_TAGS:
            # PyYAML's base-60 integers (1:2:3...) cost time quadratic in their length: 160 kB
            # took 1.7 s, a 4 MiB file would take minutes. No setting needs such a number.
            limit = MAX_NUMBER_CHARS
            self.fail(event.start_mark.line + 1, path, f"a number longer than {limit} characters")
            return None
        else:
            constructed = self.constructed.get((tag, value), self)
            if constructed is self:
                try:
                    node = yaml.ScalarNode(tag, value)
                    constructed = self.constructor.construct_object(node, deep=True)
                except Exception as error:  # a constructor's failure is a problem with this value
                    problem = getattr(error, "problem", None) or f"invalid value: {error}"
                    self.fail(event.start_mark.line + 1, path, str(problem))
                    return None
                self.constructed[(tag, value)] = constructed
        if cacheable:
            self.plain[value] = constructed
        return constructed

    def expand(self, text: str, line: int, path: KeyPath) -> str:
        expanded, problems = expand_references(text, self.env, path, self.secrets)
        for problem in problems:
            self.fail(line, path, problem)
        return expanded
