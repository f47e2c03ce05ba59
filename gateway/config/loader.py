"""YAML files -> one ``GatewayConfig``, or every error at once with its file, line and key path.

The steps, each reporting all it finds before the next runs:

1. Parse each file into plain values with PyYAML's safe scalars, recording where every mapping
   key and sequence item sits, rejecting duplicate keys (PyYAML would keep the last silently) and
   expanding ``${NAME}`` / ``${NAME:-default}`` from the environment in string values (``$${`` is
   a literal ``${``; mapping keys are never expanded). The default applies when the variable is
   unset or empty, as in the shell; defaults cannot nest.
2. Follow ``include:`` (paths relative to the including file; for ``parse_config_text`` relative
   to the directory of ``filename``, so the current directory for ``"<string>"``), and merge:
   ``routes`` and ``keys`` are concatenated (main file first, then includes depth first, in
   order), ``upstreams`` and ``models`` are merged by name, every other section is set by one
   file only. Positions follow the merge, so ``routes[5].path`` still points into its own file.
3. Validate with pydantic, then run ``checks.check_config`` (only when pydantic accepted the
   config and every file was read, else it would report the consequences of earlier errors).

Upstream keys come from the environment, so no message ever carries an expanded value: pydantic's
``input`` is never printed, and, as a second line of defence, text taken from the environment is
replaced by its ``${NAME}`` wherever a message would show it (values of 8 characters or more, and
of 3 or more under an upstream's ``auth``, ``headers`` and ``query``), both as written and
without surrounding whitespace, the form the model keeps.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from gateway.config.checks import KeyPath, check_config, format_path, parse_path
from gateway.config.model import GatewayConfig

__all__ = ["ConfigError", "ConfigIssue", "load_config", "parse_config_text"]

Where = tuple[str, int | None]

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_REFERENCE = re.compile(r"\$\$\{|\$\{(?:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})?")
_LISTS = frozenset({"routes", "keys"})
_TABLES = {"upstreams": "upstream", "models": "model"}
# Environment values at least this long never appear in a message; shorter ones would make
# unrelated words disappear. Upstream credentials, headers and query are redacted from 3.
_REDACT_FROM = 8
_REDACT_SECRETS_FROM = 3
_SECRET_SECTIONS = (("auth",), ("headers",), ("query",))


@dataclass(frozen=True)
class ConfigIssue:
    """One problem, printed as ``file:line: key.path: message``."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """An invalid configuration; ``errors`` holds every problem found, in file and line order."""

    def __init__(self, errors: Iterable[ConfigIssue]) -> None:
        self.errors = tuple(errors)
        super().__init__("\n".join(str(issue) for issue in self.errors))


def load_config(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Load the file at ``path`` and its includes; ``env`` defaults to ``os.environ``."""
    return load_config_files(path, env)[0]


