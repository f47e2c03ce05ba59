"""The shared ASGI vocabulary (after Starlette's ``types.py``)."""

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Raw header list as ASGI carries it: lower-case names, latin-1 bytes.
RawHeaders = list[tuple[bytes, bytes]]

# A request body as the gateway holds it: one message's bytes, or the one buffer a body that
# came in several messages was gathered in (never copied again to make it bytes).
Body = bytes | bytearray
