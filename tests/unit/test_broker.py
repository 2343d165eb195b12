"""The local broker's pure parts: configuration, ids, and what it says when tools are missing."""

from __future__ import annotations

import base64
import socket
from pathlib import Path

import pytest

from pipeline.core.errors import BrokerToolingError
from pipeline.core.settings import BrokerSettings, KafkaSettings
from pipeline.core.topics import declared_topics
from pipeline.ops import broker, cluster


def settings_in(tmp_path: Path, **fields: object) -> BrokerSettings:
    return BrokerSettings(
        data_dir=tmp_path,
        broker_port=29092,
        controller_port=29093,
        **fields,  # type: ignore[arg-type]
    )


def test_server_properties_are_a_single_kraft_node(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    paths = broker.BrokerPaths.of(settings)
    props = dict(
        line.split("=", 1) for line in broker.server_properties(settings, paths).splitlines()
    )
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:29093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:29092,CONTROLLER://127.0.0.1:29093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:29092"
    assert props["log.dirs"] == str(tmp_path / "kafka" / "data")
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["offsets.topic.replication.factor"] == "1"
    assert "auto.create.topics.enable" not in props  # Faust creates its internal topics


def test_paths_follow_the_data_dir_and_may_share_jars(tmp_path: Path) -> None:
    own = broker.BrokerPaths.of(settings_in(tmp_path))
    assert own.jars == tmp_path / "kafka" / "jars"
    assert own.log_file == tmp_path / "kafka" / "logs" / "broker.log"
    shared = broker.BrokerPaths.of(settings_in(tmp_path, jars_dir=tmp_path / "cache"))
    assert shared.jars == tmp_path / "cache"


def test_cluster_ids_look_like_kafka_uuids() -> None:
    for _ in range(200):
        cluster_id = broker._kafka_uuid()
        assert len(cluster_id) == 22 and not cluster_id.startswith("-")
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_missing_java_names_the_docker_alternative(tmp_path: Path) -> None:
    with pytest.raises(BrokerToolingError, match=r"docker compose -f docker-compose\.kafka\.yml"):
        broker.find_java(settings_in(tmp_path, java_home=tmp_path / "no-jdk"))


def test_old_java_is_refused(tmp_path: Path) -> None:
    java = tmp_path / "jdk8" / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_text("#!/bin/sh\necho 'java version \"1.8.0_402\"' >&2\n")
    java.chmod(0o755)
    with pytest.raises(BrokerToolingError, match="Java 8"):
        broker.find_java(settings_in(tmp_path, java_home=tmp_path / "jdk8"))


def test_missing_maven_names_the_docker_alternative(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no mvn anywhere
    with pytest.raises(BrokerToolingError, match=r"Maven.*docker compose"):
        broker.ensure_jars(settings_in(tmp_path))


def test_nothing_listening_is_unreachable_and_stopped(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        assert not broker.is_reachable(f"127.0.0.1:{port}", timeout_s=1.0)
    settings = BrokerSettings(data_dir=tmp_path, broker_port=port)
    status = broker.status(settings)
    assert (status.reachable, status.pid, status.state) == (False, None, "stopped")
    assert broker.stop(settings) is False


def test_a_stale_pid_file_is_ignored(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    paths = broker.BrokerPaths.of(settings)
    paths.root.mkdir(parents=True)
    paths.pid_file.write_text("1\n")  # pid 1 is alive, but it is not our broker
    assert broker.status(settings).pid is None
    assert not paths.pid_file.exists()
    assert broker.stop(settings) is False


def test_a_cluster_is_not_launched_onto_a_port_another_process_holds(tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]  # another cluster's node 1, say
        settings = BrokerSettings(
            data_dir=tmp_path, broker_port=port, controller_port=port + 1, broker_nodes=3
        )
        with pytest.raises(BrokerToolingError, match=rf"port\(s\) .*\b{port}\b.* in use"):
            broker.start(settings, wait_s=5.0)
    assert not any(broker.BrokerPaths.of(settings, n).pid_file.exists() for n in (1, 2, 3))


def props_of(settings: BrokerSettings, node_id: int = 1) -> dict[str, str]:
    node = broker.cluster_nodes(settings)[node_id - 1]
    text = broker.server_properties(settings, broker.BrokerPaths.of(settings, node_id), node)
    return dict(line.split("=", 1) for line in text.splitlines())


def test_three_nodes_share_one_quorum_and_replicate_three_times(tmp_path: Path) -> None:
    settings = settings_in(tmp_path, broker_nodes=3)
    voters = "1@127.0.0.1:29093,2@127.0.0.1:29095,3@127.0.0.1:29097"
    for node_id, port in ((1, 29092), (2, 29094), (3, 29096)):
        props = props_of(settings, node_id)
        assert props["node.id"] == str(node_id)
        assert props["controller.quorum.voters"] == voters
        assert props["advertised.listeners"] == f"PLAINTEXT://127.0.0.1:{port}"
        assert props["log.dirs"] == str(tmp_path / "kafka" / f"node-{node_id}" / "data")
        assert props["default.replication.factor"] == "3"
        assert props["min.insync.replicas"] == "2"
        assert props["offsets.topic.replication.factor"] == "3"
        assert props["unclean.leader.election.enable"] == "false"
    assert broker.local_bootstrap(settings) == "127.0.0.1:29092,127.0.0.1:29094,127.0.0.1:29096"
    single = props_of(settings_in(tmp_path))
    assert (single["default.replication.factor"], single["min.insync.replicas"]) == ("1", "1")


def test_cluster_nodes_keep_their_files_apart_and_share_the_jars(tmp_path: Path) -> None:
    settings = settings_in(tmp_path, broker_nodes=3)
    roots = {broker.BrokerPaths.of(settings, n).root for n in (1, 2, 3)}
    assert roots == {tmp_path / "kafka" / f"node-{n}" for n in (1, 2, 3)}
    assert {broker.BrokerPaths.of(settings, n).jars for n in (1, 2, 3)} == {
        tmp_path / "kafka" / "jars"
    }


def test_a_sasl_broker_serves_the_clients_own_user(tmp_path: Path) -> None:
    plain = settings_in(
        tmp_path, security_protocol="SASL_PLAINTEXT", sasl_username="app", sasl_password="pw"
    )
    props = props_of(plain)
    assert props["listeners"].startswith("SASL_PLAINTEXT://127.0.0.1:29092,")
    assert props["inter.broker.listener.name"] == "SASL_PLAINTEXT"
    assert props["sasl.enabled.mechanisms"] == "PLAIN"
    jaas = props["listener.name.sasl_plaintext.plain.sasl.jaas.config"]
    assert 'username="app" password="pw" user_app="pw";' in jaas
    assert broker.scram_format_args(plain) == []

    scram = plain.model_copy(update={"sasl_mechanism": "SCRAM-SHA-256"})
    assert props_of(scram)["sasl.mechanism.inter.broker.protocol"] == "SCRAM-SHA-256"
    credential = "SCRAM-SHA-256=[name=app,password=pw]"
    assert broker.scram_format_args(scram) == ["--add-scram", credential]


def test_the_local_broker_refuses_tls_and_saying_so(tmp_path: Path) -> None:
    with pytest.raises(BrokerToolingError, match="PLAINTEXT or SASL_PLAINTEXT"):
        props_of(settings_in(tmp_path, security_protocol="SSL"))


def test_broker_commands_remember_the_node_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUMSTREAM_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("SUMSTREAM_BROKER_NODES", raising=False)
    assert cluster.chosen_settings(None).broker_nodes == 1
    cluster.record_nodes(cluster.chosen_settings(3))
    assert cluster.chosen_settings(None).broker_nodes == 3
    assert cluster.chosen_settings(1).broker_nodes == 1
    monkeypatch.setenv("SUMSTREAM_BROKER_NODES", "2")
    assert cluster.chosen_settings(None).broker_nodes == 2


def test_topics_require_the_settings_in_sync_replicas_only_when_set() -> None:
    replicated = KafkaSettings(replication_factor=3, min_insync_replicas=2)
    assert all(s.config["min.insync.replicas"] == "2" for s in declared_topics(replicated))
    assert all("min.insync.replicas" not in s.config for s in declared_topics(KafkaSettings()))
