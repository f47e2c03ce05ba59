"""Which egress proxy a target's connections go through, and the credentials they show it.

An upstream's ``proxy`` setting is ``none``, an ``http://[user:password@]host:port`` URL, or
``env`` (the default): the proxy variables of the environment, read by the convention most HTTP
clients share (no RFC defines them).

- ``https_proxy`` / ``HTTPS_PROXY`` for https targets, ``http_proxy`` / ``HTTP_PROXY`` for http
  ones. A lower-case variable that is set wins over its upper-case twin, even when empty (an
  empty one means "no proxy"), so a user can switch the proxy off for one command.
- ``HTTP_PROXY`` is ignored when ``REQUEST_METHOD`` is set: under CGI every request header
  ``Proxy: x`` becomes ``HTTP_PROXY=x``, so a client could pick our proxy ("httpoxy":
  CVE-2016-1000110 and its siblings). The lower-case ``http_proxy`` has no such twin and counts.
- ``no_proxy`` / ``NO_PROXY`` (same precedence) lists, comma-separated, what goes direct: ``*``
  (everything), a domain (``example.com`` and ``.example.com`` both cover example.com and every
  name under it), an IP address, a CIDR block (matched against IP literals only: nothing is
  resolved here), each optionally with ``:port``. Loopback gets no special treatment: a proxy on
  127.0.0.1 is used unless NO_PROXY says otherwise.

The gateway speaks to the proxy in plain HTTP/1.1: an https target through a ``CONNECT`` tunnel
(RFC 9110 §9.3.6) with TLS end to end, an http target with absolute-form request lines
(RFC 9112 §3.2.2). A proxy URL with userinfo becomes a ``Proxy-Authorization: Basic`` value
(RFC 7617). An https:// or socks proxy is refused with ``ValueError``; so is any other URL that
is not a plain http proxy. Messages name the variable or setting, never its value, which may
carry a password.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

__all__ = ["EgressProxy", "bypasses", "proxy_for", "proxy_secrets"]

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class EgressProxy:
    """An http proxy: where it listens and the ``Proxy-Authorization`` value it gets, if any."""

    host: str  # a name or an IP literal, without brackets
    port: int
    # "Basic base64(user:password)": kept out of repr, so logging the proxy shows no secret.
    authorization: str | None = field(default=None, repr=False)


def proxy_for(base_url: str, setting: str, environ: Mapping[str, str]) -> EgressProxy | None:
    """The proxy for the target at ``base_url`` under the upstream's ``proxy`` ``setting``;
    None to connect directly. ``environ`` is read only for ``env`` (pass ``os.environ``).

    Raises ``ValueError`` (a message fit for a config error) for a proxy URL that is not a
    plain http:// proxy."""
    if setting == "none":
        return None
    if setting != "env":
        return _parse(setting, "the upstream's proxy")
    parts = urlsplit(base_url)
    https = parts.scheme == "https"
    host = (parts.hostname or "").rstrip(".")
    port = parts.port or (443 if https else 80)
    names: tuple[str, ...] = (
        ("https_proxy", "HTTPS_PROXY") if https else ("http_proxy", "HTTP_PROXY")
    )
    if not https and "REQUEST_METHOD" in environ:
        names = ("http_proxy",)  # httpoxy: see the module's docstring
    found = _first_set(environ, names)
    if found is None or not found[1].strip():
        return None
    no_proxy = _first_set(environ, ("no_proxy", "NO_PROXY"))
    if no_proxy is not None and bypasses(host, port, no_proxy[1]):
        return None
    return _parse(found[1].strip(), found[0])


def proxy_secrets(proxy: EgressProxy | None) -> tuple[str, ...]:
    """The strings that give the proxy's credentials away, for the gateway to mask wherever it
    might show them: the ``Proxy-Authorization`` value, its base64 token alone (an echo may
    quote it without the scheme) and the password, as decoded and as percent-encoded."""
    if proxy is None or proxy.authorization is None:
        return ()
    token = proxy.authorization.partition(" ")[2]
    password = base64.b64decode(token).decode("utf-8").partition(":")[2]
    found = (proxy.authorization, token, password, quote(password, safe=""))
    return tuple(dict.fromkeys(secret for secret in found if secret))


def bypasses(host: str, port: int, no_proxy: str) -> bool:
    """Whether ``host:port`` is excluded from proxying by the ``no_proxy`` list."""
    host = host.lower()
    address = _address(host)
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        split = _split_entry(entry)
        if split is None:
            continue  # not an entry anything could match: skipped, the others still count
        name, entry_port = split
        if entry_port is not None and entry_port != port:
            continue
        if "/" in name:
            try:
                network = ipaddress.ip_network(name, strict=False)
            except ValueError:
                continue
            if address is not None and address in network:
                return True
            continue
        named_address = _address(name)
        if named_address is not None:
            if address == named_address:
                return True
            continue
        # A leading "." (or the "*." some write) covers the domain itself and its subdomains,
        # like a bare domain does: suffix matching on a label boundary only.
        name = name.removeprefix("*").removeprefix(".").rstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def _first_set(environ: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    for name in names:
        value = environ.get(name)
        if value is not None:
            return name, value
    return None


def _address(text: str) -> _Address | None:
    try:
        return ipaddress.ip_address(text.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None


def _split_entry(entry: str) -> tuple[str, int | None] | None:
    """A NO_PROXY entry as (host or CIDR, port or None); None when its port is not a number."""
    if entry.startswith("["):  # [IPv6] or [IPv6]:port
        end = entry.find("]")
        if end < 0:
            return None
        name, rest = entry[1:end], entry[end + 1 :]
        if not rest:
            return name, None
        if not rest.startswith(":") or not rest[1:].isdigit():
            return None
        return name, int(rest[1:])
    if entry.count(":") == 1:  # host:port; more colons is a bare IPv6 address or block
        name, _, port = entry.partition(":")
        return (name, int(port)) if port.isdigit() else None
    return entry, None


def _parse(url: str, source: str) -> EgressProxy:
    """``url`` as a proxy; ``source`` names where it came from in error messages."""
    if "://" not in url:
        url = "http://" + url  # a bare host:port, common in these variables, is an http proxy
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme != "http":
        raise ValueError(
            f"{source} uses {scheme}://; only http:// proxies are supported (https targets "
            "still get TLS end to end, through CONNECT)"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{source} must be http://[user:password@]host:port, without a path")
    try:
        port = parts.port or 80  # the http scheme's port (RFC 9110 §4.2.1)
    except ValueError:
        # urlsplit's own message quotes the text it could not read, which may be a password.
        raise ValueError(f"{source} has a port that is not a number from 1 to 65535") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"{source} names no host")
    authorization = None
    if parts.username or parts.password:
        user = unquote(parts.username or "")
        if ":" in user:
            raise ValueError(f"{source} has a user name with ':', which Basic auth cannot carry")
        password = unquote(parts.password or "")
        # RFC 7617 §2: base64 of user-id ":" password; §2.1: UTF-8 is the charset to use.
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        authorization = "Basic " + token
    return EgressProxy(host=host, port=port, authorization=authorization)
