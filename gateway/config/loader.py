"""YAML files -> one ``GatewayConfig``, or every error at once with its file, line and key path.

The steps, each reporting all it finds:

1. Read each file (regular files only, at most 4 MiB each and 16 MiB in all: ``files``) and
   parse it into plain values (``yamldoc``: duplicate keys, ``${NAME}`` expansion, bounded
   nesting and aliases), recording where every mapping key and sequence item sits.
2. Follow ``include:`` (paths relative to the including file; for ``parse_config_text`` relative
   to the directory of ``filename``, so the current directory for ``"<string>"``), and merge:
   ``routes`` and ``keys`` are concatenated (main file first, then includes depth first, in
   order), ``upstreams`` and ``models`` are merged by name, every other section is set by one
   file only. Positions follow the merge, so ``routes[5].path`` still points into its own file.
   An include must resolve, symlinks followed, inside the main file's directory (or the
   directory a symlinked main file really is in: a Kubernetes ConfigMap mounts files as symlinks
   into a ``..data`` directory beside them), unless the main file says ``include_outside: true``.
3. Validate with pydantic entry by entry (each route, key, upstream and model, each other
   section), then run ``checks.check_config`` over the entries that are valid, so field errors
   and cross-reference errors are reported together. A reference to an entry that is itself
   invalid is not reported: its own error is. The checks wait only for files that could not be
   read or parsed, since the missing entries would make every reference to them look dangling.
4. A config read from files must declare ``routes`` in some file: a file caught between an
   editor's truncate and its write reads as empty, and an empty config would answer every request
   with 404. ``routes: []`` declares that no route is meant.

Upstream keys come from the environment, so no message ever carries an expanded value: pydantic's
``input`` is never printed, and, as a second line of defence, text taken from the environment is
replaced by its ``${NAME}`` wherever a message would show it (values of 8 characters or more, and
of 3 or more under an upstream's ``auth``, ``headers`` and ``query``), both as written and
without surrounding whitespace, the form the model keeps.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from gateway.config.checks import KeyPath, Unverified, check_config, format_path, parse_path
from gateway.config.files import MAX_FILE_BYTES, MAX_TOTAL_BYTES, FileStamp, read_config_file
from gateway.config.model import ApiKey, GatewayConfig, Route
from gateway.config.yamldoc import Positions, parse_yaml

__all__ = [
    "INCLUDE_OUTSIDE",
    "ConfigError",
    "ConfigIssue",
    "ConfigSnapshot",
    "load_config",
    "load_config_files",
    "parse_config_text",
    "read_config",
]

Where = tuple[str, int | None]

# The main file's switch that lets includes leave its directory. It is the loader's, not a
# section of the config: it decides which files are read before there is a config to validate.
INCLUDE_OUTSIDE = "include_outside"
_LISTS: dict[str, type[BaseModel]] = {"routes": Route, "keys": ApiKey}
_LIST_TYPES: dict[str, Any] = {"routes": list[Route], "keys": list[ApiKey]}
# Entries of a list validated in one call: a call per entry costs more than the validation of a
# small one, and a few hundred keys still take only a millisecond or two of the GIL.
_CHUNK = 256
_TABLES = {"upstreams": "upstream", "models": "model"}
# What a failed entry of a list still tells the cross-checks: the route's name, the key's team.
_NAMED = {"routes": "name", "keys": "team"}
_NO_ROUTES = (
    "no routes: every request would get 404. A file caught between an editor's truncate and its "
    "write reads as empty, so a config without routes is refused; write 'routes: []' to serve "
    "none on purpose"
)


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


@dataclass(frozen=True)
class ConfigSnapshot:
    """One reading of a config: the config or the error, and exactly which bytes were read."""

    config: GatewayConfig | None
    error: ConfigError | None
    stamps: tuple[FileStamp, ...]  # every file named, in the order read; unreadable ones too

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(stamp.file for stamp in self.stamps)


def load_config(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Load the file at ``path`` and its includes; ``env`` defaults to ``os.environ``."""
    return load_config_files(path, env)[0]


