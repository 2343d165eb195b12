"""`sumstream broker`: a local Apache Kafka 4.x (KRaft, one node) run from Maven Central jars.

For development, tests and CI. The jars are fetched once by Maven into ``<data_dir>/kafka/jars``;
the broker logs to ``<data_dir>/kafka/logs/broker.log`` and records its pid beside it. Production
uses a real cluster (``docker-compose.kafka.yml`` or a managed Kafka).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from pipeline.errors import BrokerToolingError
from pipeline.settings import BrokerSettings

MIN_JAVA = 17
HOST = "127.0.0.1"
DOCKER_HINT = (
    "or run Kafka in Docker instead: docker compose -f docker-compose.kafka.yml up -d kafka"
)
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"

# Brokers this process started, so stop() can reap them (no zombies, no ResourceWarning).
_children: dict[int, subprocess.Popen[bytes]] = {}


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


@dataclass(frozen=True)
class BrokerStatus:
    """What `sumstream broker status` reports."""

    bootstrap: str
    reachable: bool
    pid: int | None  # the broker process sumstream started, while it runs
    log_file: Path
    data_dir: Path

    @property
    def state(self) -> str:
        if self.reachable:
            return "running" if self.pid is not None else "running (not started by sumstream)"
        return "starting or unhealthy" if self.pid is not None else "stopped"

    def describe(self) -> str:
        pid = f" pid {self.pid}" if self.pid is not None else ""
        return (
            f"broker {self.bootstrap}: {self.state}{pid}\n"
            f"  data {self.data_dir}\n  log  {self.log_file}"
        )


def local_bootstrap(settings: BrokerSettings) -> str:
    return f"{HOST}:{settings.broker_port}"


def is_reachable(bootstrap: str, timeout_s: float = 2.0) -> bool:
    """True when a broker at ``bootstrap`` answers a metadata request (DescribeCluster)."""
    # log_level 0: a refused connection is the expected answer here, not worth a log line.
    client = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        cluster = client.describe_cluster(request_timeout=timeout_s).result(timeout=timeout_s + 1)
    except (KafkaException, TimeoutError):
        return False
    return bool(cluster.nodes)


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
def _locked(path: Path) -> Iterator[None]:
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
    with _locked(jars.parent / f".{jars.name}.lock"):
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


def _kafka_uuid() -> str:
    """A cluster id as Kafka's Uuid.randomUuid writes it (url-safe base64, no padding)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka rejects ids that look like a CLI flag
            return text


def _java_cmd(java: Path, settings: BrokerSettings, paths: BrokerPaths) -> list[str]:
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


