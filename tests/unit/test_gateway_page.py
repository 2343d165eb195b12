"""The web app's HTTP surface without Kafka: the page and its assets, file text extraction,
and stream tokens refused where they do not belong."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.http.app import create_app
from gateway.http.auth import KeyStore, Principal, hash_key
from gateway.settings import GatewaySettings
from tests.pdfs import scanned_pdf, text_pdf

ALICE = {"Authorization": "Bearer key-alice"}


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    settings = GatewaySettings(keys_file=None, max_document_bytes=1_000)
    app = create_app(settings, keys=KeyStore([(hash_key("key-alice"), Principal("alice", "pro"))]))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        yield c


async def test_the_page_is_served_with_a_policy_that_forbids_inline_script(
    client: httpx.AsyncClient,
) -> None:
    r = await client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert '<label for="api-key">API key</label>' in r.text
    for asset, media in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        got = await client.get(f"/web/{asset}")
        assert got.status_code == 200 and got.headers["content-type"].startswith(media)
    assert (await client.get("/web/../settings.py")).status_code == 404
    assert (await client.get("/web/secret.txt")).status_code == 404


async def test_a_pdf_body_gives_its_text_and_a_scan_a_clear_422(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/documents/text",
        params={"name": "a.pdf"},
        content=text_pdf(["Hello there."]),
        headers=ALICE,
    )
    assert r.status_code == 200, r.text
    assert r.json()["text"] == "Hello there." and r.json()["pages"] == 1
    scan = await client.post(
        "/v1/documents/text", params={"name": "s.pdf"}, content=scanned_pdf(), headers=ALICE
    )
    assert scan.status_code == 422 and scan.json()["code"] == "no_text_layer"


async def test_document_text_needs_a_key_and_answers_413_beyond_the_limits(
    client: httpx.AsyncClient,
) -> None:
    url = "/v1/documents/text"
    assert (await client.post(url, content=b"hi")).status_code == 401
    # Text past the document limit (1,000 bytes here), and a body past the body limit.
    long_text = await client.post(url, content=b"word " * 400, headers=ALICE)
    assert long_text.status_code == 413 and long_text.json()["code"] == "input_too_large"
    huge = await client.post(url, content=b"x" * 200_000, headers=ALICE)
    assert huge.status_code == 413


async def test_a_bad_stream_token_is_401_on_the_events_route(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/summaries/01ABC/events", params={"token": "forged.token"})
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"
