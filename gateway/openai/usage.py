"""Find a response's real token usage in the raw bytes the relay forwards.

The relay feeds every chunk as it arrives (``tap.feed(chunk)``) and calls ``tap.finish()`` at
the end; the tap reads, never alters or holds back, the bytes. Memory and work are bounded
whatever the upstream sends (the bounds are below), and a chunk without usage costs a couple of
µs.

What is counted, the same for every provider (``Usage``): every input token the provider
processed, prompt-cache reads and writes included, and every output token; ``total_tokens``,
what a request is charged, is their sum (or the provider's own ``total_tokens`` when larger).

- OpenAI chat/completions, completions and embeddings: ``prompt_tokens`` (which already
  includes ``prompt_tokens_details.cached_tokens``) and ``completion_tokens``.
- OpenAI's Responses API: ``input_tokens`` (which includes ``input_tokens_details.
  cached_tokens``) and ``output_tokens``.
- Anthropic Messages: ``input_tokens`` counts only the tokens after the last cache breakpoint,
  so ``cache_creation_input_tokens`` and ``cache_read_input_tokens`` are added to it
  (https://docs.anthropic.com/en/docs/build-with-claude/prompt-caching, "Tracking cache
  performance"), and ``output_tokens``. Cache reads are charged in full although they are
  billed at a discount: a token limit is about tokens processed, not about price.

Where the usage is:

- JSON bodies (``application/json``): a small body is kept whole; past ``keep_bytes`` only its
  last ``tail_bytes`` are, since the APIs' responses end with their ``usage`` (OpenAI's chat
  completions, completions, embeddings and Responses API: only ``user`` and ``metadata`` may
  follow it; Anthropic's Message: nothing of size).
- Event streams (``text/event-stream``): complete events are scanned as they arrive and only
  those holding a ``"usage": {`` object are parsed: the final chat or completions chunk's
  ``usage`` (sent when ``stream_options.include_usage`` is set; the other chunks carry
  ``"usage": null``), the Responses API's ``response.completed`` event's ``response.usage``,
  and Anthropic's ``message_start`` (``message.usage``: input and cache counts, and an initial
  ``output_tokens``) and ``message_delta`` (``usage``: cumulative counts, only
  ``output_tokens`` in older API versions; several when server tools run). A stream's counts
  are merged field by field, keeping the largest: cumulative counts never shrink, so
  ``message_start``'s initial output is replaced, never added to, by ``message_delta``'s
  (https://docs.anthropic.com/en/docs/build-with-claude/streaming, "Event types"). An event
  larger than ``keep_bytes`` (a big ``response.completed``) keeps only its tail, where
  ``usage`` is.
- ``message_start``'s usage is not a final count: a stream that ends without a later one (the
  client left, the upstream failed) gives ``finish()`` ``None``, so the reservation stands
  rather than being settled to the input and one output token; ``usage`` still shows it.
- Compressed bodies: the client gets the bytes as the upstream encoded them, untouched; the
  tap inflates its own copy of ``gzip`` and ``deflate`` bodies with a streaming zlib
  decompressor. The openai SDK always asks for gzip and OpenAI compresses JSON, so without this
  nearly every non-stream request would be charged its whole reservation. The gateway asks
  upstreams only for these codings (``gateway/http/headers.py``); other encodings (``br``,
  ``zstd``) and undeclared gzip make the tap give up: ``None``, and the reservation stands.

The bounds, so that no upstream can make one response cost the event loop unbounded memory or
CPU (a 2 MB gzip body can inflate to 2 GB):

- At most ``max_inflated_bytes`` (32 MiB) are inflated per response, in pieces of at most
  1 MiB per zlib call (``max_length``): past the cap the tap drops the decompressor and its
  unconsumed input and gives up, and the reservation stands. The relayed bytes are unaffected.
- Buffers: a JSON body keeps at most ``keep_bytes``, then only its last ``tail_bytes``; an event
  stream keeps its incomplete last event, cut to its tail past ``keep_bytes``.
- Cutting a usage object out by trial: only the last 8 ``"usage": {`` of a search, each with at
  most 64 closing braces within 4 KiB of it (a real usage object is a few hundred bytes), parsed
  through a memoryview rather than copied; an event stream gets at most 16 such searches.

A JSON body is parsed whole when it was kept whole; otherwise, and for an event whose
``data:`` line does not parse, the last ``"usage": {...}`` object with token counts is cut out:
``"usage"`` followed by ``:`` can only be a key (inside JSON strings its quotes are escaped),
and the object is cut out by trying each closing brace with orjson, so there is no byte loop
in Python.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.http.headers import INFLATABLE_CODINGS

_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_MAX_OBJECTS = 8  # "usage" keys tried per search, from the last
_MAX_BRACES = 64  # closing braces tried per usage object before giving up on it
_MAX_OBJECT_BYTES = 4096  # where those braces may be: a real usage object is ~300 bytes
_MAX_SEARCHES = 16  # brace searches per event stream (each event with "usage" may need one)
_MAX_INFLATED = 32 * 1024 * 1024  # default per response: a chat body is KBs, a big embedding MBs
_INFLATE_STEP = 1024 * 1024  # most one zlib call may produce: bounds a chunk's transient memory
_INFLATABLE = frozenset(coding.decode() for coding in INFLATABLE_CODINGS)
# zlib's automatic header detection: gzip or zlib-wrapped deflate (what HTTP calls deflate).
_AUTO_WBITS = 32 + zlib.MAX_WBITS


@dataclass(frozen=True, slots=True)
class Usage:
    """The tokens one response used, counted alike for every provider.

    ``input_tokens`` is every input token processed, cached ones included (Anthropic's
    ``input_tokens`` + ``cache_creation_input_tokens`` + ``cache_read_input_tokens``);
    ``cache_read_tokens`` and ``cache_creation_tokens`` say how many of them were read from or
    written to a prompt cache. ``total_tokens``, what the request is charged, is
    ``input_tokens + output_tokens``, or the provider's own ``total_tokens`` when larger."""

    input_tokens: int
    output_tokens: int
    total_tokens: int
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0

    def merged(self, later: Usage) -> Usage:
        """One stream's two reports as one: the largest of each count, since a stream's counts
        are cumulative (Anthropic's ``message_start`` then ``message_delta``)."""
        inp = max(self.input_tokens, later.input_tokens)
        out = max(self.output_tokens, later.output_tokens)
        return Usage(
            inp,
            out,
            max(self.total_tokens, later.total_tokens, inp + out),
            max(self.cache_read_tokens, later.cache_read_tokens),
            max(self.cache_creation_tokens, later.cache_creation_tokens),
        )


