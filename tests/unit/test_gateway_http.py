"""The HTTP surface without Kafka: auth, validation and size limits answer problem+json
before anything is produced (the app's Kafka clients are never started here)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.http.app import create_app
from gateway.http.auth import KeyStore, Principal, hash_key
from gateway.settings import GatewaySettings
from pipeline.core.tiers import Tier, load_tiers

URL = "/v1/summaries"
ALICE = {"Authorization": "Bearer key-alice"}
FRED = {"Authorization": "Bearer key-fred"}  # free tier


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    settings = GatewaySettings(keys_file=None, dev_api_key="dev-key", max_document_bytes=1_000)
    tiers = dict(load_tiers())
    tiers["free"] = Tier("free", 10, 20_000, 50, 300, 1, 1.0, 30.0, "reject")
    keys = KeyStore(
        [
            (hash_key("key-alice"), Principal("alice", "pro")),
            (hash_key("key-fred"), Principal("fred", "free")),
            (hash_key("key-ghost"), Principal("ghost", "no-such-tier")),
        ]
    )
    app = create_app(settings, keys=keys, tiers=tiers)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        yield c


def assert_problem(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"].endswith(code)
    assert body["title"]
    assert body["detail"]


async def test_missing_key_is_401_with_a_bearer_challenge(client: httpx.AsyncClient) -> None:
    response = await client.post(URL, json={"document": "text"})
    assert_problem(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "header", ["Bearer wrong", "Basic a2V5LWFsaWNl", "Bearer", "key-alice", "Bearer  "]
)
async def test_bad_keys_are_401(client: httpx.AsyncClient, header: str) -> None:
    response = await client.post(URL, json={"document": "text"}, headers={"Authorization": header})
    assert_problem(response, 401, "unauthorized")


async def test_the_dev_key_from_settings_authenticates() -> None:
    settings = GatewaySettings(keys_file=None, dev_api_key="dev-key")
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        # Past auth and validation the request needs Kafka, which is not started here.
        ok = await client.post(
            URL, json={"document": "text"}, headers={"Authorization": "Bearer dev-key"}
        )
        assert_problem(ok, 503, "not_ready")
        bad = await client.post(
            URL, json={"document": "text"}, headers={"Authorization": "Bearer dev-kez"}
        )
        assert_problem(bad, 401, "unauthorized")


async def test_a_key_whose_tier_is_not_configured_is_refused(client: httpx.AsyncClient) -> None:
    response = await client.post(
        URL, json={"document": "text"}, headers={"Authorization": "Bearer key-ghost"}
    )
    assert_problem(response, 401, "unauthorized")
    assert "no-such-tier" not in response.text


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        URL, content=b'{"document": ', headers={**ALICE, "Content-Type": "application/json"}
    )
    assert_problem(response, 400, "malformed_request")


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        (b'{"document": "caf\xe9 \xff"}', "not valid UTF-8"),
        (b"[" * 30_000 + b"]" * 30_000, "nested too deeply"),
    ],
)
async def test_unparseable_bodies_are_400_saying_what_is_wrong(
    client: httpx.AsyncClient, content: bytes, detail: str
) -> None:
    response = await client.post(
        URL, content=content, headers={**ALICE, "Content-Type": "application/json"}
    )
    assert_problem(response, 400, "malformed_request")
    assert detail in response.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {"document": 12},
        {"document": ["a"]},
        {"document": "text", "max_output_tokens": "100"},
        {"document": "text", "max_output_tokens": 0},
        {"document": "text", "unknown": 1},
        {},
        [],
    ],
)
async def test_wrong_types_are_422(client: httpx.AsyncClient, body: object) -> None:
    response = await client.post(URL, json=body, headers=ALICE)
    assert_problem(response, 422, "invalid_request")
    assert response.json()["errors"]


async def test_an_empty_string_document_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post(URL, json={"document": ""}, headers=ALICE)
    assert_problem(response, 422, "invalid_request")


@pytest.mark.parametrize(
    "document", ["   \n\t ", "\x00" * 50, "\x01\x1f\x7f\x9f", "\u200b\u200d\u2060\ufeff", "\r\n"]
)
async def test_documents_that_normalise_to_nothing_are_422_empty_document(
    client: httpx.AsyncClient, document: str
) -> None:
    # Refused before admission: the app's Kafka clients are not even started here.
    response = await client.post(URL, json={"document": document}, headers=ALICE)
    assert_problem(response, 422, "empty_document")


async def test_validation_errors_never_echo_the_document(client: httpx.AsyncClient) -> None:
    secret = "confidential-text-" * 3
    response = await client.post(
        URL, json={"document": secret, "max_output_tokens": "x"}, headers=ALICE
    )
    assert_problem(response, 422, "invalid_request")
    assert "confidential" not in response.text


async def test_a_document_over_the_byte_limit_is_413(client: httpx.AsyncClient) -> None:
    # The body (about 1.5 KB) is within the body limit, the document is not.
    response = await client.post(URL, json={"document": "é" * 700}, headers=ALICE)
    assert_problem(response, 413, "input_too_large")


async def test_a_declared_content_length_over_the_limit_is_413_unread(
    client: httpx.AsyncClient,
) -> None:
    limit = GatewaySettings(max_document_bytes=1_000).max_body_bytes

    async def never_sent() -> AsyncIterator[bytes]:
        raise AssertionError("the body must not be read")
        yield b""  # pragma: no cover

    response = await client.post(
        URL,
        content=never_sent(),
        headers={**ALICE, "Content-Length": str(limit + 1), "Content-Type": "application/json"},
    )
    assert_problem(response, 413, "input_too_large")


async def test_a_chunked_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    limit = GatewaySettings(max_document_bytes=1_000).max_body_bytes

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"document": "'
        for _ in range(limit // 1_000 + 1):
            yield b"x" * 1_000
        yield b'"}'

    response = await client.post(
        URL, content=chunks(), headers={**ALICE, "Content-Type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert_problem(response, 413, "input_too_large")


async def test_over_the_tiers_input_tokens_is_413_when_the_tier_rejects(
    client: httpx.AsyncClient,
) -> None:
    document = " ".join(["word"] * 80)  # 80 tokens; the free tier here allows 50
    response = await client.post(URL, json={"document": document}, headers=FRED)
    assert_problem(response, 413, "input_too_large")
    # A tier that truncates lets the same document through (to Kafka, absent here).
    response = await client.post(URL, json={"document": document}, headers=ALICE)
    assert_problem(response, 503, "not_ready")


@pytest.mark.parametrize("model", ["claude-opus-4-1", "no-such-model", "x" * 200])
async def test_a_model_the_tier_does_not_list_is_422_naming_the_allowed_ones(
    client: httpx.AsyncClient, model: str
) -> None:
    response = await client.post(URL, json={"document": "text", "model": model}, headers=ALICE)
    assert_problem(response, 422, "model_not_allowed")
    assert response.json()["allowed_models"] == list(load_tiers()["pro"].models)
    assert model not in response.text or len(model) < 64  # a long name is not echoed whole


async def test_a_listed_model_passes_the_model_check(client: httpx.AsyncClient) -> None:
    body = {"document": "text", "model": "claude-sonnet-4-5"}
    response = await client.post(URL, json=body, headers=ALICE)
    # Past the model check the request needs Kafka, which is not started here.
    assert_problem(response, 503, "not_ready")


async def test_unknown_routes_and_methods_are_problems(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/nope"), 404, "not_found")
    assert_problem(await client.put(URL, headers=ALICE), 405, "method_not_allowed")


async def test_bad_last_event_id_is_422(client: httpx.AsyncClient) -> None:
    response = await client.get(
        "/v1/summaries/01J00000000000000000000000/events",
        headers={**ALICE, "Last-Event-ID": "abc"},
    )
    assert_problem(response, 422, "invalid_request")


async def test_openapi_documents_the_api(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert {
        "/v1/summaries",
        "/v1/summaries/{request_id}",
        "/v1/summaries/{request_id}/events",
    } <= set(spec["paths"])
    body = spec["paths"]["/v1/summaries"]["post"]["requestBody"]
    assert "SummaryIn" in str(body)
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    usage = spec["paths"]["/v1/usage"]["get"]
    assert "UsageOut" in str(usage["responses"]["200"])
    assert {"401", "503"} <= set(usage["responses"])
    assert {"429", "503"} <= set(spec["paths"]["/v1/summaries"]["post"]["responses"])


async def test_usage_needs_a_key_and_a_running_ledger(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/v1/usage"), 401, "unauthorized")
    assert_problem(await client.get("/v1/usage", headers=ALICE), 503, "not_ready")


async def test_healthz_and_metrics(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    metrics = await client.get("/metrics")
    assert "sumstream_gateway_requests_total" in metrics.text
    ready = await client.get("/readyz")
    assert_problem(ready, 503, "not_ready")
