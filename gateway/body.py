"""The request body: read with a size cap, parsed (once, with orjson) only when a rule needs it."""

from __future__ import annotations

from typing import Any

import orjson

from gateway import errors
from gateway.types import RawHeaders, Receive


class ClientDisconnected(Exception):
    """The client went away before its request body was complete."""


def declared_length(headers: RawHeaders) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = -1
            if length < 0:
                raise errors.GatewayError(400, "Invalid Content-Length header.", code="bad_request")
            return length
    return None


async def read_body(receive: Receive, headers: RawHeaders, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed ``limit``."""
    length = declared_length(headers)
    if length is not None and length > limit:
        raise errors.body_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk: bytes = message.get("body", b"")
        more = message.get("more_body", False)
        if not chunks and not more:
            if len(chunk) > limit:
                raise errors.body_too_large(limit)
            return chunk  # the common case: one message, no copy
        size += len(chunk)
        if size > limit:
            raise errors.body_too_large(limit)
        chunks.append(chunk)
        if not more:
            return b"".join(chunks)


def media_type(headers: RawHeaders) -> bytes:
    """The request's media type, lower-cased, without parameters; ``b""`` when none is given."""
    for name, value in headers:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower()
    return b""


def may_be_json(media: bytes) -> bool:
    """Whether a body of this media type is read as JSON for the model rules.

    A missing or ``text/plain`` type counts: upstreams such as vLLM parse such a body as JSON
    anyway, so skipping it would let a client slip past the key's model list and the token
    reservation by leaving the header out."""
    return media in (b"", b"application/json", b"text/plain") or media.endswith(b"+json")


def parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise errors.invalid_json() from None
