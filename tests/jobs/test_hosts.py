"""webhook_hosts: which URLs a key's jobs may call back, and which addresses (SSRF).

The sender's own behaviour against a real receiver is in test_webhooks.py; here the rule
itself, and the config's errors for a malformed entry.
"""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

from gateway.config.model import ApiKey
from gateway.jobs.hosts import EntryKind, WebhookHosts, address_kind, parse_entry

HASH = "sha256:" + "0" * 64


def hosts(*entries: str) -> WebhookHosts:
    return WebhookHosts.parse(entries)


def refused(rule: WebhookHosts, url: str) -> str:
    problem = rule.check_url(url)
    assert problem is not None, f"{url} was allowed"
    return problem


# -- the address rule --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),  # is_global says True on Python 3.11
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("198.18.0.1", "private"),  # benchmarking
        ("192.0.2.1", "private"),  # documentation
        ("2001:db8::1", "private"),
        ("fec0::1", "site-local"),  # is_global says True on Python 3.11
        # IPv6 forms of an IPv4 address are judged by that address.
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "metadata"),
        ("64:ff9b::7f00:1", "loopback"),  # NAT64 (RFC 6052)
        ("2002:7f00:1::", "loopback"),  # 6to4 (RFC 3056)
        ("2002:a00:1::1", "private"),
        ("64:ff9b:1::1", "NAT64"),  # local-use NAT64 (RFC 8215)
        ("::127.0.0.1", "IPv4-compatible"),
        ("::8.8.8.8", "IPv4-compatible"),
    ],
)
def test_internal_addresses_are_named_by_kind(address: str, kind: str) -> None:
    found = address_kind(ipaddress.ip_address(address))
    assert found is not None
    assert kind in found


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"],
)
def test_public_addresses_are_public(address: str) -> None:
    assert address_kind(ipaddress.ip_address(address)) is None


# -- SSRF at submission ------------------------------------------------------------------------


def test_the_metadata_address_is_refused() -> None:
    for url in (
        "https://169.254.169.254/latest/meta-data/",
        "https://[::ffff:169.254.169.254]/latest/meta-data/",
        "https://[::ffff:a9fe:a9fe]/",
    ):
        problem = refused(hosts("*"), url)
        assert "cloud metadata" in problem
        assert "never '*'" in problem
        # A wildcard or an unrelated entry does not reach it either.
        assert refused(hosts("*.example.com", "10.0.0.0/8"), url)


def test_loopback_through_star_is_refused() -> None:
    for url in ("https://127.0.0.1/", "https://127.0.0.1:8080/hook", "https://[::1]/"):
        assert "loopback" in refused(hosts("*"), url)


def test_an_ipv4_mapped_ipv6_loopback_is_refused() -> None:
    for url in (
        "https://[::ffff:127.0.0.1]/",
        "https://[::ffff:7f00:1]/",
        "https://[64:ff9b::127.0.0.1]/",
        "https://[2002:7f00:1::1]/",
        "https://[::127.0.0.1]/",
    ):
        assert "IPv" in refused(hosts("*"), url)


def test_numeric_forms_a_resolver_would_read_as_an_address_are_refused() -> None:
    # inet_aton reads '127.1' and '2130706433' as 127.0.0.1; a check that took them for names
    # would let '*' reach loopback.
    for url in ("https://127.1/", "https://2130706433/", "https://0177.0.0.1/"):
        assert "canonical" in refused(hosts("*"), url)


def test_an_explicitly_listed_address_is_allowed() -> None:
    assert hosts("127.0.0.1").check_url("https://127.0.0.1:9000/hook") is None
    assert hosts("127.0.0.1:9000").check_url("http://127.0.0.1:9000/hook") is None
    assert hosts("10.0.0.0/8").check_url("https://10.20.30.40/hook") is None
    assert hosts("169.254.169.254").check_url("https://169.254.169.254/") is None
    assert hosts("[::1]:8443").check_url("https://[::1]:8443/") is None
    # The listed IPv4 address in its IPv6-mapped form is the same destination.
    assert hosts("127.0.0.1").check_url("https://[::ffff:127.0.0.1]/") is None
    # The port counts when the entry names one.
    assert "not in this key's webhook_hosts" in refused(
        hosts("127.0.0.1:9000"), "https://127.0.0.1:9001/"
    )
    # A listed network is no licence for an address outside it, even with '*' beside it.
    assert "private" in refused(hosts("*", "10.0.0.0/8"), "https://192.168.0.1/")


def test_an_internal_address_through_a_listed_name_is_checked_at_connect_time() -> None:
    rule = hosts("*", "*.example.com", "hooks.internal")
    loopback = ipaddress.ip_address("127.0.0.1")
    metadata = ipaddress.ip_address("169.254.169.254")
    # A name matched by '*' or a pattern: its addresses must be public.
    problem = rule.check_address("evil.example.net", 443, loopback)
    assert problem is not None
    assert "evil.example.net resolves to 127.0.0.1" in problem
    assert rule.check_address("a.example.com", 443, metadata) is not None
    assert rule.check_address("a.example.com", 443, ipaddress.ip_address("8.8.8.8")) is None
    # A name listed exactly: the admin vouches for where it points.
    assert rule.check_address("hooks.internal", 443, loopback) is None
    assert hosts("hooks.internal:8443").check_address("hooks.internal", 443, loopback) is not None


