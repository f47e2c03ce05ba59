"""Headless Chromium for tests that look at a page as a person would.

Uses the Debian packages ``chromium`` and ``chromium-driver`` (scripts/test.sh installs them)
through Selenium, with both paths given explicitly so that Selenium Manager is never asked to
find, let alone download, a browser or a driver (``SE_OFFLINE`` says the same to it, should
anything call it anyway).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def missing_browser() -> str | None:
    """Why headless Chromium cannot run here, or None when it can."""
    absent = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if absent:
        return (
            f"{' and '.join(absent)} missing: install the Debian packages chromium and "
            "chromium-driver (scripts/test.sh does)"
        )
    return None


@contextmanager
def headless_chromium(
    width: int = 1280, height: int = 900, *, bidi: bool = False
) -> Iterator[webdriver.Chrome]:
    """A fresh headless Chromium (own temporary profile, so no credentials carried over),
    with the browser console kept for ``console_errors``; quit on exit. ``bidi`` opens the
    WebDriver BiDi connection that ``driver.network`` needs (to answer an authentication
    challenge, say: headless Chromium has no dialog for it and waits)."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--metrics-recording-only",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.enable_bidi = bidi
    service = Service(executable_path=str(CHROMEDRIVER), env={**os.environ, "SE_OFFLINE": "true"})
    before = os.environ.get("SE_OFFLINE")
    os.environ["SE_OFFLINE"] = "true"
    try:
        driver = webdriver.Chrome(service=service, options=options)
    finally:
        if before is None:
            del os.environ["SE_OFFLINE"]
        else:
            os.environ["SE_OFFLINE"] = before
    try:
        driver.set_page_load_timeout(15)
        yield driver
    finally:
        driver.quit()


def console_errors(driver: webdriver.Chrome) -> list[str]:
    """The browser console's errors since the last call (CSP violations, uncaught exceptions,
    failed loads)."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [str(entry.get("message")) for entry in entries if entry.get("level") == "SEVERE"]


def cancel_credential_prompts(driver: webdriver.Chrome) -> list[object]:
    """From now on, answer every HTTP authentication challenge as a person who clicks Cancel
    on the browser's credentials dialog (headless Chromium has none and would wait); the list
    fills with the challenges answered. Needs ``headless_chromium(bidi=True)``."""
    challenges: list[object] = []

    def cancel(challenge: Any) -> None:
        challenges.append(challenge)
        challenge.cancel()

    # Selenium leaves the BiDi network handlers untyped.
    driver.network.add_authentication_handler(cancel)  # type: ignore[no-untyped-call]
    return challenges


def full_page_screenshot(driver: webdriver.Chrome, path: Path, width: int = 1280) -> Path:
    """The whole page at ``width`` CSS pixels, not just the first screenful, as a PNG."""
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": max(height, 400), "deviceScaleFactor": 1, "mobile": False},
    )
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return path


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG file; ValueError if it is not one."""
    head = path.read_bytes()[:24]
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG")
    width, height = struct.unpack(">II", head[16:24])
    return width, height
