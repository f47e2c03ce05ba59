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
the line where the limit was reached, before they cost time or memory. Aliases are expanded in
the event stream before the builder sees it (``yamlevents``); scalars are read by
``yamlscalars``, ``${NAME}`` references by ``environment``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

import yaml

from gateway.config.checks import KeyPath
from gateway.config.yamlevents import (
    AliasEvent,
    Event,
    MappingEnd,
    MappingStart,
    Recursive,
    Refused,
    Scalar,
    SequenceEnd,
    SequenceStart,
    expand_aliases,
    no_anchor,
)
from gateway.config.yamlscalars import Scalars

__all__ = ["MAX_DEPTH", "Parsed", "Positions", "parse_yaml"]

# Real configs nest about 6 deep (routes[0].aliases[0].path); 64 leaves room for any hand-written
# structure while keeping the builder's recursion far from Python's stack limit (a 100,000-deep
# document used to raise RecursionError inside PyYAML's composer).
MAX_DEPTH = 64

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# Where the keys of one mapping, or the items of one sequence, were written: key or index -> its
# line, or (its line, the positions inside it) for a mapping or sequence that has any. A key or
# item left out is on the line of the entry that holds it: a collection written on one line
# records nothing. A tree beside the values rather than one table keyed by whole key paths: a
# key path is only built when something is reported, and a large config has a quarter of a
# million keys and items.
Positions: TypeAlias = "dict[str | int, int | tuple[int, Positions]]"
Problem = tuple[int | None, KeyPath, str]  # line, key path, message


@dataclass
class Parsed:
    """One file's values and where each key path was written."""

    data: dict[str, object] | None  # None: the file could not be parsed at all
    lines: Positions  # of the top-level mapping's keys, and under them
    failed: set[KeyPath]  # paths whose value is already reported (pydantic would repeat it)
    problems: list[Problem]
    secrets: dict[str, str] = field(default_factory=dict)  # environment value -> its name


def parse_yaml(text: str, env: Mapping[str, str]) -> Parsed:
    """Parse one file's ``text``; every problem found is in ``problems``."""
    builder = _Builder(env)
    try:
        builder.parse(text)
    except Refused as refused:
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


def _unbalanced() -> Refused:
    # libyaml balances its events or raises; this only guards the loops against running on.
    return Refused(None, "YAML: unbalanced collection")


