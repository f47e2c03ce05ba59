"""One YAML file -> plain values, the line of every mapping key and sequence item, and problems.

libyaml (PyYAML's C parser) produces the events; this module builds values from them in one pass,
with PyYAML's safe scalars, rejecting duplicate keys (PyYAML would keep the last silently) and
expanding ``${NAME}`` / ``${NAME:-default}`` in string values (``$${`` is a literal ``${``;
mapping keys are never expanded). Building from events rather than from PyYAML's node tree is
what makes a large config fast: the pure-Python scanner and composer cost seconds for a few MB,
and the C composer, which makes a node object per value and asks the pure-Python resolver about
each scalar, takes longer than reading the events alone (and recurses in C, where a deep
document would overflow the stack). Turning libyaml's events into Python objects is about half
of loading a large config.

A config is written by people but may come from anywhere, so parsing is bounded: nesting deeper
than ``MAX_DEPTH`` and aliases expanding to more than ``MAX_ALIAS_NODES`` nodes are refused with
the line where the limit was reached, before they cost time or memory.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import yaml

from gateway.config.checks import KeyPath

__all__ = ["MAX_ALIAS_NODES", "MAX_DEPTH", "Parsed", "Positions", "parse_yaml"]

# Real configs nest about 6 deep (routes[0].aliases[0].path); 64 leaves room for any hand-written
# structure while keeping the builder's recursion far from Python's stack limit (a 100,000-deep
# document used to raise RecursionError inside PyYAML's composer).
MAX_DEPTH = 64
# A "billion laughs" document (CVE-2019-11253 hit the Kubernetes API server the same way) expands
# nine levels of ten aliases into 10^9 nodes from under 1 KB of text. Anchors in a config share a
# few defaults, so 100,000 nodes produced by aliases is far beyond legitimate use yet costs only
# a fraction of a second to reach.
MAX_ALIAS_NODES = 100_000
# The longest plain scalar read as a number.
MAX_NUMBER_CHARS = 64
_NUMBER_TAGS = frozenset({"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"})

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_REFERENCE = re.compile(r"\$\$\{|\$\{(?:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})?")
# Environment values at least this long never appear in a message; shorter ones would make
# unrelated words disappear. Upstream credentials, headers and query are redacted from 3.
_REDACT_FROM = 8
_REDACT_SECRETS_FROM = 3
_SECRET_SECTIONS = (("auth",), ("headers",), ("query",))

# The event classes, compared by identity in the loops below: cheaper than isinstance, and
# libyaml creates exactly these classes.
_Scalar = yaml.ScalarEvent
_MappingStart = yaml.MappingStartEvent
_SequenceStart = yaml.SequenceStartEvent
_MappingEnd = yaml.MappingEndEvent
_SequenceEnd = yaml.SequenceEndEvent
_Alias = yaml.AliasEvent

# Where the keys of one mapping, or the items of one sequence, were written: key or index -> its
# line, or (its line, the positions inside it) for a mapping or sequence that has any. A key or
# item left out is on the line of the entry that holds it: a collection written on one line
# records nothing. A tree beside the values rather than one table keyed by whole key paths: a
# key path is only built when something is reported, and a large config has a quarter of a
# million keys and items.
Positions: TypeAlias = "dict[str | int, int | tuple[int, Positions]]"
# PyYAML's events, or a ``_Recursive``. Typed loosely: the stubs make every mark optional, while
# libyaml always sets them, and the loops below run once per event of a file that may hold half
# a million.
_Event: TypeAlias = Any

Problem = tuple[int | None, KeyPath, str]  # line, key path, message


@dataclass
class Parsed:
    """One file's values and where each key path was written."""

    data: dict[str, object] | None  # None: the file could not be parsed at all
    lines: Positions  # of the top-level mapping's keys, and under them
    failed: set[KeyPath]  # paths whose value is already reported (pydantic would repeat it)
    problems: list[Problem]
    secrets: dict[str, str] = field(default_factory=dict)  # environment value -> its name


