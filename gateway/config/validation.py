"""The merged config validated entry by entry, then cross-checked over the entries that are valid.

Pydantic validates a whole config in one call that holds the GIL for its whole length (a tenth
of a second for 10,000 keys) and, when anything fails, returns no part of the result. Entry by
entry (each route, key, upstream and model, each other section; the entries of a list a few
hundred at a time, and one by one in a batch that fails), the event loop gets its turns during a
reload, and the entries that are valid can be cross-checked at once by ``checks.check_config``,
so field errors and cross-reference errors are reported together. A reference to an entry that
is itself invalid is not reported: its own error is.

Pydantic's ``input`` is never used in a message: it may hold a secret from the environment.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from gateway.config.checks import KeyPath, Unverified, check_config, parse_path
from gateway.config.keys import ApiKey
from gateway.config.model import GatewayConfig
from gateway.config.routes import Route

__all__ = ["LISTS", "TABLES", "validate"]

# The sections that are lists of entries, with the model of one entry, and the sections that are
# tables of named entries, with what one entry is called in messages. Files are merged along the
# same lines (``merge``): lists are concatenated, tables merged by name.
LISTS: dict[str, type[BaseModel]] = {"routes": Route, "keys": ApiKey}
TABLES = {"upstreams": "upstream", "models": "model", "request_rules": "rule set"}
_LIST_TYPES: dict[str, Any] = {"routes": list[Route], "keys": list[ApiKey]}
# Entries of a list validated in one call: a call per entry costs more than the validation of a
# small one, and a few hundred keys still take only a millisecond or two of the GIL.
_CHUNK = 256
# What a failed entry of a list still tells the cross-checks: the route's name, the key's team.
_NAMED = {"routes": "name", "keys": "team"}


def validate(
    data: dict[str, object], locate: Callable[[KeyPath], str], *, cross_check: bool
) -> tuple[list[tuple[KeyPath, str]], GatewayConfig | None]:
    """Every pydantic problem in ``data`` and, with ``cross_check``, every cross-reference
    problem over the entries that are valid; the config if there are none.

    ``locate`` names the place of a key path (``gateway.yaml:12``) for messages that point at
    another entry. Without ``cross_check`` (a file could not be read or parsed) the checks are
    left out, since the missing entries would make every reference to them look dangling.
    """
    entries = _Entries(data)
    problems = list(entries.problems)
    if cross_check and entries.partial is not None:
        index = entries.index

        def original(path: KeyPath) -> KeyPath:
            if len(path) > 1 and path[0] in index and isinstance(path[1], int):
                return (path[0], index[str(path[0])][path[1]], *path[2:])
            return path

        def place(text: str) -> str:
            return locate(original(parse_path(text)))

        for text, message in check_config(entries.partial, place, entries.unverified):
            problems.append((original(parse_path(text)), message))
    return problems, entries.config if not problems else None


class _Entries:
    """The merged data validated entry by entry: ``problems``, the ``partial`` config of the
    valid entries, what is ``unverified`` for want of the invalid ones, and the ``config`` when
    nothing failed."""

    def __init__(self, data: dict[str, object]) -> None:
        self.problems: list[tuple[KeyPath, str]] = []
        self.index: dict[str, list[int]] = {}  # list section -> original index of each valid item
        valid: dict[str, object] = {}
        unverified: dict[str, frozenset[str] | None] = {}
        for section, value in data.items():
            if section in LISTS and isinstance(value, list):
                model = LISTS[section]
                chunks: TypeAdapter[list[BaseModel]] = TypeAdapter(_LIST_TYPES[section])
                items: list[BaseModel] = []
                index: list[int] = []
                failed: set[str] = set()
                for start in range(0, len(value), _CHUNK):
                    chunk = value[start : start + _CHUNK]
                    try:
                        validated = chunks.validate_python(chunk)
                    except ValidationError:  # entry by entry: keep the valid ones, place errors
                        validated = None
                    if validated is not None:
                        items.extend(validated)
                        index.extend(range(start, start + len(chunk)))
                        continue
                    for i, item in enumerate(chunk, start):
                        entry = self._one(model, item, (section, i), data)
                        if entry is None:
                            name = item.get(_NAMED[section]) if isinstance(item, dict) else None
                            failed.add(name if isinstance(name, str) else "")
                        else:
                            items.append(entry)
                            index.append(i)
                valid[section] = tuple(items)
                self.index[section] = index
                unverified["teams" if section == "keys" else section] = frozenset(failed)
            elif section in TABLES and isinstance(value, dict):
                adapter: TypeAdapter[Any] = TypeAdapter(
                    GatewayConfig.model_fields[section].annotation
                )
                table: dict[str, BaseModel] = {}
                failed = set()
                for name, item in value.items():
                    entry = self._one(adapter, {name: item}, (section,), data)
                    if entry is None:
                        failed.add(name)
                    else:
                        table.update(entry)
                valid[section] = table
                unverified[section] = frozenset(failed)
            else:
                entry = self._one(GatewayConfig, {section: value}, (), data)
                if entry is not None:
                    valid[section] = getattr(entry, section)
                elif section in ("routes", "upstreams", "models", "request_rules"):
                    unverified[section] = None
                elif section == "keys":
                    unverified["teams"] = None
                elif section == "allow_unlisted_models":
                    unverified["models"] = None
        self.unverified = Unverified(**unverified)
        self.partial: GatewayConfig | None = None
        self.config: GatewayConfig | None = None
        try:
            self.partial = GatewayConfig.model_validate(valid)
        except ValidationError as error:  # a rule about the whole config (none today)
            self._problems(error, (), data)
        if not self.problems:
            self.config = self.partial

    def _one(self, model: Any, item: object, where: KeyPath, data: object) -> Any:
        try:
            return (
                model.validate_python(item)
                if isinstance(model, TypeAdapter)
                else (model.model_validate(item))
            )
        except ValidationError as error:
            self._problems(error, where, data)
            return None

    def _problems(self, error: ValidationError, where: KeyPath, data: object) -> None:
        details = error.errors(include_url=False, include_input=False)
        for detail in details:
            detail["loc"] = (*where, *detail["loc"])
        self.problems.extend(_pydantic_problems(details, data))


def _pydantic_problems(errors: list[ErrorDetails], data: object) -> list[tuple[KeyPath, str]]:
    """Pydantic's errors as (key path, message). Never uses ``input``: it may hold a secret.

    A union field reports one error per member, with the member's name in ``loc``; those are
    joined into one message at the field's path.
    """
    problems: dict[tuple[KeyPath, int], list[str]] = {}
    for n, error in enumerate(errors):
        path: list[str | int] = []
        node: object = data
        message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        union = False
        for part in error["loc"]:
            if part == "[key]":
                message = f"invalid name: {message}"
            elif isinstance(node, dict) and isinstance(part, str):
                node = node.get(part)
                path.append(part)
            elif isinstance(node, list) and isinstance(part, int):
                node = node[part] if 0 <= part < len(node) else None
                path.append(part)
            else:  # a union member's name, not a key
                union = True
                break
        problems.setdefault((tuple(path), -1 if union else n), []).append(message)
    return [(path, _either(texts)) for (path, _), texts in problems.items()]


def _either(messages: list[str]) -> str:
    """'Input should be a valid boolean; or a valid date' from a union's member errors."""
    first, *rest = dict.fromkeys(messages)
    return "; or ".join([first, *(m.removeprefix("Input should be ") for m in rest)])