def _too_deep(event: Event) -> Refused:
    return Refused(
        event.start_mark.line + 1,
        f"nesting deeper than {MAX_DEPTH} levels; a config needs far fewer",
    )


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
        self.parsed = Parsed({}, {}, set(), [])
        self.next_event: Callable[[], Event] = lambda: None
        # The positions inside the collection just built, None when all of it is on its line:
        # a second result of ``mapping`` and ``sequence`` that costs no tuple per collection.
        self.inner: Positions | None = None
        scalars = Scalars(env, self.parsed.secrets, self.fail)
        self.scalar = scalars.value
        self.resolvable = scalars.resolvable  # first characters that may not be a string
        self.plain = scalars.plain  # plain scalar without ${NAME} -> its value
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
            self.next_event = get_event if "&" not in text else expand_aliases(get_event).__next__
            self.document()
        finally:
            parser.dispose()

    def document(self) -> None:
        next_event = self.next_event
        documents = 0
        root: Event = None
        data: object = None
        while True:
            event = next_event()
            kind = type(event)
            if kind is yaml.StreamEndEvent:
                break
            if kind is yaml.DocumentStartEvent:
                documents += 1
                if documents > 1:
                    raise Refused(
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
                if kind is MappingStart:
                    data = self.mapping(event, (), 0, 1)
                    self.parsed.lines = self.inner or {}
                elif kind is SequenceStart:
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

    def node(self, event: Event, path: KeyPath) -> object:
        """The value of anything but a mapping or sequence."""
        kind = type(event)
        if kind is Scalar:
            return self.scalar(event, path)
        if kind is Recursive:
            self.fail(event.start_mark.line + 1, path, "an alias refers to a node that contains it")
            return None
        if kind is AliasEvent:  # only without anchors; with them, the replayer expands aliases
            raise no_anchor(event)
        raise _unbalanced()

    def refused(self, event: Event, path: KeyPath, depth: int) -> bool:
        """Whether the collection ``event`` starts, at ``depth``, is not to be built: a tag other
        than its own is reported and the collection skipped; too deep refuses the file."""
        tag = event.tag
        if (
            tag is not None
            and tag != "!"
            and tag != (_MAP_TAG if type(event) is MappingStart else _SEQ_TAG)
        ):
            self.fail(event.start_mark.line + 1, path, f"unsupported tag {tag!r}")
            self.skip(event, depth)
            self.inner = None
            return True
        if depth > MAX_DEPTH:
            raise _too_deep(event)
        return False

    def skip(self, event: Event, depth: int) -> None:
        """Consume the rest of the collection ``event`` opened at nesting ``depth``.

        Iteratively, and still refused beyond ``MAX_DEPTH``: libyaml's scanner slows down with
        the depth of flow collections, quadratically, so passing over a value 100,000 deep took
        20 seconds, and a file within the size limit can be twenty times as deep.
        """
        kind = type(event)
        if kind is not MappingStart and kind is not SequenceStart:
            if kind is AliasEvent:
                raise no_anchor(event)
            if kind is Scalar or kind is Recursive:
                return
            raise _unbalanced()
        if depth > MAX_DEPTH:
            raise _too_deep(event)
        next_event = self.next_event
        open_ = 1
        while open_:
            following = next_event()
            kind = type(following)
            if kind is MappingStart or kind is SequenceStart:
                open_ += 1
                if depth + open_ - 1 > MAX_DEPTH:
                    raise _too_deep(following)
            elif kind is MappingEnd or kind is SequenceEnd:
                open_ -= 1
            elif kind is AliasEvent:
                raise no_anchor(following)
            elif kind is not Scalar and kind is not Recursive:
                raise _unbalanced()

    def sequence(self, start: Event, path: KeyPath, line: int, depth: int) -> list[object] | None:
        """The sequence ``start`` opens at nesting ``depth``, its entry written at ``line``; its
        positions are left in ``self.inner``."""
        if (start.tag is not None or depth > MAX_DEPTH) and self.refused(start, path, depth):
            return None
        items: list[object] = []
        positions: Positions | None = None  # until an item is off ``line``
        next_event = self.next_event
        resolvable = self.resolvable
        plain = self.plain
        scalar_event, end_event = Scalar, SequenceEnd  # locals: the loop runs per event
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
            elif kind is MappingStart or kind is SequenceStart:
                at = event.start_mark.line + 1
                items.append(
                    self.mapping(event, (*path, index), at, depth + 1)
                    if kind is MappingStart
                    else self.sequence(event, (*path, index), at, depth + 1)
                )
                if self.inner is not None:
                    if positions is None:
                        positions = dict.fromkeys(range(index), line)
                    positions[index] = (at, self.inner)
                    continue
            else:  # an alias or a Recursive; node() refuses anything else before its mark is read
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
        self, start: Event, path: KeyPath, line: int, depth: int
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
        scalar_event = Scalar  # a local: the loop runs per event
        while True:
            key_event = next_event()
            kind = type(key_event)
            if kind is not scalar_event:
                if kind is MappingEnd:
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
            elif kind is MappingStart or kind is SequenceStart:
                result[key] = (
                    self.mapping(event, (*path, key), at, depth + 1)
                    if kind is MappingStart
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

    def odd_key(self, event: Event, path: KeyPath, depth: int) -> None:
        """A key of the mapping at ``depth`` that is not a scalar: reported, and skipped with
        its value."""
        kind = type(event)
        if kind is AliasEvent:
            raise no_anchor(event)
        if kind is not MappingStart and kind is not SequenceStart and kind is not Recursive:
            raise _unbalanced()
        self.skip(event, depth + 1)  # the whole key first: its value follows it
        value = self.next_event()
        self.fail(
            event.start_mark.line + 1, path, "a mapping key must be a plain name", dropped=False
        )
        self.skip(value, depth + 1)

    def merge_sources(
        self, event: Event, path: KeyPath, depth: int
    ) -> list[tuple[dict[str, object], Positions]]:
        """The mappings a ``<<`` key of a mapping at ``depth`` merges, each with the positions
        of its keys."""
        kind = type(event)
        if kind is SequenceStart:
            sources = []
            while True:
                item = self.next_event()
                kind = type(item)
                if kind is SequenceEnd:
                    break
                if kind is MappingStart:
                    sources.extend(self.merge_sources(item, path, depth + 1))
                    continue
                if kind is AliasEvent:
                    raise no_anchor(item)
                if kind is not Scalar and kind is not SequenceStart and kind is not Recursive:
                    raise _unbalanced()
                message = "'<<' needs a mapping or a list of mappings"
                self.fail(item.start_mark.line + 1, path, message, dropped=False)
                self.skip(item, depth + 2)
            return sources
        if kind is not MappingStart:
            if kind is AliasEvent:
                raise no_anchor(event)
            if kind is not Scalar and kind is not Recursive:
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
