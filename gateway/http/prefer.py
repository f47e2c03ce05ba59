"""The ``Prefer`` request header (RFC 7240): which preferences a request states.

``Prefer: respond-async, wait=10`` asks for an asynchronous answer (202 and a job to poll) and
says the client would wait up to 10 seconds for a synchronous one. Preferences are
comma-separated tokens, case-insensitive, each with an optional ``=value`` and ``;``
parameters; a header may appear more than once (RFC 7240 §2). A preference the server does not
support is ignored, never an error (§2), and so is one it cannot read.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter

from gateway.types import RawHeaders

PREFER = b"prefer"
PREFERENCE_APPLIED = b"preference-applied"
RESPOND_ASYNC = "respond-async"
_NAME = itemgetter(0)


@dataclass(frozen=True, slots=True)
class Preferences:
    respond_async: bool = False
    wait: float | None = None  # seconds; RFC 7240 §4.3


def preferences(headers: RawHeaders) -> Preferences | None:
    """The request's preferences, or None when it has no ``Prefer`` header (the common case:
    one comparison per header)."""
    # In C (map, itemgetter, ``in``): this runs on every request, and almost none has one.
    if PREFER not in map(_NAME, headers):
        return None
    values = [value for name, value in headers if name == PREFER]
    respond_async = False
    wait: float | None = None
    for value in values:
        for item in value.decode("latin-1").split(","):
            word, _, rest = item.partition(";")[0].partition("=")
            word = word.strip().lower()
            if word == RESPOND_ASYNC:
                respond_async = True
            elif word == "wait" and wait is None:
                wait = _seconds(rest.strip().strip('"'))
    return Preferences(respond_async, wait)


def _seconds(text: str) -> float | None:
    # delta-seconds (RFC 9110 §1.2.1 via RFC 7240 §4.3): digits only.
    # ASCII digits only: str.isdigit() also accepts '²', which int() refuses.
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        return None
    return float(int(text))
