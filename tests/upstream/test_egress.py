"""Which egress proxy a target uses (``gateway/upstream/egress.py``): the ``proxy`` setting,
the proxy variables of the environment by their common convention, and NO_PROXY.

Pure functions over a given environment: ``os.environ`` is never read or changed here. That
the chosen proxy carries requests (and that a NO_PROXY host goes direct) is shown on the wire
in ``transports/test_tunnel.py``.
"""

from __future__ import annotations

import base64

import pytest

from gateway.upstream.egress import EgressProxy, bypasses, proxy_for, proxy_secrets

PROXY = EgressProxy("proxy.corp", 3128)


def basic(userinfo: str) -> str:
    return "Basic " + base64.b64encode(userinfo.encode()).decode()


# -- The setting ---------------------------------------------------------------------------------

SETTINGS = [
    ("http://proxy.corp:3128", PROXY),
    ("http://proxy.corp:3128/", PROXY),
    ("http://PROXY.corp:3128", PROXY),
    ("http://proxy.corp", EgressProxy("proxy.corp", 80)),  # the http scheme's own port
    ("http://10.0.0.1:8080", EgressProxy("10.0.0.1", 8080)),
    ("http://[fd00::1]:3128", EgressProxy("fd00::1", 3128)),
    ("http://user:pass@proxy.corp:3128", EgressProxy("proxy.corp", 3128, basic("user:pass"))),
    # Userinfo is percent-decoded before it is encoded for Basic (RFC 3986 §3.2.1, RFC 7617).
    (
        "http://us%65r:p%40ss%3Aw%C3%B6rd@proxy.corp:3128",
        EgressProxy("proxy.corp", 3128, basic("user:p@ss:wörd")),
    ),
    ("http://user@proxy.corp:3128", EgressProxy("proxy.corp", 3128, basic("user:"))),
    ("http://:token@proxy.corp:3128", EgressProxy("proxy.corp", 3128, basic(":token"))),
]


@pytest.mark.parametrize(("setting", "expected"), SETTINGS, ids=[s for s, _ in SETTINGS])
def test_a_proxy_url_setting_is_used_for_every_target(setting: str, expected: EgressProxy) -> None:
    environment = {"NO_PROXY": "*", "HTTPS_PROXY": "http://other:1"}  # neither counts
    for target in ("https://api.example/v1", "http://10.1.2.3:8000/v1"):
        assert proxy_for(target, setting, environment) == expected


def test_none_connects_directly_whatever_the_environment_says() -> None:
    environment = {"HTTPS_PROXY": "http://proxy.corp:3128", "HTTP_PROXY": "http://p:1"}
    assert proxy_for("https://api.example/v1", "none", environment) is None
    assert proxy_for("http://api.example/v1", "none", environment) is None


# -- The environment -----------------------------------------------------------------------------

HTTPS_TARGET = "https://api.example/v1"
HTTP_TARGET = "http://vllm.internal:8000/v1"