def load_config_files(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> tuple[GatewayConfig, tuple[str, ...]]:
    """Like :func:`load_config`, also naming every file read (for reload on change)."""
    snapshot = read_config(path, env)
    if snapshot.config is None:
        assert snapshot.error is not None
        raise snapshot.error
    return snapshot.config, snapshot.files


def read_config(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> ConfigSnapshot:
    """Read, parse and validate the config at ``path``; never raises ``ConfigError``."""
    file = os.fspath(path)
    session = _Session(os.environ if env is None else env, _roots(file), require_routes=True)
    with collection_paused():
        data = session.read(file)
        if isinstance(data, str):
            session.issues.append(ConfigIssue(file, None, "", f"cannot read: {data}"))
        else:
            session.add(data, file, ((os.path.realpath(file), file),))
        config, error = session.finish()
        session.release()
    return ConfigSnapshot(config, error, tuple(session.stamps))


@contextlib.contextmanager
def collection_paused(*, freeze: bool = False) -> Iterator[None]:
    """Cyclic garbage collection paused while a config is built.

    Everything a load allocates stays alive until it ends, so collections during it find nothing
    to free; with a large config they were a third of the time. Left as it is if already paused
    (the reloader pauses it for longer). ``freeze``: what is alive at the end is moved out of
    later collections (``gc.freeze``, bpo-31558); see gateway/reload.py for why a reload does.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        gc.enable()


def parse_config_text(
    text: str, filename: str = "<string>", env: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Parse ``text`` as if read from ``filename``; includes are relative to its directory.

    Unlike a file, text in memory cannot be caught half-written, so it may leave out ``routes``.
    """
    session = _Session(os.environ if env is None else env, _roots(filename))
    data = text.encode()
    if len(data) > MAX_FILE_BYTES:
        problem = f"it is {len(data):,} bytes, over the limit of {MAX_FILE_BYTES:,} bytes"
        session.issues.append(ConfigIssue(filename, None, "", f"cannot read: {problem}"))
    else:
        session.total = len(data)
        session.add(data, filename, ((os.path.realpath(filename), filename),))
    config, error = session.finish()
    if config is None:
        assert error is not None
        raise error
    return config


def _roots(main: str) -> tuple[str, ...]:
    """The directories includes may resolve into: the main file's, and the one it is really in
    when it is a symlink (a ConfigMap's ``gateway.yaml -> ..data/gateway.yaml``)."""
    named = os.path.realpath(os.path.dirname(os.path.abspath(main)))
    real = os.path.dirname(os.path.realpath(main))
    return (named,) if real == named else (named, real)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@dataclass
class _Document:
    """One parsed file (or the merge of all): plain values plus where each key path was
    written. ``lines`` holds lines in ``file``, except under a prefix that ``origin`` maps to
    another file (entries merged from an include)."""

    file: str
    data: dict[str, object]
    lines: Positions
    failed: set[KeyPath]  # paths whose value is already reported (pydantic would repeat it)
    origin: dict[KeyPath, str] = field(default_factory=dict)

    def where(self, path: KeyPath) -> Where:
        """The file and line of ``path``, or of the nearest enclosing key path that has one."""
        file = self.file
        for n in range(len(path), -1, -1):
            if path[:n] in self.origin:
                file = self.origin[path[:n]]
                break
        line = 0
        positions: Positions | None = self.lines
        for part in path:
            entry = None if positions is None else positions.get(part)
            if entry is None:
                break
            line, positions = (entry, None) if isinstance(entry, int) else entry
        return file, line or None


@dataclass
class _Session:
    env: Mapping[str, str]
    roots: tuple[str, ...]
    require_routes: bool = False
    issues: list[ConfigIssue] = field(default_factory=list)
    documents: list[_Document] = field(default_factory=list)
    secrets: dict[str, str] = field(default_factory=dict)  # environment value -> its name
    complete: bool = True  # every file was read and parsed
    stamps: list[FileStamp] = field(default_factory=list)  # in the order they were read
    included_at: dict[str, str] = field(default_factory=dict)  # real path -> "file:line"
    include_outside: bool = False
    total: int = 0  # bytes read so far

    def read(self, file: str) -> bytes | str:
        """The bytes of ``file``, or why they cannot be read (a missing file, a FIFO, a size
        limit); every file is stamped, so that the reloader watches it even while missing."""
        data, stamp = read_config_file(file)
        self.stamps.append(stamp)
        if isinstance(data, bytes):
            self.total += len(data)
            if self.total > MAX_TOTAL_BYTES:
                return (
                    f"the config files together are over the limit of {MAX_TOTAL_BYTES:,} "
                    f"bytes ({MAX_TOTAL_BYTES // (1024 * 1024)} MiB)"
                )
        return data

    def add(self, data: bytes, file: str, chain: tuple[tuple[str, str], ...]) -> None:
        """Parse ``file`` and, depth first, what it includes; ``chain`` holds the (real path,
        name) of the files including it, to stop cycles."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            self.complete = False
            self.issues.append(ConfigIssue(file, None, "", f"cannot read: {error}"))
            return
        parsed = parse_yaml(text, self.env)
        self.secrets.update(parsed.secrets)
        for line, path, message in parsed.problems:
            self.issues.append(ConfigIssue(file, line, format_path(path), message))
        if parsed.data is None:
            self.complete = False
            return
        document = _Document(file, parsed.data, parsed.lines, parsed.failed)
        self.documents.append(document)
        self._include_outside(document, main=len(chain) == 1)
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
            elif not self.include_outside and not any(_inside(real, r) for r in self.roots):
                problem = (
                    f"{child!r} is outside the main config file's directory "
                    f"({self.roots[0]}); set '{INCLUDE_OUTSIDE}: true' in the main file to "
                    "include it anyway"
                )
            else:
                content = self.read(child)
                if isinstance(content, bytes):
                    self.included_at[real] = _at(document.where(("include", index)))
                    self.add(content, child, (*chain, (real, child)))
                    continue
                problem = f"cannot read {child!r}: {content}"
            self.complete = False
            self.report(document, ("include", index), problem)

    def _include_outside(self, document: _Document, *, main: bool) -> None:
        if INCLUDE_OUTSIDE not in document.data:
            return
        value = document.data[INCLUDE_OUTSIDE]
        if not main:
            message = "only the main config file may set it"
        elif not isinstance(value, bool):
            message = "must be true or false"
        else:
            self.include_outside = value  # kept in the data: the model documents the field
            return
        del document.data[INCLUDE_OUTSIDE]  # reported here, not again by the merge
        self.report(document, (INCLUDE_OUTSIDE,), message)

    def report(self, document: _Document, path: KeyPath, message: str) -> None:
        file, line = document.where(path)
        self.issues.append(ConfigIssue(file, line, format_path(path), message))

    def finish(self) -> tuple[GatewayConfig | None, ConfigError | None]:
        config = None
        if self.documents:
            merged = _merge(self.documents, self)
            config = self._validate(merged)
            if (
                self.require_routes
                and self.complete
                and not any("routes" in document.data for document in self.documents)
            ):
                self.issues.append(ConfigIssue(self.documents[0].file, None, "", _NO_ROUTES))
        if self.issues or config is None:
            return None, ConfigError(self._ordered())
        return config, None

    def _validate(self, merged: _Document) -> GatewayConfig | None:
        """Every pydantic problem and, over the entries that are valid, every cross-reference
        problem; the config if there are none."""
        entries = _Entries(merged.data)
        problems = list(entries.problems)
        if self.complete and entries.partial is not None:
            index = entries.index

            def original(path: KeyPath) -> KeyPath:
                if len(path) > 1 and path[0] in index and isinstance(path[1], int):
                    return (path[0], index[str(path[0])][path[1]], *path[2:])
                return path

            def locate(text: str) -> str:
                return _at(merged.where(original(parse_path(text))))

            for text, message in check_config(entries.partial, locate, entries.unverified):
                problems.append((original(parse_path(text)), message))
        for path, message in problems:
            if not any(path[:n] in merged.failed for n in range(len(path) + 1)):
                self.report(merged, path, message)
        return entries.config if not problems else None

    def release(self) -> None:
        """Free the parsed files piece by piece.

        Dropped at once, the values and positions of a large config (a quarter of a million
        entries) are freed in one C call that holds the GIL for tens of milliseconds; a few
        hundred entries at a time, a reload in a thread lets the event loop in between.
        """
        for document in self.documents:
            for value in document.data.values():
                _drain(value)
            document.data.clear()
            for entry in document.lines.values():
                if isinstance(entry, tuple):
                    _drain(entry[1])
            document.lines.clear()
        self.documents.clear()

    def _ordered(self) -> list[ConfigIssue]:
        rank: dict[str, int] = {}
        for stamp in self.stamps:
            rank.setdefault(stamp.file, len(rank))
        issues = sorted(self.issues, key=lambda i: (rank.get(i.file, -1), i.line or 0))
        for value, name in sorted(self.secrets.items(), key=lambda item: -len(item[0])):
            # Case-insensitive: a validator may have upper-cased the value (HTTP methods).
            pattern = re.compile(re.escape(value), re.IGNORECASE)
            for i, issue in enumerate(issues):
                message = pattern.sub(f"${{{name}}}", issue.message)  # a name has no backslash
                issues[i] = ConfigIssue(issue.file, issue.line, issue.path, message)
        return issues


class _Entries:
    """The merged data validated entry by entry.

    Pydantic validates a whole config in one call that holds the GIL for its whole length (a
    tenth of a second for 10,000 keys) and, when anything fails, returns no part of the result.
    Entry by entry (the entries of a list a few hundred at a time, and one by one in a batch that
    fails), the event loop gets its turns during a reload, and the entries that are valid can be
    cross-checked at once.
    """

    def __init__(self, data: dict[str, object]) -> None:
        self.problems: list[tuple[KeyPath, str]] = []
        self.index: dict[str, list[int]] = {}  # list section -> original index of each valid item
        valid: dict[str, object] = {}
        unverified: dict[str, frozenset[str] | None] = {}
        for section, value in data.items():
            if section in _LISTS and isinstance(value, list):
                model = _LISTS[section]
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
            elif section in _TABLES and isinstance(value, dict):
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
                elif section in ("routes", "upstreams", "models"):
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
    main = documents[0]
    # The main file's positions are the merge's (the main file is not reported on afterwards):
    # copying them would cost as much as a large file has keys.
    merged = _Document(main.file, {}, main.lines, set(main.failed))
    data = merged.data
    for document in documents:
        moves = _Moves(document, merged)
        for key, value in document.data.items():
            if key == "include" and document is not main:
                continue
            first = merged.where((key,))
            if key not in data:
                copied = list(value) if isinstance(value, list) else value
                data[key] = dict(copied) if isinstance(copied, dict) else copied
                if document is not main:
                    moves.move((key,), (key,))
            elif key in _LISTS and isinstance(value, list) and isinstance(data[key], list):
                items = data[key]
                assert isinstance(items, list)
                for i, item in enumerate(value):
                    moves.move((key, i), (key, len(items)))
                    items.append(item)
            elif key in _TABLES and isinstance(value, dict) and isinstance(data[key], dict):
                table = data[key]
                assert isinstance(table, dict)
                for name, item in value.items():
                    if name in table:
                        other = merged.where((key, name))
                        message = f"{_TABLES[key]} {name!r} is already defined at {_at(other)}"
                        session.report(document, (key, name), message)
                    else:
                        table[name] = item
                        moves.move((key, name), (key, name))
            else:
                kind = "list" if key in _LISTS else "mapping" if key in _TABLES else ""
                message = (
                    f"must be a {kind} in every file to be merged (first set at {_at(first)})"
                    if kind
                    else f"already set at {_at(first)}; set it in one file only"
                )
                session.report(document, (key,), message)
    return merged


class _Moves:
    """Copies an included document's positions (and failures) into the merge, entry by entry.

    Positions are a tree, so moving one of 10,000 keys takes its subtree as it is.
    """

    def __init__(self, source: _Document, target: _Document) -> None:
        self.source = source
        self.target = target

    def move(self, old: KeyPath, new: KeyPath) -> None:
        """Copy the positions (and failures) at and under ``old`` to ``new``."""
        entry = _entry(self.source.lines, old)
        if entry is None:  # inside a collection written on one line, which keeps no positions
            entry = self.source.where(old)[1]
        parent = _inner(self.target.lines, new[:-1])
        if entry is not None and parent is not None:
            if len(new) == 1 and isinstance(entry, tuple):
                # A whole section: later files add their entries to the merge's copy, not to
                # this file's positions.
                entry = (entry[0], dict(entry[1]))
            parent[new[-1]] = entry
        self.target.origin[new] = self.source.file
        n = len(old)
        for path in self.source.failed:
            if path[:n] == old:
                self.target.failed.add(new + path[n:])


def _entry(positions: Positions, path: KeyPath) -> int | tuple[int, Positions] | None:
    """What ``positions`` holds for ``path``: its line, with the positions inside it if any."""
    entry: int | tuple[int, Positions] | None = None
    inner: Positions | None = positions
    for part in path:
        entry = None if inner is None else inner.get(part)
        if entry is None:
            return None
        inner = None if isinstance(entry, int) else entry[1]
    return entry


def _inner(positions: Positions, path: KeyPath) -> Positions | None:
    """The positions inside ``path`` (``positions`` itself for ``()``), None if it has none."""
    for part in path:
        entry = positions.get(part)
        if entry is None:
            return None
        if isinstance(entry, int):  # a collection written on one line: it gets positions now
            positions[part] = entry = (entry, {})
        positions = entry[1]
    return positions


# Entries freed at a time by ``release``: a few hundred take well under a millisecond.
_RELEASE_STEP = 256


def _drain(value: object) -> None:
    """Empty a large list or dict a step at a time (see ``_Session.release``)."""
    if isinstance(value, list):
        while value:
            del value[-_RELEASE_STEP:]
    elif isinstance(value, dict):
        while value:
            value.popitem()


def _at(where: Where) -> str:
    return where[0] if where[1] is None else f"{where[0]}:{where[1]}"


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
