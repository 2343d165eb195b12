"""What a local broker runs from: its files under ``<data_dir>/kafka``, a Java 17+, the Kafka
jars Maven fetches once, its ``server.properties`` and log4j2 config, and the JVM command line.

pipeline/ops/broker.py starts and stops the process; nothing here runs the broker.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import BrokerToolingError
from pipeline.core.settings import BrokerSettings

MIN_JAVA = 17
HOST = "127.0.0.1"
DOCKER_HINT = (
    "or run Kafka in Docker instead: "
    "docker compose -f docker-compose.kafka.yml up -d kafka kafka-2 kafka-3"
)


@dataclass(frozen=True)
class ClusterNode:
    """One node of the local cluster: its id and its client and controller ports."""

    node_id: int
    port: int
    controller_port: int

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"


def cluster_nodes(settings: BrokerSettings) -> list[ClusterNode]:
    """Every node of the local cluster; node i (from 0) listens on the base ports + 2i."""
    return [
        ClusterNode(i + 1, settings.broker_port + 2 * i, settings.controller_port + 2 * i)
        for i in range(settings.broker_nodes)
    ]


def cluster_replication(nodes: int) -> tuple[int, int]:
    """Replication factor and min.insync.replicas for a cluster of ``nodes``: 3 and 2 from
    three nodes on, so a write with acks=all survives the loss of any one node."""
    factor = min(3, nodes)
    return factor, max(1, factor - 1)


@dataclass(frozen=True)
class BrokerPaths:
    """Where one local broker keeps its jars, data, config, log and pid file."""

    root: Path
    jars: Path
    data: Path
    logs: Path
    log_file: Path
    config: Path
    log4j: Path
    pid_file: Path

    @classmethod
    def of(cls, settings: BrokerSettings, node_id: int = 1) -> BrokerPaths:
        """A single node keeps its files in ``<data_dir>/kafka``; node N of a cluster in
        ``<data_dir>/kafka/node-N``; the jars are shared."""
        base = settings.data_dir / "kafka"
        root = base if settings.broker_nodes == 1 else base / f"node-{node_id}"
        logs = root / "logs"
        return cls(
            root=root,
            jars=settings.jars_dir or base / "jars",
            data=root / "data",
            logs=logs,
            log_file=logs / "broker.log",
            config=root / "server.properties",
            log4j=root / "log4j2.properties",
            pid_file=root / "broker.pid",
        )


def find_java(settings: BrokerSettings) -> Path:
    """The java executable (17+) to run the broker with, or BrokerToolingError saying what to do."""
    if settings.java_home is not None:
        candidate: str | None = str(settings.java_home / "bin" / "java")
    else:
        candidate = shutil.which("java")
    if candidate is None or not Path(candidate).exists():
        raise BrokerToolingError(
            f"Java {MIN_JAVA}+ is needed to run the local Kafka broker and none was found "
            "(set SUMSTREAM_JAVA_HOME or put java on PATH, e.g. apt-get install "
            f"openjdk-17-jre-headless); {DOCKER_HINT}"
        )
    out = subprocess.run(
        [candidate, "-version"], capture_output=True, text=True, timeout=30, check=False
    )
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if match is None:
        raise BrokerToolingError(f"cannot tell the version of {candidate}; {DOCKER_HINT}")
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8.0_x" style
        major = int(match.group(2))
    if major < MIN_JAVA:
        raise BrokerToolingError(
            f"Kafka 4 needs Java {MIN_JAVA}+, {candidate} is Java {major}; {DOCKER_HINT}"
        )
    return Path(candidate)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock across processes (tests and scripts may start brokers at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_jars(settings: BrokerSettings) -> Path:
    """Fetch the pinned broker jars with Maven once; return the directory holding them."""
    jars = BrokerPaths.of(settings).jars
    pom = settings.kafka_pom
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()
    marker = jars / ".complete"
    with locked(jars.parent / f".{jars.name}.lock"):
        if marker.exists() and marker.read_text().strip() == digest:
            return jars
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerToolingError(
                "Maven (mvn) is needed once to fetch the Kafka broker jars and none was found "
                f"(e.g. apt-get install maven); {DOCKER_HINT}"
            )
        jars.mkdir(parents=True, exist_ok=True)
        # A changed pom must not leave two Kafka versions on the classpath.
        for old in jars.glob("*.jar"):
            old.unlink()
        cmd = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={jars}",
        ]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BrokerToolingError(f"Maven did not finish in 900 s; {DOCKER_HINT}") from exc
        if out.returncode != 0 or not any(jars.glob("kafka_2.13-*.jar")):
            tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-20:])
            raise BrokerToolingError(
                f"Maven could not fetch the Kafka jars (exit {out.returncode}):\n{tail}\n"
                f"{DOCKER_HINT}"
            )
        marker.write_text(digest + "\n")
    return jars


def server_properties(
    settings: BrokerSettings, paths: BrokerPaths, node: ClusterNode | None = None
) -> str:
    """A combined broker+controller tuned for one developer machine and fast tests; with
    ``broker_nodes`` > 1, one node of a replicated cluster (docs/architecture.md,
    "Production Kafka")."""
    nodes = cluster_nodes(settings)
    node = node or nodes[0]
    port, ctrl = node.port, node.controller_port
    factor, min_isr = (str(n) for n in cluster_replication(len(nodes)))
    listener = _client_listener(settings)
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        "controller.quorum.voters": ",".join(
            f"{n.node_id}@{HOST}:{n.controller_port}" for n in nodes
        ),
        "listeners": f"{listener}://{HOST}:{port},CONTROLLER://{HOST}:{ctrl}",
        "advertised.listeners": f"{listener}://{HOST}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": listener,
        "listener.security.protocol.map": f"{listener}:{listener},CONTROLLER:PLAINTEXT",
        "log.dirs": str(paths.data),
        "num.partitions": "1",
        "default.replication.factor": factor,
        "min.insync.replicas": min_isr,
        # A replica that fell out of sync never becomes leader: that would drop acked writes.
        "unclean.leader.election.enable": "false",
        "offsets.topic.replication.factor": factor,
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.replication.factor": factor,
        "transaction.state.log.min.isr": min_isr,
        "transaction.state.log.num.partitions": "4",
        "share.coordinator.state.topic.replication.factor": factor,
        "share.coordinator.state.topic.min.isr": min_isr,
        # Consumers join at once instead of waiting 3 s for more members.
        "group.initial.rebalance.delay.ms": "0",
        # Two cores are shared by every process on the machine.
        "num.network.threads": "2",
        "num.io.threads": "4",
        "background.threads": "4",
        "num.recovery.threads.per.data.dir": "1",
        # The cleaner's 128 MB default buffer would take a quarter of a small heap.
        "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        "log.segment.bytes": str(64 * 1024 * 1024),
        "log.retention.check.interval.ms": "60000",
    }
    if len(nodes) > 1:
        # A killed node is fenced (and its partitions led elsewhere) after 6 s, not 9 s.
        props["broker.heartbeat.interval.ms"] = "1000"
        props["broker.session.timeout.ms"] = "6000"
    props.update(_sasl_properties(settings, listener))
    return "".join(f"{k}={v}\n" for k, v in props.items())


def _client_listener(settings: BrokerSettings) -> str:
    """The security protocol of the local broker's client listener: the clients' own."""
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        raise BrokerToolingError(
            "the local broker serves PLAINTEXT or SASL_PLAINTEXT; for TLS use a managed "
            f"cluster or a broker of your own; {DOCKER_HINT}"
        )
    if settings.security_protocol == "SASL_PLAINTEXT" and (
        settings.sasl_mechanism == "OAUTHBEARER" or not settings.sasl_username
    ):
        raise BrokerToolingError(
            "the local broker's SASL listener takes PLAIN or SCRAM with SUMSTREAM_SASL_USERNAME"
        )
    return settings.security_protocol


def _sasl_properties(settings: BrokerSettings, listener: str) -> dict[str, str]:
    """The SASL listener's one user: the clients' username and password (inter-broker too)."""
    if listener != "SASL_PLAINTEXT":
        return {}
    mechanism = settings.sasl_mechanism
    user = settings.sasl_username or ""
    password = settings.sasl_password.get_secret_value() if settings.sasl_password else ""
    if mechanism == "PLAIN":
        module = "org.apache.kafka.common.security.plain.PlainLoginModule"
        users = f'user_{user}="{password}"'
        jaas = f'{module} required username="{user}" password="{password}" {users};'
    else:  # SCRAM: the credential itself is written into the storage at format time
        module = "org.apache.kafka.common.security.scram.ScramLoginModule"
        jaas = f'{module} required username="{user}" password="{password}";'
    return {
        "sasl.enabled.mechanisms": mechanism,
        "sasl.mechanism.inter.broker.protocol": mechanism,
        f"listener.name.sasl_plaintext.{mechanism.lower()}.sasl.jaas.config": jaas,
    }


def scram_format_args(settings: BrokerSettings) -> list[str]:
    """The storage tool's arguments that create the SCRAM user of a SASL_PLAINTEXT broker."""
    if settings.security_protocol != "SASL_PLAINTEXT" or not settings.sasl_mechanism.startswith(
        "SCRAM"
    ):
        return []
    password = settings.sasl_password.get_secret_value() if settings.sasl_password else ""
    credential = f"{settings.sasl_mechanism}=[name={settings.sasl_username},password={password}]"
    return ["--add-scram", credential]


LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
logger.statechange.name = state.change.logger
logger.statechange.level = warn
logger.request.name = kafka.request.logger
logger.request.level = warn
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = warn
logger.storage.name = org.apache.kafka.storage
logger.storage.level = warn
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = warn
"""


def java_command(java: Path, settings: BrokerSettings, paths: BrokerPaths) -> list[str]:
    """The JVM and its options for one of Kafka's main classes (appended by the caller)."""
    return [
        str(java),
        f"-Xmx{settings.broker_heap}",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        *shlex.split(settings.broker_jvm_opts),
        f"-Dlog4j2.configurationFile={paths.log4j}",
        f"-Dkafka.logs.dir={paths.logs}",
        "-cp",
        f"{paths.jars}/*",
    ]
