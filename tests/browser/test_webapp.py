"""The web app under faults, in Debian's chromium: whatever happens mid-stream (offline, stop,
a gateway SIGKILLed, a 429 at submit, a reload), the text the page rendered is exactly the
``done`` summary, with no token missing or repeated.

Streams are slowed with the simulator's per-token delay so that a fault lands mid-stream; the
tests wait for conditions in the page ("N tokens rendered"), never for time. "Progress of a
long document" is not here: the pipeline has no progress events yet.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page

from pipeline.llm.extractive import summarize
from tests.browser.conftest import screenshot
from tests.e2e.documents import document
from tests.e2e.faults import sim_knobs
from tests.harness import Stack, auth, wait_http
from tests.pdfs import scanned_pdf, text_pdf

pytestmark = pytest.mark.e2e

WAIT_MS = 60_000
# Slow enough that a fault lands mid-stream: ~80 tokens at 40 ms is ~3 s of stream.
SLOW_TOKEN_MS = 40


def sign_in(page: Page, stack: Stack, key: str) -> None:
    page.goto(stack.gateway + "/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_selector("#app:not([hidden])", timeout=WAIT_MS)


def submit(page: Page, text: str) -> None:
    page.get_by_label("Paste text").fill(text)
    page.get_by_role("button", name="Summarize").click()


def wait_rendered(page: Page, tokens: int) -> None:
    """Until the page has rendered at least ``tokens`` tokens of the summary."""
    page.wait_for_function(
        "n => Number(document.getElementById('summary').dataset.renderedSeq || 0) >= n",
        arg=tokens,
        timeout=WAIT_MS,
    )


def wait_done(page: Page) -> dict[str, Any]:
    page.wait_for_function("window.sumstreamPage.status === 'done'", timeout=WAIT_MS)
    state: dict[str, Any] = page.evaluate(
        "({text: window.sumstreamPage.text, done: window.sumstreamPage.done,"
        " id: window.sumstreamPage.requestId, ttft: window.sumstreamPage.ttftMs,"
        " shown: document.getElementById('summary').innerText})"
    )
    return state


def assert_rendered_is_the_summary(state: dict[str, Any], stack: Stack, key: str) -> None:
    """The streamed text is the ``done`` summary, as the server keeps it, and the page shows it."""
    done = state["done"]
    assert state["text"].strip() == done["summary"]
    assert " ".join(state["shown"].split()) == " ".join(done["summary"].split())
    kept = httpx.get(f"{stack.gateway}/v1/summaries/{state['id']}", headers=auth(key), timeout=10)
    assert kept.json()["summary"] == done["summary"]


@contextmanager
def slow_stream(stack: Stack) -> Iterator[None]:
    with sim_knobs(stack, token_delay_ms=SLOW_TOKEN_MS):
        yield


def test_a_pasted_document_streams_in_and_shows_cost_usage_and_recent_requests(
    stack: Stack, page: Page
) -> None:
    page.goto(stack.gateway + "/")
    screenshot(page, "1-sign-in")
    sign_in(page, stack, "key-ann")
    doc = document(9100)
    with slow_stream(stack):
        submit(page, doc)
        wait_rendered(page, 10)
        screenshot(page, "2-streaming")
        state = wait_done(page)
    assert state["done"]["status"] == "COMPLETED"
    assert state["done"]["summary"] == summarize(doc, 1024).strip()
    assert_rendered_is_the_summary(state, stack, "key-ann")
    stats = page.locator("#request-stats").inner_text()
    assert f"{state['done']['usage']['output_tokens']} output tokens" in stats
    assert "$" in stats
    # The month's usage counts this request once the ledger has settled it.
    page.wait_for_function(
        "!document.getElementById('usage').innerText.includes(' 0 tokens')", timeout=WAIT_MS
    )
    recent = page.get_by_role("button", name=f"Reopen request {state['id']}")
    recent.wait_for(timeout=WAIT_MS)
    screenshot(page, "3-done")
    # Reopening a finished request reads it back from the log.
    page.get_by_label("Paste text").fill("")
    recent.click()
    reopened = wait_done(page)
    assert reopened["id"] == state["id"]
    assert reopened["text"].strip() == state["done"]["summary"]


def test_a_dropped_pdf_is_read_on_the_server_and_a_scan_is_refused_clearly(
    stack: Stack, page: Page
) -> None:
    sign_in(page, stack, "key-ben")
    lines = document(9200, sentences=12).split(". ")
    pdf = text_pdf([line.rstrip(".") + "." for line in lines])
    page.set_input_files(
        "#file",
        files=[{"name": "scan.pdf", "mimeType": "application/pdf", "buffer": scanned_pdf()}],
    )
    page.wait_for_function("document.getElementById('status').innerText.includes('no text layer')")
    screenshot(page, "4-scanned-pdf")
    page.set_input_files(
        "#file", files=[{"name": "report.pdf", "mimeType": "application/pdf", "buffer": pdf}]
    )
    page.wait_for_function(
        "document.getElementById('status').innerText.includes('Read report.pdf')"
    )
    extracted = page.get_by_label("Paste text").input_value()
    assert lines[0] in extracted
    page.get_by_role("button", name="Summarize").click()
    state = wait_done(page)
    assert state["done"]["status"] == "COMPLETED"
    assert_rendered_is_the_summary(state, stack, "key-ben")


def test_offline_and_back_mid_stream_resumes_from_the_last_rendered_token(
    stack: Stack, context: BrowserContext, page: Page
) -> None:
    sign_in(page, stack, "key-light-1")
    with slow_stream(stack):
        submit(page, document(9300))
        wait_rendered(page, 5)
        context.set_offline(True)
        page.wait_for_function("window.sumstreamPage.status === 'reconnecting'", timeout=WAIT_MS)
        seen = page.evaluate("window.sumstreamPage.lastSeq")
        screenshot(page, "5-offline")
        context.set_offline(False)
        state = wait_done(page)
    assert state["done"]["status"] == "COMPLETED"
    assert state["done"]["last_seq"] > seen
    assert_rendered_is_the_summary(state, stack, "key-light-1")


def test_stop_mid_stream_cancels_on_the_server_and_the_upstream_closes(
    stack: Stack, page: Page
) -> None:
    sign_in(page, stack, "key-light-2")
    with sim_knobs(stack, token_delay_ms=80):
        submit(page, document(9400))
        wait_rendered(page, 5)
        page.get_by_role("button", name="Stop").click()
        state = wait_done(page)
    screenshot(page, "6-stopped")
    done = state["done"]
    assert done["status"] == "CANCELLED"
    assert_rendered_is_the_summary(state, stack, "key-light-2")
    [upstream] = stack.sim_stats()["requests"][state["id"]]["streams"]
    assert upstream["ended"] == "client_closed"
    # Usage stopped growing: what was billed is what the closed upstream stream produced.
    assert done["usage"]["output_tokens"] <= upstream["tokens"] < 60


def test_a_gateway_killed_mid_stream_and_restarted_is_reconnected_to(
    stack: Stack, page: Page
) -> None:
    sign_in(page, stack, "key-light-3")
    gateway = next(p for p in stack.procs if p.name.startswith("gateway-"))
    with slow_stream(stack):
        submit(page, document(9500))
        wait_rendered(page, 5)
        gateway.kill9()
        page.wait_for_function("window.sumstreamPage.status === 'reconnecting'", timeout=WAIT_MS)
        gateway.start()
        wait_http(f"{stack.gateway}/readyz", gateway)
        state = wait_done(page)
    assert state["done"]["status"] == "COMPLETED"
    assert_rendered_is_the_summary(state, stack, "key-light-3")


def test_a_429_at_submit_shows_the_wait_and_retries_when_told(stack: Stack, page: Page) -> None:
    sign_in(page, stack, "key-light-4")
    with sim_knobs(stack, token_delay_ms=80):
        # The user's one request in flight, from another client: the page's submit is 429.
        blocker = httpx.post(
            f"{stack.gateway}/v1/summaries",
            json={"document": document(9600)},
            headers={**auth("key-light-4"), "Accept": "application/json"},
            timeout=10,
        )
        assert blocker.status_code == 202, blocker.text
        submit(page, document(9601))
        page.wait_for_function(
            "document.getElementById('status').innerText.includes('Retrying in')",
            timeout=WAIT_MS,
        )
        screenshot(page, "7-rate-limited")
        assert page.evaluate("window.sumstreamPage.requestId") is None
        url = f"{stack.gateway}/v1/summaries/{blocker.json()['id']}"
        assert httpx.delete(url, headers=auth("key-light-4"), timeout=10).status_code == 202
        state = wait_done(page)
    assert state["done"]["status"] == "COMPLETED"
    assert state["done"]["summary"] == summarize(document(9601), 1024).strip()
    assert_rendered_is_the_summary(state, stack, "key-light-4")


def test_a_tab_reloaded_mid_stream_reattaches_to_its_request(stack: Stack, page: Page) -> None:
    sign_in(page, stack, "key-light-5")
    with slow_stream(stack):
        submit(page, document(9700))
        wait_rendered(page, 5)
        request_id = page.evaluate("window.sumstreamPage.requestId")
        page.reload()
        state = wait_done(page)
    assert state["id"] == request_id
    assert state["done"]["status"] == "COMPLETED"
    assert_rendered_is_the_summary(state, stack, "key-light-5")


MARKDOWN = [
    # HTML in the summary is text, never markup.
    ("<img src=x onerror=alert(1)>", "<p>&lt;img src=x onerror=alert(1)&gt;</p>"),
    # Open syntax at the end is closed for the render: no raw ** or ` flashes.
    ("A **bold", "<p>A <strong>bold</strong></p>"),
    ("A **bold**", "<p>A <strong>bold</strong></p>"),
    ("A **bold** and `co", "<p>A <strong>bold</strong> and <code>co</code></p>"),
    ("Ends with *", "<p>Ends with</p>"),
    ("```\ncode <b>", "<pre><code>code &lt;b&gt;</code></pre>"),
    ("# Title\n- one\n- two", "<h3>Title</h3><ul><li>one</li><li>two</li></ul>"),
]


def test_markdown_is_escaped_and_open_syntax_never_shows_raw_markers(
    stack: Stack, page: Page
) -> None:
    page.goto(stack.gateway + "/")
    page.wait_for_function("typeof window.renderMarkdown === 'function'")
    rendered = page.evaluate(
        "cases => cases.map(t => window.renderMarkdown(t))", [t for t, _ in MARKDOWN]
    )
    assert rendered == [html for _, html in MARKDOWN]