def parse_usage(obj: object) -> Usage | None:
    """A ``usage`` object of OpenAI's chat/completions, completions and embeddings
    (``prompt_tokens``, ``completion_tokens``, ``total_tokens``), of its Responses API
    (``input_tokens``, ``output_tokens``, ``total_tokens``) or of Anthropic's Messages API
    (``input_tokens``, ``cache_creation_input_tokens``, ``cache_read_input_tokens``,
    ``output_tokens``); ``None`` when it holds no count."""
    if not isinstance(obj, dict):
        return None
    creation = read = 0
    inp = _count(obj.get("prompt_tokens"))
    if inp is not None:
        # OpenAI's prompt_tokens already includes its cached tokens.
        read = _count(_member(obj.get("prompt_tokens_details"), "cached_tokens")) or 0
    else:
        inp = _count(obj.get("input_tokens"))
        # Anthropic's cache counts are disjoint from its input_tokens: added. The Responses
        # API's cached_tokens are part of its input_tokens: only reported.
        creation = _count(obj.get("cache_creation_input_tokens")) or 0
        anthropic_read = _count(obj.get("cache_read_input_tokens")) or 0
        if creation or anthropic_read:
            inp = (inp or 0) + creation + anthropic_read
        read = anthropic_read or (
            _count(_member(obj.get("input_tokens_details"), "cached_tokens")) or 0
        )
    out = _count(obj.get("completion_tokens"))
    if out is None:
        out = _count(obj.get("output_tokens"))
    total = _count(obj.get("total_tokens"))
    if total is None and inp is None and out is None:
        return None
    inp, out = inp or 0, out or 0
    return Usage(inp, out, max(total or 0, inp + out), read, creation)


def _member(obj: object, name: str) -> object:
    return obj.get(name) if isinstance(obj, dict) else None


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _document_usage(document: object) -> tuple[Usage, bool] | None:
    """The usage of a parsed response body or event, and whether it is a final count.

    It is ``usage``, ``response.usage`` (the Responses API's ``response.completed`` event) or
    ``message.usage`` (Anthropic's ``message_start`` event); all are final counts but
    ``message_start``'s, whose ``output_tokens`` is only where the count starts."""
    if not isinstance(document, dict):
        return None
    usage = document.get("usage")
    final = True
    if usage is None:
        if isinstance(inner := document.get("response"), dict):
            usage = inner.get("usage")
        elif isinstance(inner := document.get("message"), dict):
            usage = inner.get("usage")
            final = False
    found = parse_usage(usage)
    return (found, final) if found is not None else None


