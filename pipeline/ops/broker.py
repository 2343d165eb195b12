"""`sumstream broker`: a local Apache Kafka 4.x (KRaft) run from Maven Central jars: one node,
or a replicated cluster of ``--nodes`` (docs/architecture.md, "Production Kafka").

For development, tests and CI. The jars are fetched once by Maven into ``<data_dir>/kafka/jars``;
the broker logs to ``<data_dir>/kafka/logs/broker.log`` and records its pid beside it. Production
uses a real cluster (``docker-compose.kafka.yml`` or a managed Kafka). What the broker runs from
(paths, Java, jars, config files) is pipeline/ops/broker_install.py; this module runs the process.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import KafkaException

from pipeline.core.errors import BrokerToolingError
from pipeline.core.settings import BrokerSettings, KafkaSettings, kafka_settings
from pipeline.kafka.connection import ConnectionConfig
from pipeline.ops.broker_install import (
    HOST,
    LOG4J2,
    BrokerPaths,
    ClusterNode,
    cluster_nodes,
    ensure_jars,
    find_java,
    java_command,
    locked,
    scram_format_args,
    server_properties,
)

MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"

# Brokers this process started, so stop() can reap them (no zombies, no ResourceWarning).
_children: dict[int, subprocess.Popen[bytes]] = {}


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
    """Every node's client address, comma-separated."""
    return ",".join(node.bootstrap for node in cluster_nodes(settings))


def is_reachable(
    bootstrap: str, timeout_s: float = 2.0, settings: KafkaSettings | None = None
) -> bool:
    """True when a broker at ``bootstrap`` answers a metadata request (DescribeCluster).

    The security options are ``settings``' (default: the process's ``SUMSTREAM_*``); the
    address is given.
    """
    connection = dataclasses.replace(
        ConnectionConfig.from_settings(settings or kafka_settings()), bootstrap_servers=bootstrap
    )
    # log_level 0: a refused connection is the expected answer here, not worth a log line.
    client = connection.admin_client({"log_level": 0})
    try:
        cluster = client.describe_cluster(request_timeout=timeout_s).result(timeout=timeout_s + 1)
    except (KafkaException, TimeoutError):
        return False
    return bool(cluster.nodes)


def _kafka_uuid() -> str:
    """A cluster id as Kafka's Uuid.randomUuid writes it (url-safe base64, no padding)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka rejects ids that look like a CLI flag
            return text


def _cluster_id(settings: BrokerSettings) -> str:
    """One id for every node of a cluster, kept beside the nodes' directories."""
    if settings.broker_nodes == 1:
        return _kafka_uuid()
    path = settings.data_dir / "kafka" / "cluster.id"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_kafka_uuid() + "\n")
    return path.read_text().strip()