class _Refused(Exception):
    """A problem that stops the whole file: a limit or a YAML error."""

    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _Recursive:
    """Stands in for an alias to an anchor whose node is still open (it would contain itself)."""

    __slots__ = ("start_mark",)

    def __init__(self, line: int) -> None:
        self.start_mark = yaml.Mark("", 0, line - 1, 0, None, 0)


def parse_yaml(text: str, env: Mapping[str, str]) -> Parsed:
    """Parse one file's ``text``; every problem found is in ``problems``."""
    builder = _Builder(env)
    try:
        builder.parse(text)
    except _Refused as refused:
        builder.parsed.data = None
        builder.parsed.problems.append((refused.line, (), refused.message))
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = None if mark is None else mark.line + 1
        problem = error.problem or "syntax error"
        if error.context:  # PyYAML's context reads before a problem starting "but ..."
            but = problem.startswith("but ")
            problem = f"{error.context} {problem}" if but else f"{problem} ({error.context})"
        builder.parsed.data = None
        builder.parsed.problems.append((line, (), f"YAML: {problem}"))
    except yaml.reader.ReaderError as error:  # control characters
        # libyaml counts the position in UTF-8 bytes, PyYAML's reader in characters.
        native = getattr(yaml, "CSafeLoader", None) is not None
        before = text.encode()[: error.position] if native else text[: error.position].encode()
        line = before.count(b"\n") + 1
        reason = str(error.reason)
        character = error.character
        code = character if isinstance(character, int) else ord(character[:1] or "\0")
        reason = f"character #x{code:04x}: {reason}"
        builder.parsed.data = None
        builder.parsed.problems.append((line, (), f"YAML: {reason}"))
    except yaml.YAMLError as error:
        builder.parsed.data = None
        builder.parsed.problems.append((None, (), f"YAML: {error}"))
    return builder.parsed


def _unbalanced() -> _Refused:
    # libyaml balances its events or raises; this only guards the loops against running on.
    return _Refused(None, "YAML: unbalanced collection")


def _too_deep(event: _Event) -> _Refused:
    return _Refused(
        event.start_mark.line + 1,
        f"nesting deeper than {MAX_DEPTH} levels; a config needs far fewer",
    )


def _no_anchor(event: _Event) -> _Refused:
    return _Refused(
        event.start_mark.line + 1, f"YAML: alias *{event.anchor} refers to no anchor before it"
    )


