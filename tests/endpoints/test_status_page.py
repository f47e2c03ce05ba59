"""The status page at /admin/status, as a person sees it in a real browser (issue #10).

A real gateway process with an admin key, a few requests through it (one that succeeds, one
whose upstream is down, one on a deprecated alias), then headless Chromium (the Debian packages,
driven by Selenium with their chromedriver; nothing downloads a browser) loads the page with the
admin key as HTTP Basic credentials and the test reads what is on the screen: the config
generation, each upstream and its state, the keys with their buckets, the routes with the
deprecated alias marked, the error. The page must update by itself after another request, show
a failed reload in red and say so when the key stops being accepted; it must never show a key, a
key hash or the upstream's secret. A full-page screenshot at 1280 px (and one at phone width) is
kept in the test's temporary folder.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from gateway.auth import hash_key
from tests.conftest import DEMO_KEY, NARROW_KEY, UPSTREAM_KEY, gateway_config
from tests.support.browser import (
    cancel_credential_prompts,
    console_errors,
    full_page_screenshot,
    headless_chromium,
    missing_browser,
    png_size,
)
from tests.support.fakeupstream import FakeUpstream
from tests.support.gatewayproc import GatewayProcess

pytestmark = pytest.mark.skipif(missing_browser() is not None, reason=str(missing_browser()))

ADMIN_KEY = "adm-status-page-0123456789"
OTHER_ADMIN_KEY = "adm-status-page-rotated-987"
ML_KEY = "sk-gw-test-ml-batch"
CHAT = {"model": "fast", "messages": [{"role": "user", "content": "hello"}]}


def _config(upstream: FakeUpstream, admin_key: str = ADMIN_KEY, *, broken: bool = False) -> str:
    # gateway_config ends with its keys list: the first lines here add a key (with a team) to it.
    extra = f"""  - name: ml-batch
    team: ml
    hash: {hash_key(ML_KEY)}
    limits: {{requests_per_minute: 120, tokens_per_minute: 20000, max_concurrent: 4}}
limits:
  default: {{requests_per_minute: 60, tokens_per_minute: 10000}}
  teams:
    ml: {{requests_per_minute: 300, budget: {{usd_per_month: 50}}}}
prices:
  models:
    gpt-4o-mini: {{input: 1, output: 2}}
admin:
  keys: [{{name: ops, hash: {hash_key(admin_key)}}}]
"""
    config = gateway_config(upstream.base_url, extra=extra)
    # Reloads only when the test asks (POST /admin/reload); stop without the drain delay.
    config = config.replace("server:\n", "server:\n  reload_interval: 0\n  drain_delay: 0\n", 1)
    assert "drain_delay" in config
    if broken:
        config = config.replace("upstream: down,", "upstream: nowhere,")
        assert "nowhere" in config
    return config


@pytest.fixture
def admin_gateway(upstream: FakeUpstream) -> Iterator[GatewayProcess]:
    with GatewayProcess(_config(upstream), env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as process:
        yield process


def _wait_for(what: str, check: Callable[[], bool], timeout: float) -> float:
    """Poll ``check`` until it holds; the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)
    return time.monotonic() - started


