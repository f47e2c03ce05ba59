"""One target of an upstream as the relay uses it: its pool, the headers and query it adds, its
secrets, its health.

Built once per config snapshot (``gateway/upstream/group.py``) from the upstream's config, the
target's own settings over it, and the pool the snapshot holds for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote_plus, unquote_plus, urlencode

from gateway.config.model import Upstream, UpstreamAuth
from gateway.config.resilience import OutlierPolicy
from gateway.config.upstreams import Target
from gateway.upstream.health import TargetHealth
from gateway.upstream.seam import UpstreamClient


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    name: str  # the upstream's name (errors and logs say which upstream failed)
    config: Upstream
    client: UpstreamClient
    base_url: str
    # The upstream's credentials and static headers, added after the client's are filtered.
    added_headers: tuple[tuple[str, str], ...]
    extra_query: str
    append_forwarded_for: bool
    # Lower-cased names of added_headers: the client's headers of these names are dropped.
    added_names: frozenset[bytes]
    # Lower-cased names of the configured query parameters: the client's of these names are
    # dropped, however they are cased or percent-encoded.
    query_names: frozenset[str] = frozenset()
    # What must never reach a client (see _secrets), longest first; masked in response headers
    # and in non-streamed error bodies.
    secrets: tuple[bytes, ...] = ()
    # The target's own name, and what X-Gateway-Target says: the upstream's name when it has a
    # single target, "upstream/target" otherwise. Never its URL or key.
    target: str = "default"
    label: str = ""
    # ``label`` as the value of the response header that names the target.
    label_bytes: bytes = b""
    weight: float = 1.0
    # The upstream model name -> this target's name for it.
    models: Mapping[str, str] = field(default_factory=dict)
    health: TargetHealth = field(default_factory=lambda: TargetHealth("", "", OutlierPolicy()))

    def url(self, path: str, query_string: bytes) -> str:
        """``base_url`` + the route's upstream path + the client's query, unchanged."""
        url = self.base_url + path
        query = query_string.decode("latin-1")
        if self.extra_query:
            if query:
                # The configured parameters (api-version, ...) replace the client's own. Names
                # are compared decoded and case-insensitively: an upstream that reads
                # API-Version or api%2Dversion as api-version must not see the client's value
                # beside the configured one.
                names = self.query_names
                kept = [
                    pair
                    for pair in query.split("&")
                    if unquote_plus(pair.split("=", 1)[0]).lower() not in names
                ]
                query = "&".join([*kept, self.extra_query])
            else:
                query = self.extra_query
        return f"{url}?{query}" if query else url


def _auth_headers(auth: UpstreamAuth) -> list[tuple[str, str]]:
    key = auth.key.get_secret_value() if auth.key else ""
    if not key or auth.style == "none":
        return []
    if auth.style == "bearer":
        return [("authorization", f"Bearer {key}")]
    return [(auth.style, key)]


# Header and query names that carry credentials: their configured values are secrets.
_CREDENTIAL_NAMES = frozenset({"authorization", "proxy-authorization", "cookie"})
_CREDENTIAL_WORDS = ("key", "token", "secret", "auth", "password", "signature")
# Shorter values are not masked: a two-letter "secret" would mangle every body it appears in.
MIN_SECRET_CHARS = 4


def _is_credential(name: str) -> bool:
    name = name.lower()
    return name in _CREDENTIAL_NAMES or any(word in name for word in _CREDENTIAL_WORDS)


def _secrets(
    auth: UpstreamAuth, headers: Mapping[str, str], query: Mapping[str, str], more: Iterable[str]
) -> tuple[bytes, ...]:
    """The values an upstream's response must never carry to a client: its ``auth.key``, the
    configured header and query values whose names carry credentials, and ``more`` (the egress
    proxy's credentials). Computed once per snapshot; longest first, so a value containing
    another is masked whole."""
    found: set[str] = set(more)
    if auth.key is not None:
        found.add(auth.key.get_secret_value())
    for name, value in headers.items():
        if not _is_credential(name):
            continue
        found.add(value)
        lowered = name.lower()
        if lowered in ("authorization", "proxy-authorization"):
            # credentials = auth-scheme [ 1*SP ( token68 / #auth-param ) ] (RFC 9110 §11.4):
            # an echo may quote the credentials without the scheme.
            found.add(value.partition(" ")[2].strip())
        elif lowered == "cookie":
            # cookie-string = cookie-pair *( ";" SP cookie-pair ) (RFC 6265 §4.2.1)
            found.update(pair.partition("=")[2].strip() for pair in value.split(";"))
    for name, value in query.items():
        if _is_credential(name):
            found.update((value, quote_plus(value)))  # as given, and as it is in the URL
    encoded: set[bytes] = set()
    for value in found:
        if len(value) >= MIN_SECRET_CHARS:
            encoded.add(value.encode("utf-8"))
            if value.isascii():
                continue
            # Header values travel as latin-1 bytes (RFC 9110 §5.5).
            with contextlib.suppress(UnicodeEncodeError):
                encoded.add(value.encode("latin-1"))
    return tuple(sorted(encoded, key=lambda secret: (-len(secret), secret)))


def build_target(
    name: str,
    upstream: Upstream,
    client: UpstreamClient,
    target: Target | None = None,
    health: TargetHealth | None = None,
    more_secrets: Iterable[str] = (),
) -> UpstreamTarget:
    """``target`` defaults to the upstream's only one (its ``base_url``)."""
    if target is None:
        target = upstream.target_list()[0]
    auth = target.auth or upstream.auth
    headers = {**upstream.headers, **target.headers}
    query = {**upstream.query, **target.query}
    policy = upstream.forwarded_for
    if policy is None:
        # Third-party APIs (https) learn nothing about our clients; internal ones (plain http,
        # usually a cluster-local vLLM or Ollama) get the address for their own logs.
        policy = "strip" if target.base_url.startswith("https://") else "append"
    added = (*((k.lower(), v) for k, v in headers.items()), *_auth_headers(auth))
    target_name = target.name or "default"
    single = upstream.base_url is not None
    label = name if single else f"{name}/{target_name}"
    return UpstreamTarget(
        name=name,
        config=upstream,
        client=client,
        base_url=target.base_url,
        added_headers=added,
        added_names=frozenset(k.encode("latin-1") for k, _ in added),
        extra_query=urlencode(query),
        append_forwarded_for=policy == "append",
        query_names=frozenset(k.lower() for k in query),
        secrets=_secrets(auth, headers, query, more_secrets),
        target=target_name,
        label=label,
        label_bytes=label.encode("latin-1"),
        weight=target.weight,
        models=dict(target.models),
        health=health or TargetHealth(name, target_name, upstream.outlier),
    )