def _expanded(get_event: Callable[[], _Event]) -> Iterator[_Event]:
    """libyaml's events with aliases expanded in place (at most ``MAX_ALIAS_NODES`` nodes).

    Only for a document with anchors. An alias is replayed from the recorded events of its
    anchor, so the values it produces carry the anchor's lines. An alias to an anchor whose node
    is still open yields one ``_Recursive`` instead. Events are recorded only while an anchor is
    open.
    """
    # name -> start and end in ``recorded``, line, nodes (events less collection ends)
    anchors: dict[str, tuple[int, int, int, int]] = {}
    opened: list[tuple[str, int, int, int]] = []  # name, depth, start, line
    recorded: list[_Event] = []  # the events of anchored nodes, aliases already expanded
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
        if kind is _Scalar or kind is _MappingStart or kind is _SequenceStart:
            if kind is not _Scalar:
                depth += 1
            anchor = event.anchor
            if anchor is not None:
                line = event.start_mark.line + 1
                if anchor in anchors or any(anchor == o[0] for o in opened):
                    first = anchors[anchor][2] if anchor in anchors else line
                    raise _Refused(
                        line, f"YAML: anchor &{anchor} is already defined at line {first}"
                    )
                if kind is _Scalar:
                    anchors[anchor] = (len(recorded), len(recorded) + 1, line, 1)
                else:
                    opened.append((anchor, depth, len(recorded), line))
                recorded.append(event)
            elif opened:
                recorded.append(event)
            yield event
        elif kind is _MappingEnd or kind is _SequenceEnd:
            depth -= 1
            if opened:
                recorded.append(event)
                while opened and opened[-1][1] > depth:
                    name, _, start, first = opened.pop()
                    nodes = sum(
                        1
                        for e in recorded[start:]
                        if type(e) is not _MappingEnd and type(e) is not _SequenceEnd
                    )
                    anchors[name] = (start, len(recorded), first, nodes)
            yield event
        elif kind is _Alias:
            name = event.anchor
            replay: list[_Event]
            if name in anchors:
                start, end, _, nodes = anchors[name]
                expanded += nodes
                if expanded > MAX_ALIAS_NODES:
                    raise _Refused(
                        event.start_mark.line + 1,
                        f"YAML: aliases expand to more than {MAX_ALIAS_NODES:,} nodes (at "
                        f"*{name}); a document this repetitive is refused as an alias bomb",
                    )
                replay = recorded[start:end]
            elif name in oversized:
                raise _Refused(
                    event.start_mark.line + 1,
                    f"YAML: aliases expand to more than {MAX_ALIAS_NODES:,} nodes (*{name} "
                    f"names the anchor at line {oversized[name]}, larger than that by itself)",
                )
            elif any(name == o[0] for o in opened):
                first = next(o[3] for o in opened if o[0] == name)
                replay = [_Recursive(first)]
            else:
                raise _no_anchor(event)
            if opened:
                recorded.extend(replay)
            yield from replay
        else:  # stream and document events, the builder's business
            yield event