def _reload(gateway: GatewayProcess, config: str) -> dict[str, object]:
    gateway.config_path.write_text(config)
    answer = httpx.post(
        gateway.url + "/admin/reload", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    document: dict[str, object] = answer.json()
    return document


def test_status_page_in_a_browser(
    admin_gateway: GatewayProcess, upstream: FakeUpstream, tmp_path: Path
) -> None:
    with httpx.Client(base_url=admin_gateway.url, timeout=10) as client:
        _check_page(admin_gateway, upstream, client, tmp_path)


def _check_page(
    gateway: GatewayProcess, upstream: FakeUpstream, client: httpx.Client, tmp_path: Path
) -> None:
    demo = {"authorization": f"Bearer {DEMO_KEY}"}
    assert client.post("/v1/chat/completions", json=CHAT, headers=demo).status_code == 200
    # A model outside the model table, so the route's own upstream ('down': nothing listens).
    down = client.post("/down/chat/completions", json={**CHAT, "model": "gpt-x"}, headers=demo)
    assert down.status_code == 502
    down_id = down.headers["x-request-id"]
    ml = {"authorization": f"Bearer {ML_KEY}"}
    assert client.post("/openai/v1/chat/completions", json=CHAT, headers=ml).status_code == 200

    # Without the admin key the page is a 401 that makes a browser ask for it.
    refused = client.get("/admin/status")
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith('Basic realm="gateway admin"')
    served = client.get("/admin/status", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert served.status_code == 200
    assert served.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in served.headers["content-security-policy"]
    # Every URL in it is relative, so the page works under a path prefix (/llm/admin/status).
    absolute = re.compile(r"""(?:href|src|action)\s*=\s*["']?/|(?:fetch|URL)\(\s*["'`]/""")
    assert not absolute.search(served.text), "an absolute URL in the page"
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    pid = client.get("/admin/config", headers=admin).json()["pid"]

    host = gateway.url.removeprefix("http://")
    with headless_chromium(bidi=True) as driver:
        # No credentials: the browser shows the refusal, not the page.
        driver.get(gateway.url + "/admin/status")
        assert driver.title != "Gateway status"
        assert "Gateway status" not in driver.page_source
        console_errors(driver)  # the 401 is logged; start the console afresh

        driver.get(f"http://ops:{ADMIN_KEY}@{host}/admin/status")

        def text(css: str) -> str:
            """The rendered text of the element ``css`` names, looked up and read in one script
            run: the page rebuilds its sections every 5 s, so an element found by one WebDriver
            command may be gone by the next."""
            found = driver.execute_script(
                "const e = document.querySelector(arguments[0]); return e && e.innerText;", css
            )
            assert found is not None, f"nothing on the page matches {css}"
            return str(found)

        _wait_for("the first refresh", lambda: text("#updated").startswith("updated "), 10)
        assert driver.title == "Gateway status"

        # The header: ready, generation 1, the one worker, no reload error.
        assert text("#state") == "ready"
        assert text("#generation") == "1"
        assert f"pid {pid} · gen 1" in text("#workers")
        assert not driver.find_element("id", "reload-error").is_displayed()
        assert not driver.find_element("id", "problem").is_displayed()

        # Upstreams: the fake one answered, 'down' is failing to connect.
        fake_row = text('#upstreams tr[data-upstream="fake"]')
        assert "fake" in fake_row
        assert upstream.base_url.rsplit("/", 1)[0] in fake_row  # its origin, no path
        assert text('#upstreams tr[data-upstream="fake"] .state') == "ok"
        # Its one target, in service (docs/resilience.md).
        assert text('#upstreams tr[data-upstream="fake"] .targets') == "default: in service"
        assert text('#upstreams tr[data-upstream="fake"] .requests') == "2"
        assert re.search(r"\d+(\.\d+)? ms", fake_row), fake_row  # TTFB p50/p99
        assert text('#upstreams tr[data-upstream="down"] .state') == "failing"
        assert "connect" in text('#upstreams tr[data-upstream="down"]')

        # Recent errors: the failed request by id, route, key, status and kind.
        error_row = text(f'#errors tr[data-request-id="{down_id}"]')
        for seen in (down_id, "down", "demo", "502", "connect"):
            assert seen in error_row, error_row

        # Keys: each by name with its buckets as available / capacity, the team's too.
        demo_row = text('#keys tr[data-key="demo"]')
        assert re.search(r"key 'demo' · requests\s+\d+ / 60\b", demo_row), demo_row
        assert re.search(r"key 'demo' · tokens\s+[\d,]+ / 10,000\b", demo_row), demo_row
        assert "narrow" in text('#keys tr[data-key="narrow"]')
        ml_row = text('#keys tr[data-key="ml-batch"]')
        assert "team ml" in ml_row
        assert re.search(r"team 'ml' · requests\s+\d+ / 300\b", ml_row), ml_row
        assert "0 / 4" in text('#keys tr[data-key="ml-batch"] .in-flight')
        assert len(driver.find_elements("css selector", "#keys .bar")) == 7

        # Routes and aliases: the deprecated alias is marked, the other one is not.
        chat_row = text('#routes tr[data-route="chat"]')
        assert "/v1/chat/completions" in chat_row
        old = text('#routes [data-alias="/openai/v1/chat/completions"]')
        for seen in ("deprecated since 2026-01-01", "sunset 2027-06-30", "/v1/chat/completions"):
            assert seen in old, old
        assert "deprecated" not in text('#routes [data-alias="/chat/completions"]')
        assert "down" in text('#routes tr[data-route="down"]')

        # Usage and spend this month: 'fast' is gpt-4o-mini upstream, priced at $1/M input and
        # $2/M output; the fake reports 2 input and 5 output tokens for "hello": $0.000012.
        # demo's request to 'down' counts as a request (it was sent) with no tokens.
        assert text('#usage tr[data-usage-key="demo"] .requests') == "2"
        assert text('#usage tr[data-usage-key="demo"] .cost') == "$0.000012"
        ml_usage = text('#usage tr[data-usage-key="ml-batch"]')
        assert "team ml" in ml_usage
        assert "$0.000012" in ml_usage
        assert text('#usage tr[data-usage-team="ml"] .requests') == "1"
        assert text("#usage tr[data-usage-total] .cost") == "$0.000024"
        team_budget = text('#usage tr[data-budget="team:ml:month"]')
        assert "monthly" in team_budget
        assert "$0.000012 / $50.00" in team_budget
        assert "$49.999988" in text('#usage tr[data-budget="team:ml:month"] .remaining')
        assert "local store" in text("#usage .meta")

        # Limits: the local store, no Redis breaker, nothing degraded.
        limits = text("#limits")
        assert "local (per process)" in limits
        assert "none (no Redis)" in limits
        assert re.search(r"Degraded decisions\s+0\b", limits), limits

        # Jobs: in process here, nothing queued, webhooks off (no signing secret).
        jobs = text("#jobs")
        assert "in process (lost on restart)" in jobs
        assert re.search(r"Queued\s+0\b", jobs), jobs
        assert "off (no signing secret)" in jobs

        # Nothing secret anywhere in the document, script included.
        source = driver.page_source
        for secret in (ADMIN_KEY, DEMO_KEY, NARROW_KEY, ML_KEY, UPSTREAM_KEY):
            assert secret not in source
            assert hash_key(secret).removeprefix("sha256:") not in source
        assert "sha256:" not in source

        # It refreshes by itself: another request shows within one 5 s round.
        updated = text("#updated")
        assert client.post("/v1/chat/completions", json=CHAT, headers=demo).status_code == 200
        took = _wait_for(
            "the page to show the new request",
            lambda: text('#upstreams tr[data-upstream="fake"] .requests') == "3",
            6.5,
        )
        assert text("#updated") != updated
        print(f"\npage updated by itself {took:.1f} s after the request")

        screenshot = full_page_screenshot(driver, tmp_path / "status_page.png")
        width, height = png_size(screenshot)
        assert width == 1280
        assert height > 900
        assert screenshot.stat().st_size > 20_000
        print(f"screenshot: {screenshot} ({width}x{height})")

        # A phone: no sideways scrolling of the page itself.
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True},
        )
        try:
            page_width = driver.execute_script("return document.documentElement.scrollWidth")
            assert page_width <= 390, f"the page is {page_width} px wide on a 390 px phone"
        finally:
            driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        phone = full_page_screenshot(driver, tmp_path / "status_page_phone.png", width=390)
        print(f"phone screenshot: {phone}")

        # A reload that fails: shown in red, the old generation still serving.
        refused_reload = _reload(gateway, _config(upstream, broken=True))
        assert refused_reload["reloaded"] is False
        driver.find_element("id", "refresh-now").click()
        _wait_for(
            "the reload error",
            lambda: driver.find_element("id", "reload-error").is_displayed(),
            5,
        )
        reload_error = driver.find_element("id", "reload-error")
        assert "unknown upstream 'nowhere'" in reload_error.text
        assert "still serving generation 1" in reload_error.text
        assert "bad" in str(reload_error.get_attribute("class"))
        assert reload_error.value_of_css_property("color") == "rgba(179, 20, 31, 1)"

        # A reload that works: generation 2, the error gone.
        assert _reload(gateway, _config(upstream))["reloaded"] is True
        driver.find_element("id", "refresh-now").click()
        _wait_for("generation 2", lambda: text("#generation") == "2", 5)
        assert not driver.find_element("id", "reload-error").is_displayed()

        assert console_errors(driver) == []  # no CSP violation, no script error

        # The admin key is replaced: the browser asks for a key again (no dialog headless: it
        # would wait); the person cancels, and the page says its key is no longer accepted.
        assert _reload(gateway, _config(upstream, OTHER_ADMIN_KEY))["reloaded"] is True
        challenged = cancel_credential_prompts(driver)
        driver.find_element("id", "refresh-now").click()
        _wait_for("the 401 message", lambda: driver.find_element("id", "problem").is_displayed(), 5)
        assert "admin key was not accepted" in text("#problem")
        assert text("#updated").startswith("refresh failed at ")
        assert text("#generation") == "2"  # the last figures stay
        assert challenged, "the browser was not asked for credentials"
