"""A second local broker, on free ports with its own data dir (the shared one is not touched)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.core.settings import REPO_ROOT, BrokerSettings, KafkaSettings
from pipeline.kafka.admin import create_topics, describe_topics
from pipeline.ops import broker
from pipeline.ops.cli import main
from tests.harness import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def second_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerSettings]:
    port, ctrl = free_port(), free_port()
    env = {
        "SUMSTREAM_DATA_DIR": str(tmp_path),
        "SUMSTREAM_BROKER_PORT": str(port),
        "SUMSTREAM_CONTROLLER_PORT": str(ctrl),
        # The jars cache is shared with the main broker: fetched once per checkout.
        "SUMSTREAM_JARS_DIR": str(REPO_ROOT / ".data" / "kafka" / "jars"),
        "SUMSTREAM_BROKER_HEAP": "256m",
        "SUMSTREAM_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # for the CLI, which reads its settings itself
    settings = BrokerSettings()
    assert settings.broker_port == port and settings.data_dir == tmp_path
    try:
        yield settings
    finally:
        broker.stop(settings)  # never leave a broker behind, whatever failed


def test_a_broker_starts_once_keeps_its_topics_across_a_restart_and_stops(
    second_broker: BrokerSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = second_broker
    bootstrap = f"127.0.0.1:{settings.broker_port}"
    before = broker.status(settings)
    assert (before.reachable, before.pid, before.state) == (False, None, "stopped")
    assert main(["broker", "status"]) == 3

    assert main(["broker", "start", "--timeout", "180"]) == 0
    assert "started in" in capsys.readouterr().out
    running = broker.status(settings)
    assert running.reachable and running.pid is not None
    assert running.state == "running"
    assert broker.is_reachable(bootstrap, timeout_s=5.0)
    assert main(["broker", "status"]) == 0

    # Starting again is harmless: same process, reported as already running.
    assert broker.start(settings) is False
    assert main(["broker", "start"]) == 0
    assert "already running" in capsys.readouterr().out
    assert broker.status(settings).pid == running.pid

    # It is a working broker: topics with their declared configuration...
    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix="probe.")
    assert len(create_topics(kafka)) == len(describe_topics(kafka))
    assert all(row["matches"] for row in describe_topics(kafka))

    # ...that outlive a restart (a new process on the same data).
    assert main(["broker", "restart", "--timeout", "180"]) == 0
    restarted = broker.status(settings)
    assert restarted.reachable and restarted.pid not in (None, running.pid)
    assert all(row["exists"] for row in describe_topics(kafka))

    assert broker.stop(settings) is True
    after = broker.status(settings)
    assert (after.reachable, after.pid, after.state) == (False, None, "stopped")
    assert not broker.is_reachable(bootstrap, timeout_s=1.0)
    assert not broker.BrokerPaths.of(settings).pid_file.exists()
    assert broker.stop(settings) is False
    assert main(["broker", "stop"]) == 0
    assert main(["broker", "status"]) == 3
    log = broker.BrokerPaths.of(settings).log_file.read_text()
    assert log.count("Kafka Server started") == 2
