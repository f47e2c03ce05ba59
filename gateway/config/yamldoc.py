"""One YAML file -> plain values, the line of every mapping key and sequence item, and problems.

libyaml (PyYAML's C parser) produces the events; this module builds values from them in one pass,
with PyYAML's safe scalars, rejecting duplicate keys (PyYAML would keep the last silently) and
expanding ``${NAME}`` / ``${NAME:-default}`` in string values (``$${`` is a literal ``${``;
mapping keys are never expanded). Building from events rather than from PyYAML's node tree is
what makes a large config fast: the pure-Python scanner and composer cost seconds for a few MB,
and the node objects of the C composer keep the garbage collector busy for longer still.

A config is written by people but may come from anywhere, so parsing is bounded: nesting deeper
than ``MAX_DEPTH`` and aliases expanding to more than ``MAX_ALIAS_NODES`` nodes are refused with
the line where the limit was reached, before they cost time or memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import yaml

from gateway.config.checks import KeyPath

__all__ = ["MAX_ALIAS_NODES", "MAX_DEPTH", "Parsed", "parse_yaml"]

# Real configs nest about 6 deep (routes[0].aliases[0].path); 64 leaves room for any hand-written
# structure while keeping the builder's recursion far from Python's stack limit (a 100,000-deep
# document used to raise RecursionError inside PyYAML's composer).
MAX_DEPTH = 64
# A "billion laughs" document (CVE-2019-11253 hit the Kubernetes API server the same way) expands
# nine levels of ten aliases into 10^9 nodes from under 1 KB of text. Anchors in a config share a
# few defaults, so 100,000 nodes produced by aliases is far beyond legitimate use yet costs only
# a fraction of a second to reach.
MAX_ALIAS_NODES = 100_000

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

# Events, slimmed to tuples: (kind, line, ...). A tuple of atoms is soon untracked by the garbage
# collector, unlike PyYAML's event and node objects.
_SCALAR, _MAP, _SEQ, _END, _RECURSIVE = range(5)
_ALIAS, _DOCUMENT, _STREAM_END, _OTHER = range(5, 9)  # libyaml's, never passed on
_Event = tuple[int, int, str | None, str, bool]  # kind, line, tag, scalar value, plain
_END_EVENT: _Event = (_END, 0, None, "", False)

Problem = tuple[int | None, KeyPath, str]  # line, key path, message


@dataclass
class Parsed:
    """One file's values and where each key path was written."""

    data: dict[str, object] | None  # None: the file could not be parsed at all
    lines: dict[KeyPath, int]
    failed: set[KeyPath]  # paths whose value is already reported (pydantic would repeat it)
    problems: list[Problem]
    secrets: dict[str, str] = field(default_factory=dict)  # environment value -> its name


class _Refused(Exception):
    """A problem that stops the whole file: a limit or a YAML error."""

    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


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
    except StopIteration:  # libyaml balances its events or raises; this is only a guard
        builder.parsed.data = None
        builder.parsed.problems.append((None, (), "YAML: the document ends inside a collection"))
    return builder.parsed


