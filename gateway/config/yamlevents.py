"""libyaml's event stream as the document builder reads it, with aliases expanded in place.

An alias is replayed from the recorded events of its anchor, so the builder never sees one (and
merge keys, ``<<: *defaults``, arrive as the mapping they name). The replay is bounded: a document
whose aliases would expand to more than ``MAX_ALIAS_NODES`` nodes is refused at the line where
the budget ran out, before it costs time or memory.

Also the vocabulary the builder shares with the replay: the event classes, an ``Event``, and
``Refused``, the problem that stops a whole file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeAlias

import yaml

__all__ = [
    "MAX_ALIAS_NODES",
    "AliasEvent",
    "Event",
    "MappingEnd",
    "MappingStart",
    "Recursive",
    "Refused",
    "Scalar",
    "SequenceEnd",
    "SequenceStart",
    "expand_aliases",
    "no_anchor",
]

# A "billion laughs" document (CVE-2019-11253 hit the Kubernetes API server the same way) expands
# nine levels of ten aliases into 10^9 nodes from under 1 KB of text. Anchors in a config share a
# few defaults, so 100,000 nodes produced by aliases is far beyond legitimate use yet costs only
# a fraction of a second to reach.
MAX_ALIAS_NODES = 100_000

# The event classes, compared by identity here and in the builder's loops: cheaper than
# isinstance, and libyaml creates exactly these classes.
Scalar = yaml.ScalarEvent
MappingStart = yaml.MappingStartEvent
SequenceStart = yaml.SequenceStartEvent
MappingEnd = yaml.MappingEndEvent
SequenceEnd = yaml.SequenceEndEvent
AliasEvent = yaml.AliasEvent

# PyYAML's events, or a ``Recursive``. Typed loosely: the stubs make every mark optional, while
# libyaml always sets them, and the builder's loops run once per event of a file that may hold
# half a million.
Event: TypeAlias = Any


class Refused(Exception):
    """A problem that stops the whole file: a limit or a YAML error."""

    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class Recursive:
    """Stands in for an alias to an anchor whose node is still open (it would contain itself)."""

    __slots__ = ("start_mark",)

    def __init__(self, line: int) -> None:
        self.start_mark = yaml.Mark("", 0, line - 1, 0, None, 0)


def no_anchor(event: Event) -> Refused:
    return Refused(
        event.start_mark.line + 1, f"YAML: alias *{event.anchor} refers to no anchor before it"
    )


def expand_aliases(get_event: Callable[[], Event]) -> Iterator[Event]:
    """libyaml's events with aliases expanded in place (at most ``MAX_ALIAS_NODES`` nodes).

    Only for a document with anchors. An alias is replayed from the recorded events of its
    anchor, so the values it produces carry the anchor's lines. An alias to an anchor whose node
    is still open yields one ``Recursive`` instead. Events are recorded only while an anchor is
    open.
    """
    # name -> start and end in ``recorded``, line, nodes (events less collection ends)
    anchors: dict[str, tuple[int, int, int, int]] = {}
    opened: list[tuple[str, int, int, int]] = []  # name, depth, start, line
    recorded: list[Event] = []  # the events of anchored nodes, aliases already expanded
    # Anchors too large ever to be replayed (an alias to one would expand past the budget by
    # itself): their events are not kept, so one anchor on a large list cannot hold every
    # event of the file in memory (~200 times the file's size).
    oversized: dict[str, int] = {}  # name -> line
    depth = 0
    expanded = 0
    while True:
        if opened and len(recorded) - opened[0][2] > MAX_ALIAS_NODES:
            cut = opened[0][2]
            for name, _, _, line in opened:
                oversized[name] = line
            for name, (start, _, line, _) in list(anchors.items()):
                if start >= cut:
                    del anchors[name]
                    oversized[name] = line
            opened.clear()
            del recorded[cut:]
        event = get_event()
        kind = type(event)
        if kind is Scalar or kind is MappingStart or kind is SequenceStart:
            if kind is not Scalar:
                depth += 1
            anchor = event.anchor
            if anchor is not None:
                line = event.start_mark.line + 1
                if anchor in anchors or any(anchor == o[0] for o in opened):
                    first = anchors[anchor][2] if anchor in anchors else line
                    raise Refused(
                        line, f"YAML: anchor &{anchor} is already defined at line {first}"
                    )
                if kind is Scalar:
                    anchors[anchor] = (len(recorded), len(recorded) + 1, line, 1)
                else:
                    opened.append((anchor, depth, len(recorded), line))
                recorded.append(event)
            elif opened:
                recorded.append(event)
            yield event
        elif kind is MappingEnd or kind is SequenceEnd:
            depth -= 1
            if opened:
                recorded.append(event)
                while opened and opened[-1][1] > depth:
                    name, _, start, first = opened.pop()
                    nodes = sum(
                        1
                        for e in recorded[start:]
                        if type(e) is not MappingEnd and type(e) is not SequenceEnd
                    )
                    anchors[name] = (start, len(recorded), first, nodes)
            yield event
        elif kind is AliasEvent:
            name = event.anchor
            replay: list[Event]
            if name in anchors:
                start, end, _, nodes = anchors[name]
                expanded += nodes
                if expanded > MAX_ALIAS_NODES:
                    raise Refused(
                        event.start_mark.line + 1,
                        f"YAML: aliases expand to more than {MAX_ALIAS_NODES:,} nodes (at "
                        f"*{name}); a document this repetitive is refused as an alias bomb",
                    )
                replay = recorded[start:end]
            elif name in oversized:
                raise Refused(
                    event.start_mark.line + 1,
                    f"YAML: aliases expand to more than {MAX_ALIAS_NODES:,} nodes (*{name} "
                    f"names the anchor at line {oversized[name]}, larger than that by itself)",
                )
            elif any(name == o[0] for o in opened):
                first = next(o[3] for o in opened if o[0] == name)
                replay = [Recursive(first)]
            else:
                raise no_anchor(event)
            if opened:
                recorded.extend(replay)
            yield from replay
        else:  # stream and document events, the builder's business
            yield event
