"""The web app in a real browser: Debian's chromium driven by Playwright, against a real stack.

One stack and one browser per module (CPU-frugal: two cores), a fresh context per test. The
browser is the `chromium` Debian package that scripts/bootstrap installs; Playwright's own
browser download is never used.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from tests.harness import REPO, Stack, running_stack

SECRET = "browser-stream-token-secret"
SCREENSHOTS = REPO / ".data" / "screenshots"


def chromium_path() -> str:
    """Debian's chromium (SUMSTREAM_CHROMIUM names another)."""
    path = os.environ.get("SUMSTREAM_CHROMIUM") or shutil.which("chromium")
    if path is None:
        pytest.fail("no chromium: run scripts/bootstrap (it installs Debian's chromium)")
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {
        "SUMSTREAM_STREAM_TOKEN_SECRET": SECRET,
        # Long enough that a page offline for a moment is not cancelled meanwhile.
        "SUMSTREAM_CANCEL_GRACE_S": "30",
        # One request in flight per user (0.125 x 8): a second one is 429 with Retry-After 1 s.
        "SUMSTREAM_MAX_INFLIGHT": "8",
        "SUMSTREAM_USER_INFLIGHT_SHARE": "0.125",
    }
    with running_stack(tmp_path_factory.mktemp("browser"), env=env) as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        # One renderer process at a time is plenty for these tests and spares the CPU.
        browser = p.chromium.launch(
            executable_path=chromium_path(),
            args=["--disable-gpu", "--renderer-process-limit=2", "--disable-extensions"],
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    # bypass_csp: the page forbids eval, which Playwright's wait_for_function uses.
    ctx = browser.new_context(viewport={"width": 1200, "height": 800}, bypass_csp=True)
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


def screenshot(page: Page, name: str) -> Path:
    """Save the page as .data/screenshots/<name>.png (kept after the run)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