ENVIRONMENTS = [
    ("nothing set", HTTPS_TARGET, {}, None),
    ("HTTPS_PROXY for https", HTTPS_TARGET, {"HTTPS_PROXY": "http://proxy.corp:3128"}, PROXY),
    ("https_proxy for https", HTTPS_TARGET, {"https_proxy": "http://proxy.corp:3128"}, PROXY),
    ("HTTP_PROXY is not for https", HTTPS_TARGET, {"HTTP_PROXY": "http://p:1"}, None),
    ("HTTP_PROXY for http", HTTP_TARGET, {"HTTP_PROXY": "http://proxy.corp:3128"}, PROXY),
    ("http_proxy for http", HTTP_TARGET, {"http_proxy": "http://proxy.corp:3128"}, PROXY),
    ("HTTPS_PROXY is not for http", HTTP_TARGET, {"HTTPS_PROXY": "http://p:1"}, None),
    (
        "lower case wins",
        HTTPS_TARGET,
        {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://proxy.corp:3128"},
        PROXY,
    ),
    (
        "an empty lower case one means no proxy",
        HTTPS_TARGET,
        {"HTTPS_PROXY": "http://upper:1", "https_proxy": ""},
        None,
    ),
    ("an empty one means no proxy", HTTPS_TARGET, {"HTTPS_PROXY": "  "}, None),
    ("a bare host:port is http", HTTPS_TARGET, {"HTTPS_PROXY": "proxy.corp:3128"}, PROXY),
    (
        "httpoxy: HTTP_PROXY ignored under CGI",
        HTTP_TARGET,
        {"HTTP_PROXY": "http://evil:1", "REQUEST_METHOD": "GET"},
        None,
    ),
    (
        "httpoxy: http_proxy still counts under CGI",
        HTTP_TARGET,
        {"http_proxy": "http://proxy.corp:3128", "REQUEST_METHOD": "GET"},
        PROXY,
    ),
    (
        "httpoxy: HTTPS_PROXY still counts under CGI",
        HTTPS_TARGET,
        {"HTTPS_PROXY": "http://proxy.corp:3128", "REQUEST_METHOD": "GET"},
        PROXY,
    ),
    (
        "loopback is proxied unless NO_PROXY says otherwise",
        "https://127.0.0.1:8443/v1",
        {"HTTPS_PROXY": "http://proxy.corp:3128"},
        PROXY,
    ),
    (
        "credentials in the variable",
        HTTPS_TARGET,
        {"HTTPS_PROXY": "http://u:p@proxy.corp:3128"},
        EgressProxy("proxy.corp", 3128, basic("u:p")),
    ),
]


@pytest.mark.parametrize(
    ("case", "target", "environment", "expected"),
    ENVIRONMENTS,
    ids=[case for case, *_ in ENVIRONMENTS],
)
def test_env_reads_the_proxy_variables_for_the_targets_scheme(
    case: str, target: str, environment: dict[str, str], expected: EgressProxy | None
) -> None:
    assert proxy_for(target, "env", environment) == expected


# -- NO_PROXY ------------------------------------------------------------------------------------

NO_PROXY = [
    # (NO_PROXY, target, goes direct)
    ("*", "https://api.example", True),
    (" * ", "https://api.example", True),
    ("", "https://api.example", False),
    ("api.example", "https://api.example", True),
    ("example", "https://api.example", True),  # a domain covers its subdomains
    (".example", "https://api.example", True),
    (".api.example", "https://api.example", True),  # and a leading dot the domain itself
    ("*.example", "https://api.example", True),
    ("example", "https://api.badexample", False),  # on a label boundary only
    ("pi.example", "https://api.example", False),
    ("API.Example.", "https://api.EXAMPLE./v1", True),  # case and a final dot do not matter
    ("other.example, api.example ,", "https://api.example", True),
    ("other.example,,third", "https://api.example", False),
    ("api.example:8443", "https://api.example:8443", True),
    ("api.example:8443", "https://api.example", False),  # the port is 443
    ("api.example:443", "https://api.example", True),
    ("api.example:80", "http://api.example", True),
    ("api.example:bad", "https://api.example", False),  # an entry nothing can match
    ("10.1.2.3", "http://10.1.2.3:8000", True),
    ("10.1.2.3", "http://10.1.2.30:8000", False),
    ("10.1.2.3:8000", "http://10.1.2.3:8000", True),
    ("10.1.2.3:9000", "http://10.1.2.3:8000", False),
    ("10.0.0.0/8", "http://10.1.2.3:8000", True),
    ("10.0.0.0/8", "http://11.1.2.3:8000", False),
    ("10.0.0.0/8", "http://ten.example:8000", False),  # names are not resolved
    ("10.0.0.0/8:8000", "http://10.1.2.3:8000", True),
    ("::1", "http://[::1]:8000", True),
    ("[::1]", "http://[::1]:8000", True),
    ("[::1]:8000", "http://[::1]:8000", True),
    ("[::1]:9000", "http://[::1]:8000", False),
    ("fd00::/8", "http://[fd12::5]:8000", True),
    ("fd00::/8", "http://[fe80::5]:8000", False),
    ("127.0.0.1", "http://localhost:8000", False),  # no resolution: the names differ
    ("localhost", "http://127.0.0.1:8000", False),
    ("not a/cidr", "http://10.1.2.3:8000", False),
]


@pytest.mark.parametrize(
    ("no_proxy", "target", "direct"), NO_PROXY, ids=[f"{n!r}-{t}" for n, t, _ in NO_PROXY]
)
def test_no_proxy_lists_what_goes_direct(no_proxy: str, target: str, direct: bool) -> None:
    scheme = "HTTPS_PROXY" if target.startswith("https") else "HTTP_PROXY"
    environment = {scheme: "http://proxy.corp:3128", "NO_PROXY": no_proxy}
    assert proxy_for(target, "env", environment) == (None if direct else PROXY)
    assert proxy_for(target, "env", {scheme: "http://proxy.corp:3128", "no_proxy": no_proxy}) == (
        None if direct else PROXY
    )


def test_the_lower_case_no_proxy_wins_over_the_upper_case_one() -> None:
    environment = {"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": "*", "no_proxy": "x.y"}
    assert proxy_for(HTTPS_TARGET, "env", environment) == PROXY
    assert bypasses("api.example", 443, "x.y, api.example")


# -- Refused proxies -----------------------------------------------------------------------------

REFUSED = [
    ("https:// proxy", "https://user:hunter22@proxy.corp:3128", "uses https://"),
    ("socks proxy", "socks5://user:hunter22@proxy.corp:1080", "uses socks5://"),
    ("socks5h proxy", "socks5h://proxy.corp:1080", "uses socks5h://"),
    ("a path", "http://user:hunter22@proxy.corp:3128/path", "without a path"),
    ("a query", "http://proxy.corp:3128/?x=hunter22", "without a path"),
    ("no host", "http://user:hunter22@:3128", "names no host"),
    ("a port that is no number", "http://user:hunter22", "a port that is not a number"),
    ("a port out of range", "http://proxy.corp:99999", "a port that is not a number"),
    ("a user name with ':'", "http://us%3Aer:hunter22@proxy.corp:1", "Basic auth cannot carry"),
]


@pytest.mark.parametrize(("case", "url", "reason"), REFUSED, ids=[c for c, *_ in REFUSED])
def test_a_proxy_that_is_not_plain_http_is_refused_without_quoting_its_url(
    case: str, url: str, reason: str
) -> None:
    with pytest.raises(ValueError, match=reason) as from_env:
        proxy_for(HTTPS_TARGET, "env", {"https_proxy": url})
    assert str(from_env.value).startswith("https_proxy ")
    with pytest.raises(ValueError, match=reason) as from_setting:
        proxy_for(HTTPS_TARGET, url, {})
    assert str(from_setting.value).startswith("the upstream's proxy ")
    for error in (from_env.value, from_setting.value):
        assert "hunter22" not in str(error)
        assert "proxy.corp" not in str(error)


def test_a_refused_proxy_in_the_environment_does_not_matter_for_a_no_proxy_target() -> None:
    environment = {"HTTPS_PROXY": "socks5://proxy.corp:1080", "NO_PROXY": "api.example"}
    assert proxy_for(HTTPS_TARGET, "env", environment) is None


# -- Secrets -------------------------------------------------------------------------------------


def test_proxy_secrets_are_the_authorization_its_token_and_the_password_as_written() -> None:
    proxy = proxy_for(HTTPS_TARGET, "http://gw:p%40ss-w0rd-123@proxy.corp:3128", {})
    token = base64.b64encode(b"gw:p@ss-w0rd-123").decode()
    assert proxy_secrets(proxy) == ("Basic " + token, token, "p@ss-w0rd-123", "p%40ss-w0rd-123")
    assert proxy_secrets(PROXY) == ()
    assert proxy_secrets(None) == ()


def test_the_proxys_repr_shows_no_credential() -> None:
    proxy = proxy_for(HTTPS_TARGET, "http://gw:hunter22@proxy.corp:3128", {})
    assert proxy is not None
    assert proxy.authorization is not None
    assert "hunter22" not in repr(proxy)
    assert proxy.authorization not in repr(proxy)
    assert repr(proxy) == "EgressProxy(host='proxy.corp', port=3128)"
