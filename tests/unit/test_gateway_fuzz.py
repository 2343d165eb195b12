"""Fuzz the HTTP API from its own OpenAPI spec: whatever arrives, no 5xx but "not ready".

The app's Kafka side is not started here, so a request that passes every check ends in a
503 ``not_ready``; anything else of 500 or above is a bug.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from starlette.types import Receive, Scope, Send

from gateway.http.app import create_app
from gateway.http.auth import KeyStore, Principal, hash_key
from gateway.settings import GatewaySettings

app = create_app(
    GatewaySettings(keys_file=None, dev_api_key=None, max_document_bytes=4_096),
    keys=KeyStore([(hash_key("key-alice"), Principal("alice", "pro"))]),
)


async def without_kafka(scope: Scope, receive: Receive, send: Send) -> None:
    # Declining the lifespan scope keeps the app's Kafka clients from starting.
    if scope["type"] == "lifespan":
        raise NotImplementedError("no lifespan in this test")
    await app(scope, receive, send)


schema = schemathesis.openapi.from_asgi("/openapi.json", without_kafka)


@schema.parametrize()
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_no_server_errors(case: schemathesis.Case) -> None:
    for headers in ({"Authorization": "Bearer key-alice"}, None):
        response = case.call(headers=headers)
        if response.status_code >= 400:
            assert response.headers["content-type"] == ["application/problem+json"]
            if response.status_code >= 500:
                assert response.status_code == 503
                assert response.json()["code"] == "not_ready", response.text