def _events(text: str) -> Iterator[_Event]:
    """libyaml's events as tuples, aliases expanded in place (at most ``MAX_ALIAS_NODES``).

    An alias is replayed from the recorded events of its anchor, so the values it produces carry
    the anchor's lines. An alias to an anchor whose node is still open (it would contain itself)
    yields one ``_RECURSIVE`` event instead. This loop runs once per event of a file that may
    hold half a million: it is written for speed.
    """
    # libyaml's parser keeps its own stacks, so even a deep document cannot overflow it; PyYAML's
    # pure-Python parser (without libyaml) is iterative too, only slower.
    parser = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    get_event = parser.get_event
    kinds: dict[type, int] = {
        yaml.ScalarEvent: _SCALAR,
        yaml.MappingStartEvent: _MAP,
        yaml.SequenceStartEvent: _SEQ,
        yaml.MappingEndEvent: _END,
        yaml.SequenceEndEvent: _END,
        yaml.AliasEvent: _ALIAS,
        yaml.DocumentStartEvent: _DOCUMENT,
        yaml.StreamEndEvent: _STREAM_END,
    }
    # name -> start and end in ``recorded``, line, nodes (events less collection ends)
    anchors: dict[str, tuple[int, int, int, int]] = {}
    opened: list[tuple[str, int, int, int]] = []  # name, depth, start, line
    recorded: list[_Event] = []  # events since the first anchor opened
    depth = 0
    expanded = 0
    documents = 0
    try:
        while True:
            event = get_event()
            kind = kinds.get(type(event), _OTHER)
            if kind == _SCALAR:
                slim: _Event = (
                    _SCALAR,
                    event.start_mark.line + 1,
                    event.tag,
                    event.value,
                    event.implicit[0],
                )
            elif kind == _END:
                depth -= 1
                if opened:
                    recorded.append(_END_EVENT)
                    while opened and opened[-1][1] > depth:
                        name, _, start, first = opened.pop()
                        nodes = sum(1 for e in recorded[start:] if e[0] != _END)
                        anchors[name] = (start, len(recorded), first, nodes)
                yield _END_EVENT
                continue
            elif kind in (_MAP, _SEQ):
                depth += 1
                slim = (kind, event.start_mark.line + 1, event.tag, "", False)
            elif kind == _ALIAS:
                line = event.start_mark.line + 1
                name = event.anchor
                if name in anchors:
                    start, end, _, nodes = anchors[name]
                    expanded += nodes
                    if expanded > MAX_ALIAS_NODES:
                        raise _Refused(
                            line,
                            f"YAML: aliases expand to more than {MAX_ALIAS_NODES:,} nodes (at "
                            f"*{name}); a document this repetitive is refused as an alias bomb",
                        )
                    replay = recorded[start:end]
                elif any(name == o[0] for o in opened):
                    first = next(o[3] for o in opened if o[0] == name)
                    replay = [(_RECURSIVE, first, None, "", False)]
                else:
                    raise _Refused(line, f"YAML: alias *{name} refers to no anchor before it")
                if opened:
                    recorded.extend(replay)
                yield from replay
                continue
            elif kind == _DOCUMENT:
                documents += 1
                if documents > 1:
                    raise _Refused(
                        event.start_mark.line + 1,
                        "YAML: expected a single document in the stream but found another document",
                    )
                continue
            elif kind == _STREAM_END:
                return
            else:  # stream start, document end
                continue
            anchor = event.anchor
            if anchor is not None:
                line = slim[1]
                if anchor in anchors or any(anchor == o[0] for o in opened):
                    first = anchors[anchor][2] if anchor in anchors else line
                    raise _Refused(
                        line, f"YAML: anchor &{anchor} is already defined at line {first}"
                    )
                if kind == _SCALAR:
                    anchors[anchor] = (len(recorded), len(recorded) + 1, line, 1)
                else:
                    opened.append((anchor, depth, len(recorded), line))
                recorded.append(slim)
            elif opened:
                recorded.append(slim)
            yield slim
    finally:
        parser.dispose()


