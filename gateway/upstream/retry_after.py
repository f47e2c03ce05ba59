"""How long an upstream asks to be left alone: ``retry-after-ms`` or ``Retry-After``.

``Retry-After`` is delay-seconds or an HTTP-date (RFC 9110 §10.2.3); OpenAI and Azure also send
``retry-after-ms`` (milliseconds, fractional), which is more precise and wins when both are there.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Sequence


def retry_after_seconds(
    headers: Sequence[tuple[bytes, bytes]], now: float | None = None
) -> float | None:
    """The wait the upstream asked for, in seconds (>= 0), or None when it asked for none or
    wrote something unreadable."""
    seconds: float | None = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"retry-after-ms":
            try:
                millis = float(value.strip())
            except ValueError:
                continue
            if math.isfinite(millis) and millis >= 0:
                return millis / 1000
        elif lowered == b"retry-after" and seconds is None:
            seconds = _retry_after(value.strip().decode("latin-1"), now)
    return seconds


def _retry_after(value: str, now: float | None) -> float | None:
    # isdigit() alone is true of '²' and other non-ASCII digits, which float() refuses.
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    wall = time.time() if now is None else now
    return max(0.0, when.timestamp() - wall)