class _Builder:
    """Builds plain values from the events, recording positions and problems.

    ``mapping`` and ``sequence`` see every event of the file; a string written as such, the
    common value, is taken there without a call, and a key path is built only for a value that
    needs one (a nested collection, a problem, a ``${NAME}``). Positions are recorded only where
    they tell more than the enclosing entry's line: a collection written on that line (a flow
    ``[a, b]`` or ``{k: v}``, most of a large config's collections) records none, and ``where``
    falls back to the line of the key that holds it, which is the line of all its contents.

    Recursion follows the nesting, which ``MAX_DEPTH`` bounds; ``skip``, which passes over a
    value that is reported and dropped, is iterative (and bounded the same way).
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.parsed = Parsed({}, {}, set(), [])
        self.next_event: Callable[[], _Event] = lambda: None
        # The positions inside the collection just built, None when all of it is on its line:
        # a second result of ``mapping`` and ``sequence`` that costs no tuple per collection.
        self.inner: Positions | None = None
        self.resolvers = yaml.resolver.Resolver.yaml_implicit_resolvers
        self.resolvable = frozenset(self.resolvers)  # first characters that may not be a string
        self.constructor = yaml.constructor.SafeConstructor()
        self.constructed: dict[tuple[str, str], object] = {}
        self.plain: dict[str, object] = {}  # plain scalar without ${NAME} -> its value
        # One string per distinct key: the 10,000 "name" keys of a large config are one, and
        # the other copies go with their events instead of living until the end. (Not
        # sys.intern: on Python 3.12 it makes a string immortal, and keys are the config's.)
        self.keys: dict[str, str] = {}

    def parse(self, text: str) -> None:
        # libyaml's parser keeps its own stacks, so even a deep document cannot overflow it;
        # PyYAML's pure-Python parser (without libyaml) is iterative too, only slower.
        parser = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
        try:
            # Without an '&' there is no anchor, so nothing to record or replay: the builder
            # takes libyaml's events directly. (An '&' in a string only costs the replayer.)
            get_event = parser.get_event
            self.next_event = get_event if "&" not in text else _expanded(get_event).__next__
            self.document()
        finally:
            parser.dispose()

    def document(self) -> None:
        next_event = self.next_event
        documents = 0
        root: _Event = None
        data: object = None
        while True:
            event = next_event()
            kind = type(event)
            if kind is yaml.StreamEndEvent:
                break
            if kind is yaml.DocumentStartEvent:
                documents += 1
                if documents > 1:
                    raise _Refused(
                        event.start_mark.line + 1,
                        "YAML: expected a single document in the stream but found another document",
                    )
            elif kind is yaml.StreamStartEvent or kind is yaml.DocumentEndEvent:
                continue
            elif root is not None:
                raise _unbalanced()
            else:
                root = event
                # Line 0: the top level is on no line, so every key's line is recorded.
                if kind is _MappingStart:
                    data = self.mapping(event, (), 0, 1)
                    self.parsed.lines = self.inner or {}
                elif kind is _SequenceStart:
                    data = self.sequence(event, (), 0, 1)
                else:
                    data = self.node(event, ())
        if root is None:  # no document, or only comments: an empty config
            return
        if not isinstance(data, dict):
            self.fail(root.start_mark.line + 1, (), "the top level must be a mapping of sections")
            self.parsed.data = None
            return
        self.parsed.data = data

    def fail(self, line: int, path: KeyPath, message: str, *, dropped: bool = True) -> None:
        """Report a problem at ``line``; ``dropped``: the value is lost, so pydantic's complaints
        about the path would only repeat this one."""
        self.parsed.problems.append((line, path, message))
        if dropped:
            self.parsed.failed.add(path)

    def node(self, event: _Event, path: KeyPath) -> object:
        """The value of anything but a mapping or sequence."""
        kind = type(event)
        if kind is _Scalar:
            return self.scalar(event, path)
        if kind is _Recursive:
            self.fail(event.start_mark.line + 1, path, "an alias refers to a node that contains it")
            return None
        if kind is _Alias:  # only without anchors; with them, the replayer expands aliases
            raise _no_anchor(event)
        raise _unbalanced()

    def refused(self, event: _Event, path: KeyPath, depth: int) -> bool:
        """Whether the collection ``event`` starts, at ``depth``, is not to be built: a tag other
        than its own is reported and the collection skipped; too deep refuses the file."""
        tag = event.tag
        if (
            tag is not None
            and tag != "!"
            and tag != (_MAP_TAG if type(event) is _MappingStart else _SEQ_TAG)
        ):
            self.fail(event.start_mark.line + 1, path, f"unsupported tag {tag!r}")
            self.skip(event, depth)
            self.inner = None
            return True
        if depth > MAX_DEPTH:
            raise _too_deep(event)
        return False

    def skip(self, event: _Event, depth: int) -> None:
        """Consume the rest of the collection ``event`` opened at nesting ``depth``.

        Iteratively, and still refused beyond ``MAX_DEPTH``: libyaml's scanner slows down with
        the depth of flow collections, quadratically, so passing over a value 100,000 deep took
        20 seconds, and a file within the size limit can be twenty times as deep.
        """
        kind = type(event)
        if kind is not _MappingStart and kind is not _SequenceStart:
            if kind is _Alias:
                raise _no_anchor(event)
            if kind is _Scalar or kind is _Recursive:
                return
            raise _unbalanced()
        if depth > MAX_DEPTH:
            raise _too_deep(event)
        next_event = self.next_event
        open_ = 1
        while open_:
            following = next_event()
            kind = type(following)
            if kind is _MappingStart or kind is _SequenceStart:
                open_ += 1
                if depth + open_ - 1 > MAX_DEPTH:
                    raise _too_deep(following)
            elif kind is _MappingEnd or kind is _SequenceEnd:
                open_ -= 1
            elif kind is _Alias:
                raise _no_anchor(following)
            elif kind is not _Scalar and kind is not _Recursive:
                raise _unbalanced()

    def sequence(self, start: _Event, path: KeyPath, line: int, depth: int) -> list[object] | None:
        """The sequence ``start`` opens at nesting ``depth``, its entry written at ``line``; its
        positions are left in ``self.inner``."""
        if (start.tag is not None or depth > MAX_DEPTH) and self.refused(start, path, depth):
            return None
        items: list[object] = []
        positions: Positions | None = None  # until an item is off ``line``
        next_event = self.next_event
        resolvable = self.resolvable
        plain = self.plain
        scalar_event, end_event = _Scalar, _SequenceEnd  # locals: the loop runs per event
        while True:
            event = next_event()
            kind = type(event)
            index = len(items)
            if kind is scalar_event:
                value = event.value
                if event.tag is not None or "$" in value:
                    items.append(self.scalar(event, (*path, index)))
                elif not event.implicit[0] or value[:1] not in resolvable:
                    items.append(value)  # a string as written, the common case
                else:  # plain, and may be a number, a boolean, a date...
                    known = plain.get(value, plain)
                    items.append(self.scalar(event, (*path, index)) if known is plain else known)
                at = event.start_mark.line + 1
            elif kind is end_event:
                break
            elif kind is _MappingStart or kind is _SequenceStart:
                at = event.start_mark.line + 1
                items.append(
                    self.mapping(event, (*path, index), at, depth + 1)
                    if kind is _MappingStart
                    else self.sequence(event, (*path, index), at, depth + 1)
                )
                if self.inner is not None:
                    if positions is None:
                        positions = dict.fromkeys(range(index), line)
                    positions[index] = (at, self.inner)
                    continue
            else:  # an alias or a _Recursive; node() refuses anything else before its mark is read
                items.append(self.node(event, (*path, index)))
                at = event.start_mark.line + 1
            if positions is not None:
                positions[index] = at
            elif at != line:
                positions = dict.fromkeys(range(index), line)
                positions[index] = at
        self.inner = positions
        return items

    def mapping(
        self, start: _Event, path: KeyPath, line: int, depth: int
    ) -> dict[str, object] | None:
        """The mapping ``start`` opens at nesting ``depth``, its entry written at ``line``; its
        positions are left in ``self.inner``."""
        if (start.tag is not None or depth > MAX_DEPTH) and self.refused(start, path, depth):
            return None
        result: dict[str, object] = {}
        positions: Positions | None = None  # until a key is off ``line``
        merges: list[tuple[dict[str, object], Positions]] | None = None  # rare: made when needed
        next_event = self.next_event
        resolvable = self.resolvable
        plain = self.plain
        known_key = self.keys.setdefault
        scalar_event = _Scalar  # a local: the loop runs per event
        while True:
            key_event = next_event()
            kind = type(key_event)
            if kind is not scalar_event:
                if kind is _MappingEnd:
                    break
                self.odd_key(key_event, path, depth)
                continue
            at = key_event.start_mark.line + 1
            # Keys are names: their text, never true/1/null or ${...}.
            key = known_key(key_event.value, key_event.value)
            event = next_event()
            tag = key_event.tag
            if (tag is not None or key == "<<") and (
                tag == _MERGE_TAG or (tag is None and key_event.implicit[0])
            ):
                sources = self.merge_sources(event, path, depth)
                merges = sources if merges is None else merges + sources
                continue
            if key in result:  # merged keys are added after the loop: these are its own
                first = line if positions is None else positions[key]
                first_line = first if isinstance(first, int) else first[0]
                message = f"duplicate key (lines {first_line} and {at})"
                self.fail(at, (*path, key), message, dropped=False)
                self.skip(event, depth + 1)
                continue
            kind = type(event)
            if kind is scalar_event:
                value = event.value
                if event.tag is not None or "$" in value:
                    result[key] = self.scalar(event, (*path, key))
                elif not event.implicit[0] or value[:1] not in resolvable:
                    result[key] = value  # a string as written, the common case
                else:  # plain, and may be a number, a boolean, a date...
                    known = plain.get(value, plain)
                    result[key] = self.scalar(event, (*path, key)) if known is plain else known
            elif kind is _MappingStart or kind is _SequenceStart:
                result[key] = (
                    self.mapping(event, (*path, key), at, depth + 1)
                    if kind is _MappingStart
                    else self.sequence(event, (*path, key), at, depth + 1)
                )
                if self.inner is not None:
                    if positions is None:
                        positions = dict.fromkeys(result, line)
                    positions[key] = (at, self.inner)
                    continue
            else:
                result[key] = self.node(event, (*path, key))
            if positions is not None:
                positions[key] = at
            elif at != line:
                positions = dict.fromkeys(result, line)
                positions[key] = at
        if merges:  # YAML's "<<: *defaults"; the mapping's own keys win
            if positions is None:
                positions = dict.fromkeys(result, line)
            for source, where in merges:
                for key, merged in source.items():
                    if key not in result:
                        result[key] = merged
                        positions[key] = where[key]
        self.inner = positions
        return result

    def odd_key(self, event: _Event, path: KeyPath, depth: int) -> None:
        """A key of the mapping at ``depth`` that is not a scalar: reported, and skipped with
        its value."""
        kind = type(event)
        if kind is _Alias:
            raise _no_anchor(event)
        if kind is not _MappingStart and kind is not _SequenceStart and kind is not _Recursive:
            raise _unbalanced()
        self.skip(event, depth + 1)  # the whole key first: its value follows it
        value = self.next_event()
        self.fail(
            event.start_mark.line + 1, path, "a mapping key must be a plain name", dropped=False
        )
        self.skip(value, depth + 1)

    def merge_sources(
        self, event: _Event, path: KeyPath, depth: int
    ) -> list[tuple[dict[str, object], Positions]]:
        """The mappings a ``<<`` key of a mapping at ``depth`` merges, each with the positions
        of its keys."""
        kind = type(event)
        if kind is _SequenceStart:
            sources = []
            while True:
                item = self.next_event()
                kind = type(item)
                if kind is _SequenceEnd:
                    break
                if kind is _MappingStart:
                    sources.extend(self.merge_sources(item, path, depth + 1))
                    continue
                if kind is _Alias:
                    raise _no_anchor(item)
                if kind is not _Scalar and kind is not _SequenceStart and kind is not _Recursive:
                    raise _unbalanced()
                message = "'<<' needs a mapping or a list of mappings"
                self.fail(item.start_mark.line + 1, path, message, dropped=False)
                self.skip(item, depth + 2)
            return sources
        if kind is not _MappingStart:
            if kind is _Alias:
                raise _no_anchor(event)
            if kind is not _Scalar and kind is not _Recursive:
                raise _unbalanced()
            message = "'<<' needs a mapping or a list of mappings"
            self.fail(event.start_mark.line + 1, path, message, dropped=False)
            self.skip(event, depth + 1)
            return []
        line = event.start_mark.line + 1
        merged = self.mapping(event, path, line, depth + 1)
        if merged is None:
            return []
        # Every key the mapping keeps no position for is on its first line.
        return [(merged, dict.fromkeys(merged, line) if self.inner is None else self.inner)]

    def scalar(self, event: _Event, path: KeyPath) -> object:
        value: str = event.value
        tag: str | None = event.tag
        # A plain scalar without a tag or ${NAME} is the same value wherever it is written:
        # ``mapping`` and ``sequence`` look it up in ``self.plain`` before calling here.
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
        problems: list[str] = []
        secrets = self.parsed.secrets

        def substitute(match: re.Match[str]) -> str:
            name, default = match.groups()
            if match.group() == "$${":
                return "${"
            if name is None:
                problems.append(
                    "a '${' must start ${NAME} or ${NAME:-default}; write $${ for a literal '${'"
                )
                return ""
            value = self.env.get(name)
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
        for problem in dict.fromkeys(problems):
            self.fail(line, path, problem)
        return expanded
