"""The pipeline against a broker that demands SASL (SCRAM-SHA-256 over SASL_PLAINTEXT): every
client of the gateway, the worker and the tooling authenticates with the ``SUMSTREAM_SASL_*``
settings alone (pipeline/kafka/connection.py)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from pipeline.core.settings import REPO_ROOT, BrokerSettings, KafkaSettings
from pipeline.llm.extractive import summarize
from pipeline.ops import broker
from tests.e2e.documents import document
from tests.harness import auth, collect, free_port_block, running_stack

pytestmark = pytest.mark.e2e


@pytest.fixture
def sasl_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerSettings]:
    """A broker of the test's own whose only client listener is SASL_PLAINTEXT with SCRAM;
    the test process and every process it starts carry the credentials in their env."""
    base = free_port_block(2)
    env = {
        "SUMSTREAM_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "SUMSTREAM_SASL_MECHANISM": "SCRAM-SHA-256",
        "SUMSTREAM_SASL_USERNAME": "sumstream",
        "SUMSTREAM_SASL_PASSWORD": secrets.token_urlsafe(12),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = BrokerSettings(
        data_dir=tmp_path / "broker",
        broker_port=base,
        controller_port=base + 1,
        bootstrap_servers=f"127.0.0.1:{base}",
        jars_dir=REPO_ROOT / ".data" / "kafka" / "jars",
        broker_heap="384m",
        broker_jvm_opts="-XX:TieredStopAtLevel=1",
    )
    try:
        broker.start(settings, wait_s=180)
        yield settings
    finally:
        broker.stop(settings)


async def test_a_request_completes_through_a_broker_that_requires_scram(
    sasl_broker: BrokerSettings, tmp_path: Path
) -> None:
    bootstrap = sasl_broker.bootstrap_servers
    # The listener really refuses clients without the credentials.
    plaintext = KafkaSettings(bootstrap_servers=bootstrap, security_protocol="PLAINTEXT")
    assert not broker.is_reachable(bootstrap, timeout_s=2.0, settings=plaintext)
    wrong = sasl_broker.model_copy(update={"sasl_password": SecretStr("not-the-password")})
    assert not broker.is_reachable(bootstrap, timeout_s=2.0, settings=wrong)

    doc = document(16)
    with running_stack(tmp_path, bootstrap=bootstrap) as stack:
        async with httpx.AsyncClient(timeout=120) as client:
            result = await collect(
                client,
                "POST",
                f"{stack.gateway}/v1/summaries",
                json={"document": doc, "max_output_tokens": 40},
                headers=auth(),
            )
    assert result.status_code == 200, result.events
    assert result.done["status"] == "COMPLETED", result.done
    assert result.done["summary"] == summarize(doc, 40).strip()
