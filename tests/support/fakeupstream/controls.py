"""The misbehaviour a request asks for with ``x-fake-*`` headers (see the package's table)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from tests.support.fakeupstream.bodies import DEFAULT_CHUNKS, BadRequest

_MAX_CHUNKS = 100_000
_MAX_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Controls:
    """The misbehaviour a request asked for with ``x-fake-*`` headers."""

    status: int | None = None
    chunks: int = DEFAULT_CHUNKS
    interval: float = 0.0
    delay: float = 0.0
    gzip: bool = False
    hang: bool = False
    hang_after: int | None = None
    fail_after: int | None = None
    min_bytes: int = 0
    # With ``status``: the error body's ``code`` (else the status's usual one), and the
    # ``retry-after`` header in seconds (a 429 says 0 unless told otherwise).
    error_code: str | None = None
    retry_after: int | None = None
    # Chat completions: prompt tokens reported as read from the prompt cache (at most all).
    cached_tokens: int = 0

    @property
    def waits(self) -> bool:
        return self.delay > 0 or self.interval > 0 or self.hang or self.hang_after is not None

    @property
    def cut(self) -> int | None:
        """Where the body stops short (hang-after wins over fail-after), or None."""
        return self.hang_after if self.hang_after is not None else self.fail_after


NO_CONTROLS: Final = Controls()
_INT_CONTROLS: Final = {
    b"x-fake-status": "status",
    b"x-fake-chunks": "chunks",
    b"x-fake-interval-ms": "interval",
    b"x-fake-delay-ms": "delay",
    b"x-fake-hang-after": "hang_after",
    b"x-fake-fail-after": "fail_after",
    b"x-fake-bytes": "min_bytes",
    b"x-fake-retry-after": "retry_after",
    b"x-fake-cached-tokens": "cached_tokens",
}
_STR_CONTROLS: Final = {b"x-fake-error-code": "error_code"}
_BOOL_CONTROLS: Final = {b"x-fake-gzip": "gzip", b"x-fake-hang": "hang"}
_TRUE: Final = (b"1", b"true", b"yes", b"on")
_FALSE: Final = (b"0", b"false", b"no", b"off", b"")


def parse_controls(headers: Sequence[tuple[bytes, bytes]]) -> Controls:
    """Read the ``x-fake-*`` headers; raise BadRequest for unknown ones or bad values."""
    found: dict[str, Any] = {}
    for name, raw in headers:
        if not name.startswith(b"x-fake-"):
            continue
        value = raw.strip().lower()
        if (key := _INT_CONTROLS.get(name)) is not None:
            if not value.isdigit():
                raise BadRequest(f"{name.decode()} must be a non-negative integer, got {raw!r}")
            found[key] = int(value)
        elif (key := _BOOL_CONTROLS.get(name)) is not None:
            if value not in _TRUE and value not in _FALSE:
                raise BadRequest(f"{name.decode()} must be 1 or 0, got {raw!r}")
            found[key] = value in _TRUE
        elif (key := _STR_CONTROLS.get(name)) is not None:
            text = raw.strip().decode("latin-1")
            if not text or not all(c.isalnum() or c in "_-." for c in text):
                raise BadRequest(f"{name.decode()} must be a word (letters, digits, _-.)")
            found[key] = text
        else:
            raise BadRequest(f"unknown control header {name.decode('latin-1')!r}")
    if not found:
        return NO_CONTROLS
    status = found.get("status")
    if status is not None and status != 200 and not 400 <= status <= 599:
        raise BadRequest(f"x-fake-status must be 200 or 400-599, got {status}")
    if status == 200:
        found["status"] = None
    if found.get("chunks", 0) > _MAX_CHUNKS or found.get("min_bytes", 0) > _MAX_BYTES:
        raise BadRequest(f"at most {_MAX_CHUNKS} chunks and {_MAX_BYTES} bytes, please")
    for key in ("interval", "delay"):
        if key in found:
            found[key] = found[key] / 1000
    return Controls(**found)
