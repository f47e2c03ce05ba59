"""Response bodies the relay holds whole before sending: error bodies to mask, within a bound.

An upstream may quote the credentials it received in an error body ("Incorrect API key
provided: sk-...abcd"). When the upstream has secrets configured, the body of a non-streamed
error is held (up to ``ERROR_BODY_BYTES``) and any secret in it masked before anything is sent.
A larger body is relayed as it comes, unmasked (README: "What the gateway guarantees about
upstream secrets").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from gateway.http.decoding import decoded_body
from gateway.http.headers import mask_secrets
from gateway.openai.usage import UsageTap
from gateway.types import RawHeaders

# The most of a non-streamed error body held to mask the upstream's secrets in it, before and
# after inflating: an error is a few hundred bytes.
ERROR_BODY_BYTES = 1024 * 1024


async def hold_body(
    read: Callable[[], Awaitable[bytes]], tap: UsageTap | None, limit: int
) -> tuple[list[bytes], bool]:
    """The chunks of a body up to ``limit`` bytes (the one crossing it included), and whether
    they are the whole body. The usage tap reads them as they arrive."""
    held: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await read()
        if not chunk:
            return held, True
        if tap is not None:
            tap.feed(chunk)
        held.append(chunk)
        size += len(chunk)
    return held, False


def masked_error_body(
    held: Sequence[bytes], headers: RawHeaders, secrets: Sequence[bytes]
) -> tuple[RawHeaders, list[bytes]] | None:
    """The headers and body to send instead of a whole error body that quotes a secret, or
    None to send it unchanged (no secret in it, or it cannot be read within the bound).

    A gzip or deflate body is searched in an inflated copy; when it holds a secret it goes out
    masked and decoded, without ``Content-Encoding`` and with its own ``Content-Length``."""
    plain = decoded_body(b"".join(held), headers, ERROR_BODY_BYTES)
    if plain is None:
        return None
    masked = mask_secrets(plain, secrets)
    if masked is plain:
        return None
    kept = [(n, v) for n, v in headers if n != b"content-encoding" and n != b"content-length"]
    kept.append((b"content-length", str(len(masked)).encode("ascii")))
    return kept, [masked]
