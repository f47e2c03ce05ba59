"""API keys: the presented key -> the principal it belongs to.

Keys are stored as ``sha256:<hex>`` hashes, so the config can be committed and read without
handing anyone a key. A request's key is hashed once and looked up in a dict; nothing ever logs
the key itself, and the principal carries only the key's name and an id derived from its hash.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gateway import errors
from gateway.config.model import AdminKey, ApiKey
from gateway.types import RawHeaders

KEY_PREFIX = "sk-gw-"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a configured key, and what it may use."""

    config: ApiKey
    key_id: str  # 16 hex chars of the hash: safe in logs and Redis keys
    all_routes: bool
    routes: frozenset[str]
    all_models: bool
    models: re.Pattern[str] | None

    @property
    def name(self) -> str:
        return self.config.name

    def may_use_route(self, route: str) -> bool:
        return self.all_routes or route in self.routes

    def may_use_model(self, model: str) -> bool:
        return self.all_models or (self.models is not None and self.models.match(model) is not None)


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh client key: 32 random bytes, URL-safe, with a recognisable prefix."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _principal(key: ApiKey, patterns: dict[tuple[str, ...], re.Pattern[str] | None]) -> Principal:
    """``patterns`` memoises the compiled model rule per model list: keys share lists, and
    compiling one costs ~25 us (10,000 keys: a quarter of a second on the event loop)."""
    if key.models not in patterns:
        listed = [p for p in key.models if p != "*"]
        combined = "|".join(f"(?:{fnmatch.translate(p)})" for p in listed)
        patterns[key.models] = re.compile(combined) if combined else None
    return Principal(
        config=key,
        key_id=key.hash.removeprefix("sha256:")[:16],
        all_routes="*" in key.routes,
        routes=frozenset(key.routes),
        all_models="*" in key.models,
        models=patterns[key.models],
    )


def presented_key(headers: RawHeaders) -> str | None:
    """The key from ``Authorization: Bearer``, ``x-api-key`` (Anthropic) or ``api-key`` (Azure)."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name in (b"x-api-key", b"api-key") and value.strip():
            return value.decode("latin-1").strip()
    return None


class KeyRing:
    """The configured keys, indexed by hash."""

    def __init__(self, keys: Iterable[ApiKey], previous: KeyRing | None = None) -> None:
        """``previous``: the ring of the config being replaced; a key that did not change
        keeps its principal, so a reload of many keys costs little on the event loop."""
        old: dict[str, Principal] = previous._by_hash if previous is not None else {}
        patterns: dict[tuple[str, ...], re.Pattern[str] | None] = {}
        by_hash: dict[str, Principal] = {}
        for key in keys:
            digest = key.hash.removeprefix("sha256:")
            kept = old.get(digest)
            by_hash[digest] = (
                kept if kept is not None and kept.config == key else _principal(key, patterns)
            )
        self._by_hash: dict[str, Principal] = by_hash
        self._by_name: dict[str, Principal] = {p.name: p for p in by_hash.values()}

    def __len__(self) -> int:
        return len(self._by_hash)

    def knows(self, key: str) -> bool:
        """Whether ``key`` is one of the configured client keys."""
        return hashlib.sha256(key.encode("utf-8")).hexdigest() in self._by_hash

    def named(self, name: str) -> Principal | None:
        """The key called ``name``: a job runs as the key that submitted it, by name."""
        return self._by_name.get(name)

    def authenticate(self, headers: RawHeaders) -> Principal:
        key = presented_key(headers)
        if key is None:
            raise errors.missing_key()
        principal = self._by_hash.get(hashlib.sha256(key.encode("utf-8")).hexdigest())
        if principal is None:
            raise errors.invalid_key()
        return principal


@dataclass(frozen=True, slots=True)
class AdminKeys:
    """The admin keys' SHA-256 digests, by digest -> name."""

    names: Mapping[str, str]

    def __bool__(self) -> bool:
        return bool(self.names)

    def identify(self, headers: RawHeaders) -> str | None:
        """The admin key's name, or None."""
        key = presented_key(headers) or basic_password(headers)
        if key is None:
            return None
        return self.names.get(hashlib.sha256(key.encode("utf-8")).hexdigest())


def basic_password(headers: RawHeaders) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() != "basic":
                return None
            try:
                decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None
            return decoded.partition(":")[2] or None
    return None


def admin_keys(keys: Iterable[AdminKey]) -> AdminKeys:
    return AdminKeys({key.hash.removeprefix("sha256:"): key.name for key in keys})