def load_config_files(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> tuple[GatewayConfig, tuple[str, ...]]:
    """Like :func:`load_config`, also naming every file read (for reload on change)."""
    file = os.fspath(path)
    text = _read(file)
    if isinstance(text, OSError | UnicodeDecodeError):
        raise ConfigError([ConfigIssue(file, None, "", _cannot_read(text))])
    session = _Session(os.environ if env is None else env)
    session.add(text, file, ((os.path.realpath(file), file),))
    return session.finish(), tuple(session.files)


def parse_config_text(
    text: str, filename: str = "<string>", env: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Parse ``text`` as if read from ``filename``; includes are relative to its directory."""
    session = _Session(os.environ if env is None else env)
    session.add(text, filename, ((os.path.realpath(filename), filename),))
    return session.finish()


@dataclass
class _Document:
    """One parsed file: plain values plus where each key path was written."""

    file: str
    data: dict[str, object]
    where: dict[KeyPath, Where]
    failed: set[KeyPath]  # paths whose value is already reported (pydantic would repeat it)


@dataclass
class _Session:
    env: Mapping[str, str]
    issues: list[ConfigIssue] = field(default_factory=list)
    documents: list[_Document] = field(default_factory=list)
    secrets: dict[str, str] = field(default_factory=dict)  # environment value -> its name
    complete: bool = True  # every file was read and parsed
    files: list[str] = field(default_factory=list)  # in the order they were read
    included_at: dict[str, str] = field(default_factory=dict)  # real path -> "file:line"

    def add(self, text: str, file: str, chain: tuple[tuple[str, str], ...]) -> None:
        """Parse ``file`` and, depth first, what it includes; ``chain`` holds the (real path,
        name) of the files including it, to stop cycles."""
        self.files.append(file)
        document = _Builder(file, self).parse(text)
        if document is None:
            self.complete = False
            return
        self.documents.append(document)
        for index, item in _includes(document, self):
            child = os.path.normpath(os.path.join(os.path.dirname(file), item))
            real = os.path.realpath(child)
            reals = [r for r, _ in chain]
            problem = None
            if real in reals:
                names = [name for _, name in chain[reals.index(real) :]]
                problem = "include cycle: " + " -> ".join([*names, child])
            elif real in self.included_at:
                problem = f"{child!r} is already included at {self.included_at[real]}"
            else:
                text_or_error = _read(child)
                if isinstance(text_or_error, str):
                    self.included_at[real] = _at(document.where[("include", index)])
                    self.add(text_or_error, child, (*chain, (real, child)))
                    continue
                problem = _cannot_read(text_or_error, child)
            self.complete = False
            self.report(document, ("include", index), problem)

    def report(self, document: _Document, path: KeyPath, message: str) -> None:
        file, line = _nearest(document.where, path, (document.file, None))
        self.issues.append(ConfigIssue(file, line, format_path(path), message))

    def finish(self) -> GatewayConfig:
        config = None
        if self.documents:
            merged = _merge(self.documents, self)
            config = self._validate(merged)
        if self.issues or config is None:
            raise ConfigError(self._ordered())
        return config

    def _validate(self, merged: _Document) -> GatewayConfig | None:
        problems: list[tuple[KeyPath, str]] = []
        config = None
        try:
            config = GatewayConfig.model_validate(merged.data)
        except ValidationError as error:
            details = error.errors(include_url=False, include_input=False)
            problems = _pydantic_problems(details, merged.data)
        if config is not None and self.complete:

            def locate(path: str) -> str:
                return _at(_nearest(merged.where, parse_path(path), (merged.file, None)))

            checked = check_config(config, locate)
            problems = [(parse_path(path), message) for path, message in checked]
        for path, message in problems:
            if not any(path[:n] in merged.failed for n in range(len(path) + 1)):
                self.report(merged, path, message)
        return config

    def _ordered(self) -> list[ConfigIssue]:
        rank = {file: i for i, file in enumerate(self.files)}
        issues = sorted(self.issues, key=lambda i: (rank.get(i.file, -1), i.line or 0))
        for value, name in sorted(self.secrets.items(), key=lambda item: -len(item[0])):
            # Case-insensitive: a validator may have upper-cased the value (HTTP methods).
            pattern = re.compile(re.escape(value), re.IGNORECASE)
            for i, issue in enumerate(issues):
                message = pattern.sub(f"${{{name}}}", issue.message)  # a name has no backslash
                issues[i] = ConfigIssue(issue.file, issue.line, issue.path, message)
        return issues


class _Builder:
    """Builds one file's plain values from PyYAML's node tree, recording positions."""

    def __init__(self, file: str, session: _Session) -> None:
        self.file = file
        self.session = session
        self.document = _Document(file, {}, {(): (file, None)}, set())
        self.active: set[int] = set()  # collection nodes being built, to stop recursive aliases

    def parse(self, text: str) -> _Document | None:
        try:
            loader = yaml.SafeLoader(text)
        except yaml.YAMLError as error:  # a reader error: control characters
            self.session.issues.append(ConfigIssue(self.file, None, "", f"YAML: {error}"))
            return None
        try:
            root = loader.get_single_node()
            if root is not None:
                data = self.build(root, (), loader)
                if not isinstance(data, dict):
                    self.fail(root, (), "the top level must be a mapping of sections")
                    return None
                self.document.data = data
            return self.document
        except yaml.MarkedYAMLError as error:
            mark = error.problem_mark or error.context_mark
            line = None if mark is None else mark.line + 1
            problem = error.problem or "syntax error"
            if error.context:  # PyYAML's context reads before a problem starting "but ..."
                but = problem.startswith("but ")
                problem = f"{error.context} {problem}" if but else f"{problem} ({error.context})"
            self.session.issues.append(ConfigIssue(self.file, line, "", f"YAML: {problem}"))
            return None
        except yaml.YAMLError as error:
            self.session.issues.append(ConfigIssue(self.file, None, "", f"YAML: {error}"))
            return None
        finally:
            loader.dispose()

    def fail(self, node: yaml.Node, path: KeyPath, message: str, *, dropped: bool = True) -> None:
        """Report a problem at ``node``; ``dropped``: its value is lost, so pydantic's complaints
        about the path would only repeat this one."""
        line = node.start_mark.line + 1
        self.session.issues.append(ConfigIssue(self.file, line, format_path(path), message))
        if dropped:
            self.document.failed.add(path)

    def build(self, node: yaml.Node, path: KeyPath, loader: yaml.SafeLoader) -> object:
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, path, loader)
        problem = None
        if id(node) in self.active:
            problem = "an alias refers to a node that contains it"
        elif node.tag not in (_MAP_TAG, _SEQ_TAG):
            problem = f"unsupported tag {node.tag!r}"
        if problem is not None:
            self.fail(node, path, problem)
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                items = []
                for i, item in enumerate(node.value):
                    self.document.where[(*path, i)] = (self.file, item.start_mark.line + 1)
                    items.append(self.build(item, (*path, i), loader))
                return items
            assert isinstance(node, yaml.MappingNode)
            return self.mapping(node, path, loader)
        finally:
            self.active.discard(id(node))

    def mapping(
        self, node: yaml.MappingNode, path: KeyPath, loader: yaml.SafeLoader
    ) -> dict[str, object]:
        result: dict[str, object] = {}
        lines: dict[str, int] = {}
        merges = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
                continue
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                self.fail(key_node, path, "a mapping key must be a plain name", dropped=False)
                continue
            key = key_node.value  # keys are names: their text, never true/1/null or ${...}
            if key in lines:
                message = f"duplicate key (lines {lines[key]} and {line})"
                self.fail(key_node, (*path, key), message, dropped=False)
                continue
            lines[key] = line
            self.document.where[(*path, key)] = (self.file, line)
            result[key] = self.build(value_node, (*path, key), loader)
        for merge_node in merges:  # YAML's "<<: *defaults"; the mapping's own keys win
            sources = (
                merge_node.value if isinstance(merge_node, yaml.SequenceNode) else [merge_node]
            )
            for source in sources:
                if not isinstance(source, yaml.MappingNode):
                    message = "'<<' needs a mapping or a list of mappings"
                    self.fail(source, path, message, dropped=False)
                    continue
                outer, self.document.where = self.document.where, {}
                merged = self.mapping(source, path, loader)
                inner, self.document.where = self.document.where, outer
                for key, value in merged.items():
                    if key not in result:
                        result[key] = value
                        prefix = (*path, key)
                        self.document.where.update(
                            (p, w) for p, w in inner.items() if p[: len(prefix)] == prefix
                        )
        return result

    def scalar(self, node: yaml.ScalarNode, path: KeyPath, loader: yaml.SafeLoader) -> object:
        try:
            value = loader.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError) as error:
            problem = getattr(error, "problem", None) or f"invalid value: {error}"
            self.fail(node, path, str(problem))
            return None
        if not isinstance(value, str) or node.tag != _STR_TAG:
            return value
        return self.expand(value, node, path)

    def expand(self, text: str, node: yaml.Node, path: KeyPath) -> str:
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
            value = self.session.env.get(name)
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
                    self.session.secrets[form] = name
            return value

        expanded = _REFERENCE.sub(substitute, text)
        for problem in dict.fromkeys(problems):
            self.fail(node, path, problem)
        return expanded


def _read(file: str) -> str | OSError | UnicodeDecodeError:
    try:
        return Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        return error


def _cannot_read(error: OSError | UnicodeDecodeError, file: str | None = None) -> str:
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return f"cannot read {file!r}: {reason}" if file else f"cannot read: {reason}"


def _includes(document: _Document, session: _Session) -> list[tuple[int, str]]:
    value = document.data.get("include")
    if value is None or ("include",) in document.failed:
        return []
    if not isinstance(value, list):
        session.report(document, ("include",), "must be a list of file paths")
        document.failed.add(("include",))
        return []
    found = []
    for index, item in enumerate(value):
        if isinstance(item, str) and item:
            found.append((index, item))
        else:
            session.report(document, ("include", index), "must be a file path")
            document.failed.add(("include", index))
    return found


def _merge(documents: list[_Document], session: _Session) -> _Document:
    """One document holding every file's sections, with positions moved along with the values."""
    merged = _Document(documents[0].file, {}, {(): (documents[0].file, None)}, set())
    data = merged.data
    for document in documents:
        for key, value in document.data.items():
            if key == "include" and document is not documents[0]:
                continue
            first = merged.where.get((key,), (merged.file, None))
            if key not in data:
                copied = list(value) if isinstance(value, list) else value
                data[key] = dict(copied) if isinstance(copied, dict) else copied
                _move(document, merged, (key,), (key,))
            elif key in _LISTS and isinstance(value, list) and isinstance(data[key], list):
                items = data[key]
                assert isinstance(items, list)
                for i, item in enumerate(value):
                    _move(document, merged, (key, i), (key, len(items)))
                    items.append(item)
            elif key in _TABLES and isinstance(value, dict) and isinstance(data[key], dict):
                table = data[key]
                assert isinstance(table, dict)
                for name, item in value.items():
                    if name in table:
                        other = merged.where[(key, name)]
                        message = f"{_TABLES[key]} {name!r} is already defined at {_at(other)}"
                        session.report(document, (key, name), message)
                    else:
                        table[name] = item
                        _move(document, merged, (key, name), (key, name))
            else:
                kind = "list" if key in _LISTS else "mapping" if key in _TABLES else ""
                message = (
                    f"must be a {kind} in every file to be merged (first set at {_at(first)})"
                    if kind
                    else f"already set at {_at(first)}; set it in one file only"
                )
                session.report(document, (key,), message)
    return merged


def _move(source: _Document, target: _Document, old: KeyPath, new: KeyPath) -> None:
    """Copy the positions (and failures) at and under ``old`` to ``new``."""
    for path, where in source.where.items():
        if path[: len(old)] == old:
            target.where[new + path[len(old) :]] = where
    for path in source.failed:
        if path[: len(old)] == old:
            target.failed.add(new + path[len(old) :])


def _at(where: Where) -> str:
    return where[0] if where[1] is None else f"{where[0]}:{where[1]}"


def _nearest(where: Mapping[KeyPath, Where], path: KeyPath, default: Where) -> Where:
    for n in range(len(path), -1, -1):
        if path[:n] in where:
            return where[path[:n]]
    return default


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
