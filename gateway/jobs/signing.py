"""Webhook signatures as Standard Webhooks defines them (the scheme OpenAI's webhooks use).

Each delivery carries ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature``; the
signature is ``v1,`` and the base64 HMAC-SHA256, keyed with the secret's bytes, of
``{webhook-id}.{webhook-timestamp}.{body}`` (spec: "Signature scheme"). The header holds one
signature per configured secret, space separated, so a receiver can move to a new secret while
the old one still verifies (spec: "Webhook headers", zero-downtime rotation).

Secrets are ``whsec_`` and the base64 of 24 to 64 random bytes (spec: "Signing secret: random,
at least 24 bytes (192 bits), 512 bits maximum"; "base64 encoded, prefixed with whsec_").
A secret is never put in a message, a repr or a log line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable, Mapping

__all__ = [
    "MAX_SECRET_BYTES",
    "MIN_SECRET_BYTES",
    "SECRET_PREFIX",
    "TOLERANCE",
    "SecretError",
    "VerificationError",
    "WebhookSecrets",
    "load_secrets",
    "new_secret",
    "signature",
    "verify",
]

SECRET_PREFIX = "whsec_"  # noqa: S105 (the format's prefix, not a secret)
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64
# Seconds a receiver accepts between webhook-timestamp and its clock, either way: what the
# reference libraries use (five minutes) against replays of a captured delivery.
TOLERANCE = 300.0

_MAKE_ONE = "'gateway webhooks secret' prints one"


class SecretError(ValueError):
    """A malformed secret; the message says which one (by position) and why, never its text."""


class VerificationError(ValueError):
    """A delivery that a receiver must reject."""


def new_secret(size: int = 32) -> str:
    """A fresh secret: ``whsec_`` and the base64 of ``size`` random bytes."""
    if not MIN_SECRET_BYTES <= size <= MAX_SECRET_BYTES:
        raise ValueError(f"a secret has {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes")
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(size)).decode("ascii")


def _secret_bytes(text: str) -> bytes:
    if not text.startswith(SECRET_PREFIX):
        raise SecretError(f"does not start with {SECRET_PREFIX!r}")
    encoded = text[len(SECRET_PREFIX) :]
    try:
        # Padding is optional in what admins paste (the reference libraries add it back).
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise SecretError(f"is not {SECRET_PREFIX!r} and standard base64") from None
    if len(key) < MIN_SECRET_BYTES:
        raise SecretError(
            f"is {len(key)} bytes; a secret needs at least {MIN_SECRET_BYTES} random bytes "
            "(Standard Webhooks)"
        )
    if len(key) > MAX_SECRET_BYTES:
        raise SecretError(f"is {len(key)} bytes; at most {MAX_SECRET_BYTES} (Standard Webhooks)")
    return key


def load_secrets(text: str, source: str = "the webhook secret") -> WebhookSecrets | None:
    """The secrets in ``text`` (an environment variable's value: secrets separated by spaces,
    newest first); None when it is blank, and jobs with a webhook are then refused.
    SecretError, naming ``source`` and the secret's position, when one is malformed."""
    if not text.strip():
        return None
    return WebhookSecrets.parse(text, source)


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,`` signature of a delivery with one secret's bytes."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


class WebhookSecrets:
    """The signing secrets, newest first as configured; signs with every one (rotation)."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[bytes]) -> None:
        self._keys = tuple(keys)
        if not self._keys:
            raise SecretError("no secret")

    @classmethod
    def parse(cls, text: str, source: str = "the secret") -> WebhookSecrets:
        """Secrets separated by whitespace; SecretError names ``source`` and the position."""
        parts = text.split()
        if not parts:
            raise SecretError(f"{source} is empty; {_MAKE_ONE}")
        keys = []
        for index, part in enumerate(parts, 1):
            try:
                keys.append(_secret_bytes(part))
            except SecretError as exc:
                which = source if len(parts) == 1 else f"{source}, secret {index} of {len(parts)},"
                raise SecretError(
                    f"{which} {exc}: it must be {SECRET_PREFIX!r} and the base64 of "
                    f"{MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} random bytes; {_MAKE_ONE}"
                ) from None
        return cls(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"WebhookSecrets(<{len(self._keys)} redacted>)"

    def sign(self, msg_id: str, timestamp: int, body: bytes) -> str:
        """The ``webhook-signature`` header value: one signature per secret."""
        # The spec: the id must not contain '.', or 'a.b' + '.c' and 'a' + '.b.c' would sign the
        # same bytes; the ids here are the gateway's own ('msg_' and a job id).
        if "." in msg_id or not msg_id:
            raise ValueError("a webhook id must be non-empty and contain no '.'")
        return " ".join(signature(key, msg_id, timestamp, body) for key in self._keys)


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    tolerance: float = TOLERANCE,
) -> str:
    """What a receiver does with a delivery (spec: "Verifying signatures"): the three headers
    present, the timestamp within ``tolerance`` seconds of ``now``, and one of the
    ``webhook-signature`` entries equal, in constant time, to the signature under ``secret``.
    Returns the ``webhook-id`` (the receiver's idempotency key); VerificationError otherwise."""
    lowered = {name.lower(): value for name, value in headers.items()}
    msg_id = lowered.get("webhook-id", "")
    stamp = lowered.get("webhook-timestamp", "")
    signatures = lowered.get("webhook-signature", "")
    if not (msg_id and stamp and signatures):
        raise VerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    if not stamp.isascii() or not stamp.isdigit():
        raise VerificationError("webhook-timestamp is not Unix seconds")
    timestamp = int(stamp)
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise VerificationError("webhook-timestamp is outside the tolerance (a replay?)")
    expected = signature(_secret_bytes(secret), msg_id, timestamp, body).encode()
    # Constant-time compares: a plain == returns sooner the sooner bytes differ, which lets a
    # forger find a valid signature byte by byte (spec: "Verifying signatures").
    matched = False
    for entry in signatures.split():
        matched |= hmac.compare_digest(expected, entry.encode())
    if not matched:
        raise VerificationError("no webhook-signature entry matches")
    return msg_id
