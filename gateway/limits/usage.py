"""Find a response's real token usage in the raw bytes the relay forwards.

The relay feeds every chunk as it arrives (``tap.feed(chunk)``) and calls ``tap.finish()`` at
the end; the tap reads, never alters or holds back, the bytes. Memory and work are bounded
whatever the upstream sends (the bounds are below), and a chunk without usage costs a couple of
µs:

- JSON bodies (``application/json``): a small body is kept whole; past ``keep_bytes`` only its
  last ``tail_bytes`` are, since OpenAI's responses end with their ``usage`` (chat completions,
  completions, embeddings, the Responses API: only ``user`` and ``metadata`` may follow it).
- Event streams (``text/event-stream``): complete events are scanned as they arrive and only
  those holding a ``"usage": {`` object are parsed: the final chat chunk's ``usage`` (sent when
  ``stream_options.include_usage`` is set; the other chunks carry ``"usage": null``) and the
  Responses API's ``response.completed`` event's ``response.usage``. An event larger than
  ``keep_bytes`` (a big ``response.completed``) keeps only its tail, where ``usage`` is.
- Compressed bodies: the client gets the bytes as the upstream encoded them (DESIGN §3); the tap
  inflates its own copy of ``gzip`` and ``deflate`` bodies with a streaming zlib decompressor.
  The openai SDK always asks for gzip and OpenAI compresses JSON, so without this nearly every
  non-stream request would be charged its whole reservation. The gateway asks upstreams only
  for these codings (``gateway/headers.py``); other encodings (``br``, ``zstd``) and
  undeclared gzip make the tap give up: ``None``, and the reservation stands.

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

In either body, the last ``"usage": {...}`` object with token counts wins; ``"usage"`` followed
by ``:`` can only be a key (inside JSON strings its quotes are escaped), and the object is cut
out by trying each closing brace with orjson, so there is no byte loop in Python.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_MAX_OBJECTS = 8  # "usage" keys tried per search, from the last
_MAX_BRACES = 64  # closing braces tried per usage object before giving up on it
_MAX_OBJECT_BYTES = 4096  # where those braces may be: a real usage object is ~300 bytes
_MAX_SEARCHES = 16  # brace searches per event stream (each event with "usage" may need one)
_MAX_INFLATED = 32 * 1024 * 1024  # default per response: a chat body is KBs, a big embedding MBs
_INFLATE_STEP = 1024 * 1024  # most one zlib call may produce: bounds a chunk's transient memory
_INFLATABLE = frozenset({"gzip", "x-gzip", "deflate"})
# zlib's automatic header detection: gzip or zlib-wrapped deflate (what HTTP calls deflate).
_AUTO_WBITS = 32 + zlib.MAX_WBITS


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int
    output_tokens: int
    total_tokens: int


def parse_usage(obj: object) -> Usage | None:
    """A ``usage`` object of any OpenAI API: chat/completions and embeddings
    (``prompt_tokens``, ``completion_tokens``, ``total_tokens``) or the Responses API
    (``input_tokens``, ``output_tokens``, ``total_tokens``)."""
    if not isinstance(obj, dict):
        return None
    inp = _count(obj.get("prompt_tokens", obj.get("input_tokens")))
    out = _count(obj.get("completion_tokens", obj.get("output_tokens")))
    total = _count(obj.get("total_tokens"))
    if total is None:
        if inp is None and out is None:
            return None
        total = (inp or 0) + (out or 0)
    return Usage(inp or 0, out or 0, total)


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def document_usage(document: object) -> Usage | None:
    """The usage of a parsed response body or event: ``usage``, or ``response.usage``
    (the Responses API's ``response.completed`` event)."""
    if not isinstance(document, dict):
        return None
    usage = document.get("usage")
    if usage is None and isinstance(document.get("response"), dict):
        usage = document["response"].get("usage")
    return parse_usage(usage) if isinstance(usage, dict) else None


def _parse_whole(data: bytes | bytearray) -> Usage | None:
    # One parse of a whole document is far cheaper than cutting the usage object out by trial
    # (each failed trial raises); the cut is the fallback for tails and odd shapes.
    try:
        return document_usage(orjson.loads(data))
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

    @property
    def usage(self) -> Usage | None:
        """Usage found so far (a stream's final event may come before its end)."""
        return self._usage

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
        """End of the body: look at what is left and return the usage found, if any."""
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
                found = None if self._truncated else _parse_whole(self._buf)
                if found is None:
                    found = find_usage(self._buf)
                if found is not None:
                    self._usage = found
            self._give_up()
        return self._usage

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
        if _USAGE.search(buf, 0, end) is not None:
            found = _event_usage(buf, end)
            if found is None and self._searches > 0:
                self._searches -= 1
                found = find_usage(buf[:end])
            if found is not None:
                self._usage = found
        self._truncated = False
        del buf[:end]
        if len(buf) > self._keep:  # what follows the last boundary is one huge event: its tail
            del buf[: len(buf) - self._tail]
            self._truncated = True


def _event_usage(buf: bytearray, end: int) -> Usage | None:
    """Usage from the last ``data:`` line before ``end`` that mentions it, parsed whole."""
    found = None
    for line in buf[:end].splitlines():
        if line.startswith(b"data:") and b'"usage"' in line:
            usage = _parse_whole(line[5:])
            if usage is not None:
                found = usage
    return found


def _last_boundary(buf: bytearray, start: int) -> int:
    """The end of the last complete event (after its blank line) at or after ``start``,
    or -1. Lines end in LF or CRLF (a lone CR, legal but unused by LLM APIs, is not seen)."""
    lf = buf.rfind(b"\n\n", start)
    crlf = buf.rfind(b"\r\n\r\n", start)
    if lf < 0 and crlf < 0:
        return -1
    return max(lf + 2 if lf >= 0 else -1, crlf + 4 if crlf >= 0 else -1)
