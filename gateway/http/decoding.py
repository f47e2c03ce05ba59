"""A whole response body without its content coding, within a bound.

The relay reads a decoded copy of a body in two places: an error body searched for the
upstream's secrets, and a model list rewritten for the caller. Both hold the body whole and
bounded; both need it in the codings the gateway offers upstream (``INFLATABLE_CODINGS``).
"""

from __future__ import annotations

import zlib

from gateway.http.headers import INFLATABLE_CODINGS
from gateway.types import RawHeaders

_GZIP_OR_ZLIB = 32 + zlib.MAX_WBITS  # zlib detects either header
_INFLATE_INPUT_STEP = 64 * 1024


def decoded_body(body: bytes, headers: RawHeaders, limit: int) -> bytes | None:
    """``body`` without its content coding, or None when it is over ``limit`` bytes before or
    after inflating, or in a coding the gateway did not offer (br, zstd, several)."""
    coding = b""
    for name, value in headers:
        if name == b"content-encoding":
            coding = value.strip().lower()
    if coding in (b"", b"identity"):
        return body if len(body) <= limit else None
    if coding in INFLATABLE_CODINGS:
        return inflated_body(body, coding, limit)
    return None


def inflated_body(body: bytes, coding: bytes, limit: int) -> bytes | None:
    """``body`` inflated, or None when it inflates past ``limit``. A corrupt or truncated body
    gives what inflated before the fault: what a lenient client would show."""
    wbits = _GZIP_OR_ZLIB
    if coding == b"deflate" and not _zlib_wrapped(body):
        # RFC 9110 §8.4.1.2: deflate is zlib-wrapped, but some servers send it raw.
        wbits = -zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    pieces: list[bytes] = []
    room = limit
    for start in range(0, len(body), _INFLATE_INPUT_STEP):
        try:
            # Fed in steps, so a fault loses only the step it is in.
            piece = inflater.decompress(body[start : start + _INFLATE_INPUT_STEP], room + 1)
        except zlib.error:
            break
        if len(piece) > room or inflater.unconsumed_tail:
            return None
        pieces.append(piece)
        room -= len(piece)
        if inflater.eof:
            break
    return b"".join(pieces)


def _zlib_wrapped(body: bytes) -> bool:
    """Whether ``body`` starts with a zlib header (RFC 1950 §2.2: CM 8, FCHECK)."""
    return len(body) >= 2 and body[0] & 0x0F == 8 and ((body[0] << 8) | body[1]) % 31 == 0
