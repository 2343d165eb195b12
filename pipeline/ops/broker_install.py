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
    "or run Kafka in Docker instead: docker compose -f docker-compose.kafka.yml up -d kafka"
)


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
    def of(cls, settings: BrokerSettings) -> BrokerPaths:
        root = settings.data_dir / "kafka"
        logs = root / "logs"
        return cls(
            root=root,
            jars=settings.jars_dir or root / "jars",
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


def server_properties(settings: BrokerSettings, paths: BrokerPaths) -> str:
    """A combined broker+controller tuned for one developer machine and fast tests."""
    port, ctrl = settings.broker_port, settings.controller_port
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{HOST}:{ctrl}",
        "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{ctrl}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(paths.data),
        "num.partitions": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "4",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
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
    return "".join(f"{k}={v}\n" for k, v in props.items())


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