def _parse_whole(data: bytes | bytearray) -> tuple[Usage, bool] | None:
    # One parse of a whole document is far cheaper than cutting the usage object out by trial
    # (each failed trial raises); the cut is the fallback for tails and odd shapes.
    try:
        return _document_usage(orjson.loads(data))
    except orjson.JSONDecodeError:
        return None


def find_usage(data: bytes | bytearray) -> Usage | None:
    """The last ``"usage": {...}`` object with token counts in a piece of JSON (or its tail).

    Bounded whatever ``data`` holds: the last ``_MAX_OBJECTS`` keys, each tried with at most
    ``_MAX_BRACES`` closing braces within ``_MAX_OBJECT_BYTES``. Unbounded, a body made of
    ``"usage": {`` repeated made this quadratic (seconds to minutes for 256 KiB)."""
    starts = [m.end() - 1 for m in _USAGE.finditer(data)][-_MAX_OBJECTS:]
    if not starts:
        return None
    # Trials parse slices of a view: a failed trial costs what orjson read, not a copy.
    with memoryview(data) as view:
        for start in reversed(starts):
            usage = _object_at(data, view, start)
            if usage is not None:
                return usage
    return None


def _object_at(data: bytes | bytearray, view: memoryview, start: int) -> Usage | None:
    end = start
    limit = start + _MAX_OBJECT_BYTES
    for _ in range(_MAX_BRACES):
        end = data.find(b"}", end + 1, limit)
        if end < 0:
            return None
        try:
            obj = orjson.loads(view[start : end + 1])
        except orjson.JSONDecodeError:
            continue
        return parse_usage(obj)
    return None