def _format_storage(java: Path, settings: BrokerSettings, paths: BrokerPaths) -> None:
    if (paths.data / "meta.properties").exists():
        return
    cmd = [
        *java_command(java, settings, paths),
        STORAGE_TOOL,
        "format",
        "-t",
        _cluster_id(settings),
        "-c",
        str(paths.config),
        *scram_format_args(settings),
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
    """Start every node that is not running and wait until all answer; False when all were.

    A cluster's nodes start together: the controller quorum needs a majority of them.
    """
    nodes = cluster_nodes(settings)
    root = settings.data_dir / "kafka"
    with locked(root / ".start.lock"):
        pids = {node.node_id: _read_pid(BrokerPaths.of(settings, node.node_id)) for node in nodes}
        missing = [node for node in nodes if pids[node.node_id] is None]
        if (
            len(nodes) == 1
            and missing
            and is_reachable(nodes[0].bootstrap, timeout_s=1.0, settings=settings)
        ):
            return False  # someone else's broker on our port
        if missing:
            _ensure_ports_free(missing)
            java = find_java(settings)
            ensure_jars(settings)
            for node in missing:
                pids[node.node_id] = _launch(java, settings, node)
        try:
            for node in nodes:
                pid = pids[node.node_id]
                assert pid is not None
                _wait_ready(settings, node, pid, wait_s)
        except BrokerToolingError:
            if missing:
                stop(settings)
            raise
        return bool(missing)


def _ensure_ports_free(nodes: list[ClusterNode]) -> None:
    """Refuse to launch onto a port another process holds: a node of another cluster there
    would answer our readiness probe and reject our votes (INCONSISTENT_CLUSTER_ID)."""
    taken = [
        port for node in nodes for port in (node.port, node.controller_port) if not _port_free(port)
    ]
    if taken:
        raise BrokerToolingError(
            f"port(s) {', '.join(map(str, taken))} on {HOST} are in use by another process "
            "(another broker or cluster?): stop it, or choose other ports with "
            "SUMSTREAM_BROKER_PORT and SUMSTREAM_CONTROLLER_PORT"
        )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the JVM binds
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def _launch(java: Path, settings: BrokerSettings, node: ClusterNode) -> int:
    paths = BrokerPaths.of(settings, node.node_id)
    for directory in (paths.data, paths.logs):
        directory.mkdir(parents=True, exist_ok=True)
    paths.config.write_text(server_properties(settings, paths, node))
    paths.log4j.write_text(LOG4J2)
    _format_storage(java, settings, paths)
    with paths.log_file.open("ab") as log:
        proc = subprocess.Popen(
            [*java_command(java, settings, paths), MAIN_CLASS, str(paths.config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=paths.root,
            start_new_session=True,  # Ctrl-C in the starting terminal must not kill it
        )
    _children[proc.pid] = proc
    paths.pid_file.write_text(f"{proc.pid}\n")
    return proc.pid


def _wait_ready(settings: BrokerSettings, node: ClusterNode, pid: int, wait_s: float) -> None:
    paths = BrokerPaths.of(settings, node.node_id)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if not _alive(pid, paths):
            raise BrokerToolingError(
                f"the broker exited during start; last lines of {paths.log_file}:\n"
                f"{_log_tail(paths)}"
            )
        if is_reachable(node.bootstrap, timeout_s=1.0, settings=settings):
            return
        time.sleep(0.2)
    raise BrokerToolingError(
        f"the broker did not answer at {node.bootstrap} within {wait_s:.0f} s; "
        f"see {paths.log_file}:\n{_log_tail(paths)}"
    )


def stop(settings: BrokerSettings) -> bool:
    """Stop every node sumstream started (SIGTERM, then SIGKILL); False when none was running."""
    running = [
        (paths, pid)
        for paths in (BrokerPaths.of(settings, n.node_id) for n in cluster_nodes(settings))
        if (pid := _read_pid(paths)) is not None
    ]
    # All at once: a node that stops alone would wait for its partitions to move elsewhere.
    for _, pid in running:
        _signal(pid, signal.SIGTERM)
    for paths, pid in running:
        if not _wait_exit(pid, paths, settings.broker_stop_timeout_s):
            _signal(pid, signal.SIGKILL)
            _wait_exit(pid, paths, 10.0)
        _children.pop(pid, None)
        paths.pid_file.unlink(missing_ok=True)
    return bool(running)


def kill_node(settings: BrokerSettings, node_id: int, sig: signal.Signals = signal.SIGKILL) -> bool:
    """Send ``sig`` to one node (fault injection); SIGKILL also reaps it. False when not running."""
    paths = BrokerPaths.of(settings, node_id)
    pid = _read_pid(paths)
    if pid is None:
        return False
    _signal(pid, sig)
    if sig == signal.SIGKILL:
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


def status(settings: BrokerSettings, node_id: int = 1) -> BrokerStatus:
    """Whether one local node answers, and the process sumstream started for it if any."""
    node = cluster_nodes(settings)[node_id - 1]
    paths = BrokerPaths.of(settings, node_id)
    return BrokerStatus(
        bootstrap=node.bootstrap,
        reachable=is_reachable(node.bootstrap, timeout_s=2.0, settings=settings),
        pid=_read_pid(paths),
        log_file=paths.log_file,
        data_dir=paths.root,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["start", "stop", "status", "restart"])
    parser.add_argument(
        "--nodes",
        type=int,
        choices=range(1, 10),
        metavar="N",
        help="nodes of the local cluster (default: SUMSTREAM_BROKER_NODES, else as started)",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the broker to answer"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="status: print nothing, exit 0 when reachable"
    )


def run(args: argparse.Namespace) -> int:
    # Imported here: the status report builds on this module.
    from pipeline.ops.cluster import chosen_settings, cluster_status, record_nodes

    settings = chosen_settings(args.nodes)
    bootstrap = local_bootstrap(settings)
    try:
        if args.action == "status":
            st = cluster_status(settings)
            if not args.quiet:
                print(st.describe())
            return 0 if st.reachable else 3
        if args.action in ("stop", "restart"):
            stopped = stop(settings)
            print(f"broker {bootstrap}: {'stopped' if stopped else 'was not started by sumstream'}")
            if args.action == "stop":
                return 0
        t0 = time.monotonic()
        record_nodes(settings)
        started = start(settings, wait_s=args.timeout)
    except BrokerToolingError as exc:
        print(f"sumstream broker {args.action}: {exc}", file=sys.stderr)
        return 1
    if started:
        paths = BrokerPaths.of(settings)
        print(
            f"broker {bootstrap}: started in {time.monotonic() - t0:.1f} s (log {paths.log_file})"
        )
        if settings.broker_nodes >= 3:
            print(
                "  topics: SUMSTREAM_BOOTSTRAP_SERVERS="
                f"{bootstrap} SUMSTREAM_REPLICATION_FACTOR=3 SUMSTREAM_MIN_INSYNC_REPLICAS=2"
            )
    else:
        print(f"broker {bootstrap}: already running")
    return 0