def _format_storage(java: Path, settings: BrokerSettings, paths: BrokerPaths) -> None:
    if (paths.data / "meta.properties").exists():
        return
    cmd = [
        *_java_cmd(java, settings, paths),
        STORAGE_TOOL,
        "format",
        "-t",
        _kafka_uuid(),
        "-c",
        str(paths.config),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if out.returncode != 0:
        raise BrokerToolingError(f"formatting KRaft storage failed:\n{out.stdout}{out.stderr}")


def _cmdline(pid: int) -> str | None:
    """The process's command line; '' where there is no /proc (macOS); None once it exited."""
    if not Path("/proc/self").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return ""
        return ""
    proc = Path(f"/proc/{pid}")
    try:
        if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return None  # a zombie has exited; only its parent's wait() is missing
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _alive(pid: int, paths: BrokerPaths) -> bool:
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    cmdline = _cmdline(pid)
    # Guards against a recycled pid: it must be a Kafka broker run with our config.
    return cmdline is not None and (cmdline == "" or str(paths.config) in cmdline)


def _read_pid(paths: BrokerPaths) -> int | None:
    try:
        pid = int(paths.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if _alive(pid, paths):
        return pid
    paths.pid_file.unlink(missing_ok=True)
    return None


def _log_tail(paths: BrokerPaths, lines: int = 30) -> str:
    try:
        return "\n".join(paths.log_file.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def start(settings: BrokerSettings, wait_s: float = 60.0) -> bool:
    """Start the broker and wait until it answers; False when one was already reachable."""
    paths = BrokerPaths.of(settings)
    bootstrap = local_bootstrap(settings)
    with _locked(paths.root / ".start.lock"):
        pid = _read_pid(paths)
        if pid is None and is_reachable(bootstrap, timeout_s=1.0):
            return False
        if pid is not None:
            _wait_ready(settings, paths, pid, wait_s)
            return False
        java = find_java(settings)
        ensure_jars(settings)
        for directory in (paths.data, paths.logs):
            directory.mkdir(parents=True, exist_ok=True)
        paths.config.write_text(server_properties(settings, paths))
        paths.log4j.write_text(LOG4J2)
        _format_storage(java, settings, paths)
        with paths.log_file.open("ab") as log:
            proc = subprocess.Popen(
                [*_java_cmd(java, settings, paths), MAIN_CLASS, str(paths.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=paths.root,
                start_new_session=True,  # Ctrl-C in the starting terminal must not kill it
            )
        _children[proc.pid] = proc
        paths.pid_file.write_text(f"{proc.pid}\n")
        try:
            _wait_ready(settings, paths, proc.pid, wait_s)
        except BrokerToolingError:
            stop(settings)
            raise
        return True


def _wait_ready(settings: BrokerSettings, paths: BrokerPaths, pid: int, wait_s: float) -> None:
    bootstrap = local_bootstrap(settings)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if not _alive(pid, paths):
            raise BrokerToolingError(
                f"the broker exited during start; last lines of {paths.log_file}:\n"
                f"{_log_tail(paths)}"
            )
        if is_reachable(bootstrap, timeout_s=1.0):
            return
        time.sleep(0.2)
    raise BrokerToolingError(
        f"the broker did not answer at {bootstrap} within {wait_s:.0f} s; "
        f"see {paths.log_file}:\n{_log_tail(paths)}"
    )


def stop(settings: BrokerSettings) -> bool:
    """Stop the broker sumstream started (SIGTERM, then SIGKILL); False when none was running."""
    paths = BrokerPaths.of(settings)
    pid = _read_pid(paths)
    if pid is None:
        return False
    _signal(pid, signal.SIGTERM)
    if not _wait_exit(pid, paths, settings.broker_stop_timeout_s):
        _signal(pid, signal.SIGKILL)
        _wait_exit(pid, paths, 10.0)
    _children.pop(pid, None)
    paths.pid_file.unlink(missing_ok=True)
    return True


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_exit(pid: int, paths: BrokerPaths, timeout_s: float) -> bool:
    child = _children.get(pid)
    if child is not None:
        try:
            child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid, paths):
            return True
        time.sleep(0.1)
    return False


def status(settings: BrokerSettings) -> BrokerStatus:
    """Whether the local broker answers, and the process sumstream started for it if any."""
    paths = BrokerPaths.of(settings)
    bootstrap = local_bootstrap(settings)
    return BrokerStatus(
        bootstrap=bootstrap,
        reachable=is_reachable(bootstrap, timeout_s=2.0),
        pid=_read_pid(paths),
        log_file=paths.log_file,
        data_dir=paths.root,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["start", "stop", "status", "restart"])
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the broker to answer"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="status: print nothing, exit 0 when reachable"
    )


def run(args: argparse.Namespace) -> int:
    settings = BrokerSettings()
    bootstrap = local_bootstrap(settings)
    try:
        if args.action == "status":
            st = status(settings)
            if not args.quiet:
                print(st.describe())
            return 0 if st.reachable else 3
        if args.action in ("stop", "restart"):
            stopped = stop(settings)
            print(f"broker {bootstrap}: {'stopped' if stopped else 'was not started by sumstream'}")
            if args.action == "stop":
                return 0
        t0 = time.monotonic()
        started = start(settings, wait_s=args.timeout)
    except BrokerToolingError as exc:
        print(f"sumstream broker {args.action}: {exc}", file=sys.stderr)
        return 1
    if started:
        paths = BrokerPaths.of(settings)
        print(
            f"broker {bootstrap}: started in {time.monotonic() - t0:.1f} s (log {paths.log_file})"
        )
    else:
        print(f"broker {bootstrap}: already running")
    return 0