class UsageTap:
    """Reads usage from a response's raw chunks; ``finish()`` returns it, or ``None``."""

    __slots__ = (
        "_buf",
        "_done",
        "_final",
        "_inflate",
        "_inflate_budget",
        "_keep",
        "_searches",
        "_sse",
        "_tail",
        "_truncated",
        "_usage",
    )

    def __init__(
        self,
        content_type: str | None,
        content_encoding: str | None = None,
        *,
        keep_bytes: int = 256 * 1024,
        tail_bytes: int = 16 * 1024,
        max_inflated_bytes: int = _MAX_INFLATED,
    ) -> None:
        """``max_inflated_bytes``: the most a compressed body is inflated (default 32 MiB);
        past it the tap gives up on the response and its reservation stands."""
        ctype = (content_type or "").lower()
        encoding = (content_encoding or "").strip().lower()
        self._sse = ctype.startswith("text/event-stream")
        self._inflate = zlib.decompressobj(_AUTO_WBITS) if encoding in _INFLATABLE else None
        self._inflate_budget = max_inflated_bytes
        plain = encoding in ("", "identity") or self._inflate is not None
        self._done = not plain or not (self._sse or "json" in ctype or not ctype)
        self._buf = bytearray()
        self._keep = keep_bytes
        self._tail = tail_bytes
        self._truncated = False  # JSON: the head was dropped; SSE: the first event's head was
        self._searches = _MAX_SEARCHES
        self._usage: Usage | None = None
        self._final = False

    @property
    def usage(self) -> Usage | None:
        """Usage found so far (a stream's final event may come before its end), a count that
        is not final yet included (Anthropic's ``message_start``)."""
        return self._usage

    @property
    def final(self) -> bool:
        """Whether ``usage`` is a final count: one a response reports when it is done."""
        return self._final

    def feed(self, chunk: bytes) -> None:
        if self._done or not chunk:
            return
        if self._inflate is None:
            self._take(chunk)
            return
        inflate = self._inflate
        data = chunk
        while data:
            # Never more than the budget left (plus one byte, to tell "exactly used up" from
            # "over"; a limit of 0 would mean no limit to zlib), and 1 MiB per call at most.
            budget = self._inflate_budget
            try:
                piece = inflate.decompress(data, min(budget + 1, _INFLATE_STEP))
            except zlib.error:
                self._give_up()
                return
            if len(piece) > budget:
                self._give_up()  # a bomb, or just too big: stop inflating, keep relaying
                return
            self._inflate_budget = budget - len(piece)
            data = inflate.unconsumed_tail
            if piece:
                self._take(piece)
                if self._done:
                    return

    def finish(self) -> Usage | None:
        """End of the body: look at what is left and return the usage to settle, if any.

        ``None`` when no final count was found: none at all, or only Anthropic's
        ``message_start`` (the stream ended before its ``message_delta``)."""
        if not self._done:
            inflate, self._inflate = self._inflate, None
            if inflate is not None:
                try:
                    # Every input byte was consumed in feed(): only the few bytes zlib may
                    # still hold back can come out here, counted against the cap all the same.
                    rest = inflate.flush()
                except zlib.error:
                    self._give_up()
                else:
                    if len(rest) > self._inflate_budget:
                        self._give_up()
                    elif rest:
                        self._take(rest)
        if not self._done:
            if self._buf:
                if self._sse:
                    # An event not ended by a blank line before the body ended.
                    self._read_events(len(self._buf))
                else:
                    whole = None if self._truncated else _parse_whole(self._buf)
                    found = whole[0] if whole is not None else find_usage(self._buf)
                    if found is not None:
                        self._usage, self._final = found, True
            self._give_up()
        return self._usage if self._final else None

    def _give_up(self) -> None:
        self._done = True
        self._buf = bytearray()
        self._inflate = None  # with it goes any unconsumed input it held

    def _take(self, chunk: bytes) -> None:
        """Read a piece of the (inflated) body."""
        buf = self._buf
        if not buf and not self._truncated and chunk[:2] == b"\x1f\x8b":
            self._give_up()  # gzip without a Content-Encoding saying so
            return
        if self._sse:
            self._feed_event_stream(chunk)
            return
        if len(buf) + len(chunk) <= self._keep:
            buf += chunk
            return
        # Past keep_bytes only the tail is kept: copy no more of a big piece than that.
        tail = self._tail
        if len(chunk) >= tail:
            buf[:] = chunk[-tail:]
        else:
            buf += chunk
            del buf[: len(buf) - tail]
        self._truncated = True

    def _feed_event_stream(self, chunk: bytes) -> None:
        buf = self._buf
        # A boundary may straddle the previous chunk's end: look back three bytes.
        look = len(buf) - 3 if len(buf) > 3 else 0
        buf += chunk
        end = _last_boundary(buf, look)
        if end < 0:
            if len(buf) > self._keep:  # one huge event: keep its tail, where usage is
                del buf[: len(buf) - self._tail]
                self._truncated = True
            return
        self._read_events(end)
        self._truncated = False
        del buf[:end]
        if len(buf) > self._keep:  # what follows the last boundary is one huge event: its tail
            del buf[: len(buf) - self._tail]
            self._truncated = True

    def _read_events(self, end: int) -> None:
        """Take the usage of the complete events in ``_buf[:end]``, if they mention any."""
        buf = self._buf
        if _USAGE.search(buf, 0, end) is None:
            return
        events = buf[:end]
        found = _event_usage(events)
        if found is None and self._searches > 0:
            self._searches -= 1
            usage = find_usage(events)
            if usage is not None:
                # Which event it came from is unknown: message_start's is not a final count.
                found = usage, b'"message_start"' not in events
        if found is not None:
            usage, final = found
            self._usage = usage if self._usage is None else self._usage.merged(usage)
            self._final = self._final or final


def _event_usage(events: bytes | bytearray) -> tuple[Usage, bool] | None:
    """The usage of the ``data:`` lines that mention it, each parsed whole and merged, and
    whether one of them was a final count."""
    found: tuple[Usage, bool] | None = None
    for line in events.splitlines():
        if line.startswith(b"data:") and b'"usage"' in line:
            usage = _parse_whole(line[5:])
            if usage is not None:
                found = (
                    usage if found is None else (found[0].merged(usage[0]), found[1] or usage[1])
                )
    return found


def _last_boundary(buf: bytearray, start: int) -> int:
    """The end of the last complete event (after its blank line) at or after ``start``,
    or -1. Lines end in LF or CRLF (a lone CR, legal but unused by LLM APIs, is not seen)."""
    lf = buf.rfind(b"\n\n", start)
    crlf = buf.rfind(b"\r\n\r\n", start)
    if lf < 0 and crlf < 0:
        return -1
    return max(lf + 2 if lf >= 0 else -1, crlf + 4 if crlf >= 0 else -1)


def usage_tap(raw_headers: Iterable[tuple[bytes, bytes]]) -> UsageTap:
    """A tap for a response with these headers (names in any case)."""
    content_type = content_encoding = None
    for name, value in raw_headers:
        lowered = name.lower()
        if lowered == b"content-type":
            content_type = value.decode("latin-1")
        elif lowered == b"content-encoding":
            content_encoding = value.decode("latin-1")
    return UsageTap(content_type, content_encoding)