def test_plain_http_only_to_hosts_named_exactly() -> None:
    for rule, url in (
        (hosts("*"), "http://hooks.example.com/"),
        (hosts("*.example.com"), "http://hooks.example.com/"),
        (hosts("10.0.0.0/8"), "http://10.0.0.1/"),
        (hosts("*"), "http://8.8.8.8/"),
    ):
        assert "plain http" in refused(rule, url)
    assert hosts("hooks.example.com").check_url("http://hooks.example.com/") is None
    assert hosts("hooks.example.com:8080").check_url("http://hooks.example.com:8080/") is None
    assert hosts("HOOKS.example.com.").check_url("http://hooks.Example.COM./") is None
    assert hosts("10.0.0.1").check_url("http://10.0.0.1/") is None
    assert hosts("*", "*.example.com").check_url("https://hooks.example.com/") is None


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/", "must start with https://"),
        ("file:///etc/passwd", "must start with https://"),
        ("https://user:pass@example.com/", "user or password"),
        ("https://user@example.com/", "user or password"),
        ("https://trusted.example@evil.example/", "user or password"),
        ("https:///path", "no host"),
        ("https://" + "a" * 2100 + ".com/", "longer than 2048"),
        ("https://exa mple.com/", "not a valid host name"),
        ("https://[fe80::1%25eth0]/", "zone"),
        ("https://example.com:0/", "port"),
    ],
)
def test_malformed_urls_are_refused_with_why(url: str, message: str) -> None:
    assert message in refused(hosts("*"), url)


def test_host_names_and_patterns_match_as_written() -> None:
    rule = hosts("*.example.com", "hooks.example.org:8443")
    assert rule.check_url("https://a.example.com/") is None
    assert rule.check_url("https://a.b.example.com/") is None
    assert rule.check_url("https://example.com/") is not None  # the pattern is below the apex
    assert rule.check_url("https://badexample.com/") is not None
    assert rule.check_url("https://hooks.example.org:8443/") is None
    assert rule.check_url("https://hooks.example.org/") is not None  # port 443, not 8443
    assert hosts("bücher.example").check_url("https://xn--bcher-kva.example/") is None
    assert hosts("*:443").check_url("https://a.example.net/") is None
    assert hosts("*:443").check_url("https://a.example.net:8443/") is not None


def test_no_entries_turn_webhooks_off() -> None:
    assert "off" in refused(WebhookHosts.parse([]), "https://hooks.example.com/")


def test_a_refusal_never_repeats_the_query_string() -> None:
    problem = refused(hosts("hooks.example.com"), "https://other.example.com/h?token=s3cret")
    assert "s3cret" not in problem


# -- entries and the config's errors -----------------------------------------------------------


def test_entries_parse_into_their_kinds() -> None:
    with pytest.raises(ValueError, match="without spaces"):
        parse_entry(" hooks.example.com")  # the config strips it; the parser alone refuses
    assert parse_entry("*").kind is EntryKind.ANY
    assert parse_entry("*.example.com").kind is EntryKind.WILDCARD
    assert parse_entry("hooks.example.com:8443").port == 8443
    assert parse_entry("10.0.0.0/8").kind is EntryKind.NETWORK
    assert parse_entry("[2001:db8::1]:443").port == 443
    assert parse_entry("2001:db8::/32").kind is EntryKind.NETWORK
    assert parse_entry("[2001:db8::/32]").kind is EntryKind.NETWORK


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("10.0.0.1/8", "has host bits set; did you mean '10.0.0.0/8'?"),
        ("https://hooks.example.com", "is a URL; give the host only"),
        ("hooks.example.com/webhooks", "no path"),
        ("hooks.example.com:99999", "port '99999' is not a number from 1 to 65535"),
        ("hooks.example.com:http", "port 'http'"),
        ("a.*.example.com", "'*' may only be the whole entry or its first label"),
        ("*example.com", "'*' may only be"),
        ("", "without spaces"),
        ("hooks example.com", "not a valid host name"),
        ("127.1", "not an IPv4 address"),
        ("300.1.1.1", "not an IPv4 address"),
        ("[2001:db8::1", "unclosed '['"),
        ("2001:db8::zz", "not an IPv6 address"),
        ("user@hooks.example.com", "no path, user or query"),
    ],
)
def test_config_validator_names_the_entry_and_why(entry: str, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ApiKey.model_validate(
            {"name": "app", "hash": HASH, "webhook_hosts": ["hooks.example.net", entry]}
        )
    text = str(caught.value)
    assert "webhook_hosts" in text
    assert f"entry 1 ({entry!r})" in text
    assert message in text


def test_config_accepts_the_documented_forms() -> None:
    key = ApiKey.model_validate(
        {
            "name": "app",
            "hash": HASH,
            "webhook_hosts": [
                "*",
                "hooks.example.com",
                "*.example.org:8443",
                "10.0.0.0/8",
                "192.168.1.10:9000",
                "[fd00::1]:443",
                "fd00::/8",
            ],
        }
    )
    assert len(key.webhook_hosts) == 7
    assert ApiKey.model_validate({"name": "a", "hash": HASH}).webhook_hosts == ("*",)
    assert (
        ApiKey.model_validate({"name": "a", "hash": HASH, "webhook_hosts": []}).webhook_hosts == ()
    )
