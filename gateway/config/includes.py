"""One reading of a config: the main file and, depth first, what it includes, parsed, merged
and validated into one config or every problem found.

An include is a path relative to the including file. It must resolve, symlinks followed, inside
the main file's directory (or the directory a symlinked main file really is in: a Kubernetes
ConfigMap mounts files as symlinks into a ``..data`` directory beside them), unless the main file
says ``include_outside: true``; cycles and files included twice are refused. The files together
are bounded in size (``files.MAX_TOTAL_BYTES``), and every file named is stamped, readable or
not, so that the reloader watches it.

Problems are gathered rather than raised, then sorted by file and line, with any text taken from
the environment replaced by its ``${NAME}`` (``environment`` says which values those are).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.config.checks import KeyPath, format_path
from gateway.config.errors import ConfigError, ConfigIssue
from gateway.config.files import MAX_TOTAL_BYTES, FileStamp, read_config_file
from gateway.config.merge import Document, at, merge_documents
from gateway.config.model import GatewayConfig
from gateway.config.validation import validate
from gateway.config.yamldoc import parse_yaml

__all__ = ["INCLUDE_OUTSIDE", "LoadSession", "include_roots"]

# The main file's switch that lets includes leave its directory. It is the loader's, not a
# section of the config: it decides which files are read before there is a config to validate.
INCLUDE_OUTSIDE = "include_outside"
_NO_ROUTES = (
    "no routes: every request would get 404. A file caught between an editor's truncate and its "
    "write reads as empty, so a config without routes is refused; write 'routes: []' to serve "
    "none on purpose"
)


def include_roots(main: str) -> tuple[str, ...]:
    """The directories includes may resolve into: the main file's, and the one it is really in
    when it is a symlink (a ConfigMap's ``gateway.yaml -> ..data/gateway.yaml``)."""
    named = os.path.realpath(os.path.dirname(os.path.abspath(main)))
    real = os.path.dirname(os.path.realpath(main))
    return (named,) if real == named else (named, real)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@dataclass
class LoadSession:
    """The files read so far, what they hold, and every problem found in them.

    ``read`` a file, ``add`` its bytes (which follows its includes), then ``finish``; ``roots``
    are the directories includes may resolve into (``include_roots``), and ``require_routes``
    refuses a config that declares no ``routes`` (the loader says why).
    """

    env: Mapping[str, str]
    roots: tuple[str, ...]
    require_routes: bool = False
    issues: list[ConfigIssue] = field(default_factory=list)
    documents: list[Document] = field(default_factory=list)
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
        document = Document(file, parsed.data, parsed.lines, parsed.failed)
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
                    self.included_at[real] = at(document.where(("include", index)))
                    self.add(content, child, (*chain, (real, child)))
                    continue
                problem = f"cannot read {child!r}: {content}"
            self.complete = False
            self.report(document, ("include", index), problem)

    def _include_outside(self, document: Document, *, main: bool) -> None:
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

    def report(self, document: Document, path: KeyPath, message: str) -> None:
        file, line = document.where(path)
        self.issues.append(ConfigIssue(file, line, format_path(path), message))

    def finish(self) -> tuple[GatewayConfig | None, ConfigError | None]:
        """Merge and validate what was read: the config, or the error holding every issue."""
        config = None
        if self.documents:
            merged = merge_documents(self.documents, self.report)
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

    def _validate(self, merged: Document) -> GatewayConfig | None:
        """Every problem of the merged values reported, unless a parse error already covers its
        path; the config if there are none."""
        problems, config = validate(
            merged.data, lambda path: at(merged.where(path)), cross_check=self.complete
        )
        for path, message in problems:
            if not any(path[:n] in merged.failed for n in range(len(path) + 1)):
                self.report(merged, path, message)
        return config

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


def _includes(document: Document, session: LoadSession) -> list[tuple[int, str]]:
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


# Entries freed at a time by ``release``: a few hundred take well under a millisecond.
_RELEASE_STEP = 256


def _drain(value: object) -> None:
    """Empty a large list or dict a step at a time (see ``LoadSession.release``)."""
    if isinstance(value, list):
        while value:
            del value[-_RELEASE_STEP:]
    elif isinstance(value, dict):
        while value:
            value.popitem()
