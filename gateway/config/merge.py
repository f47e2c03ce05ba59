"""Several parsed files -> one document, with every value's file and line following it.

``routes`` and ``keys`` are concatenated (main file first, then includes depth first, in
order), ``upstreams`` and ``models`` are merged by name, every other section is set by one file
only. Positions follow the merge, so ``routes[5].path`` still points into its own file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.config.checks import KeyPath
from gateway.config.validation import LISTS, TABLES
from gateway.config.yamldoc import Positions

__all__ = ["Document", "Where", "at", "merge_documents"]

Where = tuple[str, int | None]
# How the merge reports a conflict: the document it is in, its key path, the message.
Report = Callable[["Document", KeyPath, str], None]


@dataclass
class Document:
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


def merge_documents(documents: list[Document], report: Report) -> Document:
    """One document holding every file's sections, with positions moved along with the values."""
    main = documents[0]
    # The main file's positions are the merge's (the main file is not reported on afterwards):
    # copying them would cost as much as a large file has keys.
    merged = Document(main.file, {}, main.lines, set(main.failed))
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
            elif key in LISTS and isinstance(value, list) and isinstance(data[key], list):
                items = data[key]
                assert isinstance(items, list)
                for i, item in enumerate(value):
                    moves.move((key, i), (key, len(items)))
                    items.append(item)
            elif key in TABLES and isinstance(value, dict) and isinstance(data[key], dict):
                table = data[key]
                assert isinstance(table, dict)
                for name, item in value.items():
                    if name in table:
                        other = merged.where((key, name))
                        message = f"{TABLES[key]} {name!r} is already defined at {at(other)}"
                        report(document, (key, name), message)
                    else:
                        table[name] = item
                        moves.move((key, name), (key, name))
            else:
                kind = "list" if key in LISTS else "mapping" if key in TABLES else ""
                message = (
                    f"must be a {kind} in every file to be merged (first set at {at(first)})"
                    if kind
                    else f"already set at {at(first)}; set it in one file only"
                )
                report(document, (key,), message)
    return merged


class _Moves:
    """Copies an included document's positions (and failures) into the merge, entry by entry.

    Positions are a tree, so moving one of 10,000 keys takes its subtree as it is.
    """

    def __init__(self, source: Document, target: Document) -> None:
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


def at(where: Where) -> str:
    """``file:line`` as messages cite a place, or ``file`` when the line is not known."""
    return where[0] if where[1] is None else f"{where[0]}:{where[1]}"
