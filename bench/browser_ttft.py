"""Time to first token as the web app measures it, at 1 and at 50 concurrent users.

``python -m bench.browser_ttft [--users 1 50] [--rounds 3] [--among 50]`` starts a stack on
the shared broker (the test harness's; simulator TTFT 200 ms and 10 ms a token, as ``make
bench``), opens one page per user in Debian's chromium (each its own tab and user), submits a
document from every page at once, and reads the page's own figure: ``performance.now()`` from
the submit to the first token rendered (``window.sumstreamPage.ttftMs``). With ``--among 50``
one page is measured while 49 other users stream over plain HTTP (50 tabs load a two-core
machine with 50 renderers, which the service does not see). These are figures, not a test:
the machine is shared and has two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import threading
import time
from pathlib import Path

import httpx
from playwright.sync_api import Browser, Page, sync_playwright

from gateway.http.auth import hash_key
from tests.e2e.documents import document
from tests.harness import REPO, Stack, collect, running_stack

SIM_TTFT_MS = 200
SIM_TOKEN_DELAY_MS = 10
MAX_OUTPUT_TOKENS = 60


def _keys_file(folder: Path, users: int) -> Path:
    entries = [
        {"sha256": hash_key(f"bench-key-{i}"), "user": f"bench-{i}", "tier": "enterprise"}
        for i in range(users)
    ]
    path = folder / "bench-keys.json"
    path.write_text(json.dumps({"keys": entries}))
    return path


def _open_page(browser: Browser, stack: Stack, user: int) -> Page:
    page = browser.new_context(bypass_csp=True).new_page()
    page.goto(stack.gateway + "/")
    page.get_by_label("API key").fill(f"bench-key-{user}")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_selector("#app:not([hidden])", timeout=60_000)
    return page


def _round(pages: list[Page], seed: int) -> list[float]:
    """Submit from every page at once; the TTFT each page measured."""
    for i, page in enumerate(pages):
        page.get_by_label("Paste text").fill(document(seed + i))
    # Clicks are dispatched without waiting for each other's effects: one JS call per page.
    for page in pages:
        page.evaluate("document.getElementById('summarize').click()")
    figures = []
    for page in pages:
        page.wait_for_function("window.sumstreamPage.status === 'done'", timeout=120_000)
        figures.append(float(page.evaluate("window.sumstreamPage.ttftMs")))
    return figures


def _round_among_others(page: Page, stack: Stack, others: int, seed: int) -> float:
    """One page's TTFT while ``others`` users stream at once over plain HTTP (SSE clients,
    which cost this machine far less than 49 more browser tabs)."""
    started = threading.Event()

    async def load() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            streams = [
                collect(
                    client,
                    "POST",
                    f"{stack.gateway}/v1/summaries",
                    json={"document": document(seed + u), "max_output_tokens": MAX_OUTPUT_TOKENS},
                    headers={"Authorization": f"Bearer bench-key-{u}"},
                )
                for u in range(1, others + 1)
            ]
            started.set()
            await asyncio.gather(*streams)

    thread = threading.Thread(target=asyncio.run, args=(load(),))
    thread.start()
    started.wait()
    [figure] = _round([page], seed)
    thread.join()
    return figure


def _summary(users: int, figures: list[float]) -> str:
    ordered = sorted(figures)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return (
        f"| {users} | {len(ordered)} | {statistics.median(ordered):.0f} | {pct(0.9):.0f} | "
        f"{pct(0.99):.0f} | {ordered[-1]:.0f} |"
    )


def _measure(args: argparse.Namespace, chromium: str, folder: Path) -> list[str]:
    """Start the stack and the browser, run the rounds, and give one table row per level."""
    env = {
        "SUMSTREAM_KEYS_FILE": str(_keys_file(folder, max([*args.users, args.among]))),
        "SUMSTREAM_STREAM_TOKEN_SECRET": "bench-browser-ttft",
    }
    rows = []
    with (
        running_stack(
            folder, env=env, ttft_ms=SIM_TTFT_MS, token_delay_ms=SIM_TOKEN_DELAY_MS
        ) as stack,
        sync_playwright() as p,
    ):
        browser = p.chromium.launch(executable_path=chromium, args=["--disable-gpu"])
        try:
            # A warm-up request: the first one pays for connections and schema loads.
            _round([_open_page(browser, stack, 0)], 0)
            if args.among:
                page = _open_page(browser, stack, 0)
                among = [
                    _round_among_others(page, stack, args.among - 1, 5000 + 100 * r)
                    for r in range(args.rounds)
                ]
                rows.append(_summary(args.among, among))
                args.users = []
            for users in args.users:
                pages = [_open_page(browser, stack, u) for u in range(users)]
                figures: list[float] = []
                for r in range(args.rounds):
                    figures += _round(pages, 1000 * (r + 1) + 100 * users)
                rows.append(_summary(users, figures))
                for page in pages:
                    page.context.close()
        finally:
            browser.close()
    # The processes have stopped: nothing is reading the topics any more.
    stack.remove_topics()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--among",
        type=int,
        default=0,
        help="instead: one page measured while this many other users stream over HTTP",
    )
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("no chromium: run scripts/bootstrap --browser")
    # Process logs stay behind for a look after the run, as make bench keeps its own.
    folder = REPO / ".data" / "browser-ttft" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    folder.mkdir(parents=True)
    rows = _measure(args, chromium, folder)
    stamp = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())
    print(f"browser TTFT (ms), simulator TTFT {SIM_TTFT_MS} ms; {stamp}")
    if args.among:
        print(f"one page measured, {args.among - 1} other users streaming over HTTP")
    print("| users | streams | p50 | p90 | p99 | max |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
