"""Where a key's jobs may send webhooks: the key's ``webhook_hosts`` as a policy (SSRF).

A webhook URL is the client's to choose, and the gateway calls it from inside the operator's
network, so without a rule a client could make the gateway POST to the cloud metadata address,
to a database's HTTP port or to any other internal service (server-side request forgery; the
Standard Webhooks specification, "Server side request forgery (SSRF)", asks the sender to keep
webhooks out of internal networks). The rule has two halves:

* ``WebhookHosts.check_url``, at submission and again before each attempt: the URL's scheme,
  credentials, host and port against the entries; an IP literal host is checked against the
  address rule here, because it is never resolved.
* ``WebhookHosts.check_address``, at connect time, for every address a host name resolves to
  (``gateway.jobs.webhooks`` resolves once, checks, and connects to those addresses only, so a
  second DNS answer cannot swap in another address: DNS rebinding).

The address rule: a public address is reached through any entry that allows the host. An
address that is not public (private, loopback, link-local with the metadata address
169.254.169.254, shared CGNAT space, multicast, unspecified, reserved; an IPv6 form that embeds
an IPv4 address is judged by that address) is reached only when an entry names that address or a
network containing it, or names the URL's host name exactly: never through ``*`` or a
``*.example.com`` pattern, which a client's own DNS records could point anywhere.

Plain ``http`` goes only to hosts an entry names exactly (a name, or one address): a client
cannot turn a wildcard entry into unencrypted traffic to hosts nobody listed (Standard Webhooks,
"Enforcing HTTPS").
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from yarl import URL

__all__ = [
    "MAX_URL_LENGTH",
    "EntryKind",
    "HostEntry",
    "IPAddress",
    "WebhookHosts",
    "address_kind",
    "parse_entry",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Browsers and most servers handle 2,000-odd characters; a longer webhook URL is more likely a
# payload smuggled into a query string than an endpoint.
MAX_URL_LENGTH = 2048

# A DNS name as the URL carries it after IDNA (yarl's raw_host): labels of letters, digits, '-'
# and '_' (underscores appear in internal names; RFC 1035 letters-digits-hyphen is the public
# rule), at most 63 characters each and 253 in all (RFC 1035 §2.3.4).
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")

# IPv6 prefixes that embed an IPv4 address (their own is_global says little of where a packet
# goes): NAT64's well-known prefix (RFC 6052 §2.1) ends in the IPv4 address; NAT64 local-use
# (RFC 8215) is translated by a local gateway to anything, so it is never public.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
# IPv4-compatible addresses (::a.b.c.d, RFC 4291 §2.5.5.1, deprecated): in ::/8, never public.
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # CGNAT shared space (RFC 6598)
_METADATA = ipaddress.IPv4Address("169.254.169.254")  # AWS, GCP, Azure, OpenStack metadata

_DEFAULT_PORTS = {"http": 80, "https": 443}


class EntryKind(Enum):
    ANY = "any"  # '*'
    WILDCARD = "wildcard"  # '*.example.com': any name below example.com
    NAME = "name"  # 'hooks.example.com': that name exactly
    NETWORK = "network"  # '10.0.0.0/8' or one address '10.1.2.3' (a network of one)


@dataclass(frozen=True, slots=True)
class HostEntry:
    """One entry of ``webhook_hosts``, parsed. ``port`` None: any port."""

    text: str
    kind: EntryKind
    port: int | None
    name: str | None = None  # NAME: the name; WILDCARD: the suffix, with its leading dot
    network: IPNetwork | None = None

    def allows_port(self, port: int) -> bool:
        return self.port is None or self.port == port

    def names_host(self, host: str) -> bool:
        """Whether the entry names this host name exactly (the normalised URL host)."""
        return self.kind is EntryKind.NAME and self.name == host

    def names_address(self, address: IPAddress) -> bool:
        """Whether the entry is this one address (a network of one)."""
        network = self.network
        return (
            network is not None
            and network.num_addresses == 1
            and any(form == network.network_address for form in _forms(address))
        )

    def contains(self, address: IPAddress) -> bool:
        network = self.network
        return network is not None and any(
            form.version == network.version and form in network for form in _forms(address)
        )

    def allows_host(self, host: str, address: IPAddress | None) -> bool:
        """Whether the entry lets the URL name this host (the address rule aside)."""
        if self.kind is EntryKind.ANY:
            return True
        if address is not None:
            return self.contains(address)
        if self.kind is EntryKind.NAME:
            return self.name == host
        if self.kind is EntryKind.WILDCARD:
            suffix = self.name
            return suffix is not None and host.endswith(suffix) and len(host) > len(suffix)
        return False


def parse_entry(text: str) -> HostEntry:
    """One ``webhook_hosts`` entry; ValueError says why it is malformed (without the entry,
    which the caller names)."""
    if not isinstance(text, str):
        raise ValueError("must be a string")
    raw = text.strip()
    if raw != text or not raw:
        raise ValueError("must be a host, '*.domain', an address or a network, without spaces")
    if "://" in raw:
        raise ValueError("is a URL; give the host only (and an optional ':port')")
    if any(char in raw for char in "@?#") or (raw.count("/") > 1):
        raise ValueError("must be a host or network only (no path, user or query)")
    host, port = _split_port(raw)
    # An IPv6 address or network (bare, or bracketed as in a URL).
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError("has an unclosed '[': write IPv6 as '[2001:db8::1]:443'")
        return HostEntry(text, EntryKind.NETWORK, port, network=_network(host[1:-1], 6))
    if ":" in host:
        return HostEntry(text, EntryKind.NETWORK, port, network=_network(host, 6))
    if "/" in host and not _looks_numeric(host.partition("/")[0]):
        raise ValueError("must be a host or network only (no path)")
    if "/" in host or _looks_numeric(host):
        return HostEntry(text, EntryKind.NETWORK, port, network=_network(host, 4))
    if host == "*":
        return HostEntry(text, EntryKind.ANY, port)
    if host.startswith("*."):
        suffix = _name(host[2:])
        return HostEntry(text, EntryKind.WILDCARD, port, name="." + suffix)
    if "*" in host:
        raise ValueError("'*' may only be the whole entry or its first label ('*.example.com')")
    return HostEntry(text, EntryKind.NAME, port, name=_name(host))


def _split_port(raw: str) -> tuple[str, int | None]:
    if raw.startswith("["):
        close = raw.find("]")
        if close < 0:
            return raw, None
        rest = raw[close + 1 :]
        if not rest:
            return raw, None
        if not rest.startswith(":"):
            raise ValueError("has text after ']' that is not ':port'")
        return raw[: close + 1], _port(rest[1:])
    if raw.count(":") == 1:
        host, _, port = raw.partition(":")
        return host, _port(port)
    return raw, None  # no port, or a bare IPv6 address (which cannot carry one)


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"port {text!r} is not a number from 1 to 65535")
    return int(text)


def _looks_numeric(host: str) -> bool:
    # What resolvers read as an IPv4 address (inet_aton's forms such as '127.1' included).
    return host.replace(".", "").isdigit()


def _network(text: str, version: int) -> IPNetwork:
    if "%" in text:
        raise ValueError("must not carry an IPv6 zone ('%...')")
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            loose = ipaddress.ip_network(text, strict=False)
            raise ValueError(f"has host bits set; did you mean '{loose}'?") from None
        kind = "an IPv6" if version == 6 else "an IPv4"
        raise ValueError(f"is not {kind} address or network (a canonical one)") from None
    return network


def _name(host: str) -> str:
    try:
        ascii_host = URL.build(scheme="https", host=host).raw_host
    except (ValueError, UnicodeError):
        ascii_host = None
    if not ascii_host:
        raise ValueError("is not a valid host name")
    normal = ascii_host.lower().removesuffix(".")
    if not _valid_name(normal):
        raise ValueError(
            "is not a valid host name (labels of letters, digits, '-' and '_', joined by '.')"
        )
    return normal


def _valid_name(host: str) -> bool:
    labels = host.split(".")
    return (
        0 < len(host) <= 253
        and all(_LABEL.match(label) for label in labels)
        and not _looks_numeric(host)
    )


def _forms(address: IPAddress) -> tuple[IPAddress, ...]:
    """The address and the IPv4 address it embeds, if any (the one a packet would reach)."""
    embedded = _embedded(address)
    return (address,) if embedded is None else (address, embedded)


def _embedded(address: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:  # ::ffff:a.b.c.d (RFC 4291 §2.5.5.2)
        return address.ipv4_mapped
    if address.sixtofour is not None:  # 2002:aabb:ccdd:: (6to4, RFC 3056)
        return address.sixtofour
    if address in _NAT64 or address in _IPV4_COMPATIBLE:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_kind(address: IPAddress) -> str | None:
    """None for a public address; otherwise what kind of address it is ("a loopback address").

    ``is_global`` alone is not enough on Python 3.11: it calls multicast, site-local fec0::/10
    and NAT64 forms of internal addresses global; each is tested here by name first."""
    # :: and ::1 lie in the IPv4-compatible range but are IPv6's own unspecified and loopback.
    if address.version == 6 and int(address) <= 1:
        return "a loopback address" if int(address) else "an unspecified address"
    embedded = _embedded(address)
    if embedded is not None:
        inner = address_kind(embedded)
        if isinstance(address, ipaddress.IPv6Address) and address in _IPV4_COMPATIBLE:
            return f"a deprecated IPv4-compatible IPv6 form of {embedded}"
        if inner is not None:
            return f"{inner} in an IPv6 form ({embedded})"
        return None
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address == _METADATA:
        return "a link-local address (the cloud metadata service)"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED:
        return "a shared (carrier-grade NAT) address"
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_site_local:
            return "a site-local address"
        if address in _NAT64_LOCAL:
            return "a local-use NAT64 address"
    if address.is_reserved:
        return "a reserved address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "a reserved (special-purpose) address"
    return None


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class WebhookHosts:
    """A key's ``webhook_hosts``, parsed once (the config validated every entry already)."""

    __slots__ = ("entries",)

    def __init__(self, entries: Iterable[HostEntry]) -> None:
        self.entries: tuple[HostEntry, ...] = tuple(entries)

    @classmethod
    def parse(cls, texts: Iterable[str]) -> WebhookHosts:
        """ValueError names the first malformed entry and why."""
        entries = []
        for index, text in enumerate(texts):
            try:
                entries.append(parse_entry(text))
            except ValueError as exc:
                raise ValueError(f"entry {index} ({text!r}) {exc}") from None
        return cls(entries)

    def __repr__(self) -> str:
        return f"WebhookHosts({[entry.text for entry in self.entries]!r})"

    def check_url(self, url: str) -> str | None:
        """Why the key's jobs may not call ``url``, or None if they may (the host's resolved
        addresses are checked again when connecting). The message never repeats the URL's
        query string, which may carry a token."""
        if not self.entries:
            return "webhooks are off for this key (its webhook_hosts is empty)"
        if len(url) > MAX_URL_LENGTH:
            return f"the webhook URL is longer than {MAX_URL_LENGTH} characters"
        try:
            parsed = URL(url)
        except Exception:
            # yarl raises more than ValueError on some malformed input ('https://[]@' is an
            # IndexError): whatever it is, the URL is refused, never a 500.
            return "the webhook URL is not a valid URL"
        scheme = parsed.scheme
        if scheme not in _DEFAULT_PORTS:
            return "the webhook URL must start with https:// (or http://)"
        # Credentials in the URL would be sent as Basic authorization by the client library;
        # they are refused rather than kept in a job record (and a '@' hides the real host
        # from a reader: 'https://trusted.example@evil.example/').
        if "@" in (parsed.raw_authority or ""):
            return "the webhook URL must not carry a user or password ('user@')"
        raw_host = parsed.raw_host
        if not raw_host:
            return "the webhook URL has no host"
        port = parsed.port or _DEFAULT_PORTS[scheme]
        if parsed.explicit_port == 0:
            return "the webhook URL's port must be 1 to 65535"
        if "%" in raw_host:
            return "the webhook URL must not name an IPv6 zone ('%...')"
        host = raw_host.lower().removesuffix(".")
        address = _ip_literal(host)
        if address is None:
            if _looks_numeric(host) or ":" in host:
                # '127.1', '2130706433': resolvers read them as IPv4 addresses, and a host
                # check reading them as names would be fooled.
                return f"the webhook URL's host {host!r} is not a canonical IP address"
            if not _valid_name(host):
                return f"the webhook URL's host {host!r} is not a valid host name"
        shown = f"[{host}]" if ":" in host else host
        allowing = [e for e in self.entries if e.allows_port(port) and e.allows_host(host, address)]
        if not allowing:
            return f"{shown}:{port} is not in this key's webhook_hosts"
        if scheme == "http" and not any(
            e.names_host(host) if address is None else e.names_address(address) for e in allowing
        ):
            return (
                f"plain http is allowed only to a host webhook_hosts names exactly; "
                f"use https for {shown}"
            )
        if address is not None:
            return self.check_address(host, port, address)
        return None

    def check_address(self, host: str, port: int, address: IPAddress) -> str | None:
        """Why ``host`` (the URL's normalised host) may not be reached at ``address``, or None
        if it may. Called for every address the host resolves to, and for an IP literal."""
        kind = address_kind(address)
        if kind is None:
            return None
        for entry in self.entries:
            if entry.allows_port(port) and (entry.contains(address) or entry.names_host(host)):
                return None
        if host == str(address).lower():
            where = f"{address} is {kind}"
        else:
            where = f"{host} resolves to {address}, {kind}"
        return (
            f"refused: {where}; only an entry naming it or its network in the key's "
            "webhook_hosts allows it (never '*' or a '*.' pattern)"
        )