class _Builder:
    """Builds plain values from the events, recording positions and problems."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.parsed = Parsed({}, {(): 0}, set(), [])
        self.events: Iterator[_Event] = iter(())
        self.depth = 0
        self.resolvers = yaml.resolver.Resolver.yaml_implicit_resolvers
        self.resolvable = frozenset(self.resolvers)  # first characters that may not be a string
        self.constructor = yaml.constructor.SafeConstructor()
        self.constructed: dict[tuple[str, str], object] = {}

    def parse(self, text: str) -> None:
        self.events = _events(text)
        root = next(self.events, None)
        if root is None:
            return
        data = self.node(root, ())
        for _ in self.events:  # the rest of the stream: a second document is an error
            pass
        if not isinstance(data, dict):
            self.fail(root[1], (), "the top level must be a mapping of sections")
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
        kind, line, tag = event[0], event[1], event[2]
        if kind == _SCALAR:
            return self.scalar(event, path)
        if kind == _RECURSIVE:
            self.fail(line, path, "an alias refers to a node that contains it")
            return None
        if kind == _END:  # libyaml never sends an end first; guard the builder anyway
            raise _Refused(None, "YAML: unbalanced collection")
        if tag is not None and tag != "!" and tag != (_MAP_TAG if kind == _MAP else _SEQ_TAG):
            self.fail(line, path, f"unsupported tag {tag!r}")
            self.skip(event)
            return None
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Refused(
                line, f"nesting deeper than {MAX_DEPTH} levels; a config needs far fewer"
            )
        try:
            return self.mapping(path) if kind == _MAP else self.sequence(path)
        finally:
            self.depth -= 1

    def skip(self, event: _Event) -> None:
        """Consume the rest of the collection ``event`` opened (iteratively: it may be deep)."""
        if event[0] not in (_MAP, _SEQ):
            return
        open_ = 1
        for following in self.events:
            if following[0] in (_MAP, _SEQ):
                open_ += 1
            elif following[0] == _END:
                open_ -= 1
                if open_ == 0:
                    return

    def sequence(self, path: KeyPath) -> list[object]:
        items: list[object] = []
        lines = self.parsed.lines
        resolvable = self.resolvable
        for event in self.events:
            if event[0] == _END:
                break
            item_path = (*path, len(items))
            lines[item_path] = event[1]
            value = event[3]
            if (  # a string as written, the common case, taken without a call
                event[0] == _SCALAR
                and event[2] is None
                and "$" not in value
                and not (event[4] and value[:1] in resolvable)
            ):
                items.append(value)
            else:
                items.append(self.node(event, item_path))
        return items

    def mapping(self, path: KeyPath) -> dict[str, object]:
        result: dict[str, object] = {}
        merges: list[tuple[dict[str, object], dict[KeyPath, int]]] = []
        events = self.events
        lines = self.parsed.lines
        resolvable = self.resolvable
        for key_event in events:
            kind, line = key_event[0], key_event[1]
            if kind == _END:
                break
            value_event = next(events)
            if kind != _SCALAR:
                self.fail(line, path, "a mapping key must be a plain name", dropped=False)
                self.skip(key_event)
                self.skip(value_event)
                continue
            key = key_event[3]  # keys are names: their text, never true/1/null or ${...}
            tag = key_event[2]
            if tag == _MERGE_TAG or (tag is None and key_event[4] and key == "<<"):
                merges.extend(self.merge_sources(value_event, path))
                continue
            key_path = (*path, key)
            if key in result:  # merged keys are added after the loop: these are its own
                message = f"duplicate key (lines {lines[key_path]} and {line})"
                self.fail(line, key_path, message, dropped=False)
                self.skip(value_event)
                continue
            lines[key_path] = line
            value = value_event[3]
            if (  # a string as written, the common case, taken without a call
                value_event[0] == _SCALAR
                and value_event[2] is None
                and "$" not in value
                and not (value_event[4] and value[:1] in resolvable)
            ):
                result[key] = value
            else:
                result[key] = self.node(value_event, key_path)
        for source, inner in merges:  # YAML's "<<: *defaults"; the mapping's own keys win
            depth = len(path)
            by_key: dict[object, list[tuple[KeyPath, int]]] = {}
            for inner_path, inner_line in inner.items():
                if len(inner_path) > depth:
                    by_key.setdefault(inner_path[depth], []).append((inner_path, inner_line))
            for key, merged in source.items():
                if key not in result:
                    result[key] = merged
                    lines.update(by_key.get(key, ()))
        return result

    def merge_sources(
        self, event: _Event, path: KeyPath
    ) -> list[tuple[dict[str, object], dict[KeyPath, int]]]:
        """The mappings a ``<<`` key merges, each with the positions of its keys."""
        if event[0] == _SEQ:
            self.depth += 1
            try:
                sources = []
                for item in self.events:
                    if item[0] == _END:
                        break
                    sources.extend(self.merge_sources(item, path) if item[0] == _MAP else [])
                    if item[0] != _MAP:
                        self.fail(
                            item[1],
                            path,
                            "'<<' needs a mapping or a list of mappings",
                            dropped=False,
                        )
                        self.skip(item)
                return sources
            finally:
                self.depth -= 1
        if event[0] != _MAP:
            self.fail(event[1], path, "'<<' needs a mapping or a list of mappings", dropped=False)
            self.skip(event)
            return []
        outer, self.parsed.lines = self.parsed.lines, {}
        try:
            merged = self.node(event, path)
        finally:
            inner, self.parsed.lines = self.parsed.lines, outer
        return [(merged, inner)] if isinstance(merged, dict) else []

    def scalar(self, event: _Event, path: KeyPath) -> object:
        _, line, tag, value, plain = event
        if tag is None or tag == "!":
            tag = _STR_TAG
            if plain:
                for candidate, pattern in self.resolvers.get(value[:1], ()):
                    if pattern.match(value):
                        tag = candidate
                        break
        if tag == _STR_TAG:
            return self.expand(value, line, path) if "$" in value else value
        cached = self.constructed.get((tag, value), self)
        if cached is not self:
            return cached
        try:
            node = yaml.ScalarNode(tag, value)
            constructed = self.constructor.construct_object(node, deep=True)
        except Exception as error:  # a constructor's failure is a problem with this value
            problem = getattr(error, "problem", None) or f"invalid value: {error}"
            self.fail(line, path, str(problem))
            return None
        self.constructed[(tag, value)] = constructed
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
