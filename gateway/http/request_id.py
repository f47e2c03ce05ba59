"""The request id: the client's ``X-Request-ID`` when it is usable, else a new one.

The id is sent upstream as ``X-Request-ID``, returned to the client and written in the access
line, so one id finds a request in the client's logs, the gateway's and the upstream's. A
client's id is kept only when it is short and printable ASCII: it reaches log lines and headers,
where a long or binary value would be a way to inject or bloat them.

Response headers: ``X-Gateway-Request-ID`` always carries the gateway's id. ``X-Request-ID``
carries it too, unless the upstream answered with its own ``X-Request-ID`` (OpenAI, Azure and
most servers built on them do): that one is relayed unchanged, because it is the id the
upstream's support asks for and the one SDKs expose (the openai SDK's ``_request_id``).
"""

from __future__ import annotations

import os
import re

from gateway.types import RawHeaders

REQUEST_ID = b"x-request-id"
GATEWAY_REQUEST_ID = b"x-gateway-request-id"
MAX_CHARS = 128
# Visible ASCII only: no spaces, controls or bytes outside ASCII.
_USABLE = re.compile(rb"[\x21-\x7e]{1,%d}" % MAX_CHARS)


def new_request_id() -> str:
    """128 random bits as 32 hex characters."""
    return os.urandom(16).hex()


def request_id(headers: RawHeaders) -> str:
    """The inbound ``X-Request-ID`` when there is exactly one and it is usable; else a new id.
    Two differing ids cannot both be kept, and picking one would hide the other."""
    found: bytes | None = None
    for name, value in headers:
        if name == REQUEST_ID:
            if found is not None:
                return new_request_id()
            found = value
    if found is not None and _USABLE.fullmatch(found):
        return found.decode("ascii")
    return new_request_id()
