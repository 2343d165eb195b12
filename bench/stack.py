"""The processes a benchmark run starts, and their teardown.

Every process runs in its own session (process group) and is stopped through that group, so
the run ends exactly what it started and nothing else. The broker is started only when none
is reachable, and then stopped at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from pipeline.core.settings import REPO_ROOT, BrokerSettings, KafkaSettings, child_env

EXE = [sys.executable, "-m", "pipeline.ops.cli"]


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Proc:
    """One started process, its log file and the wall time it took to become ready."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]
    ready_s: float | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Stack:
    """Processes started by this run, stopped in reverse order by ``close``."""

    run_dir: Path
    procs: list[Proc] = field(default_factory=list)
    broker_settings: BrokerSettings | None = None

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        """Start ``argv`` in a new session, logging to ``<run_dir>/<name>.log``."""
        log_path = self.run_dir / f"{name}.log"
        log = log_path.open("ab")
        popen = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        proc = Proc(name, popen, log_path, log)
        self.procs.append(proc)
        return proc

    def spawn_cli(self, name: str, args: list[str], env: dict[str, str]) -> Proc:
        """Start a ``sumstream`` subcommand."""
        return self.spawn(name, [*EXE, *args], env)

    async def wait_http(self, proc: Proc, url: str, timeout_s: float) -> None:
        """Wait until ``url`` answers 200 while ``proc`` stays alive."""
        t0 = time.perf_counter()
        deadline = t0 + timeout_s
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.perf_counter() < deadline:
                if not proc.alive():
                    raise RuntimeError(
                        f"{proc.name} exited with code {proc.popen.returncode} while starting; "
                        f"last lines of {proc.log_path}:\n{proc.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url)).status_code == 200:
                        proc.ready_s = time.perf_counter() - t0
                        return
                await asyncio.sleep(0.2)
        raise TimeoutError(
            f"{proc.name} not ready at {url} after {timeout_s:.0f} s; "
            f"last lines of {proc.log_path}:\n{proc.log_tail()}"
        )

    def check_alive(self) -> None:
        for proc in self.procs:
            if not proc.alive():
                raise RuntimeError(
                    f"{proc.name} exited with code {proc.popen.returncode}; "
                    f"last lines of {proc.log_path}:\n{proc.log_tail()}"
                )

    def close(self) -> None:
        """Stop every started process, then the broker if this run started it."""
        self.stop(list(self.procs))
        if self.broker_settings is not None:
            from pipeline.ops import broker

            broker.stop(self.broker_settings)
            self.broker_settings = None

    def stop(self, procs: list[Proc]) -> None:
        """Stop ``procs`` (SIGTERM to each group, SIGKILL after 15 s), last started first."""
        for proc in reversed(procs):
            if proc.alive():
                _signal_group(proc.popen, signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                print(f"bench: {proc.name} ignored SIGTERM; killing it", file=sys.stderr)
                _signal_group(proc.popen, signal.SIGKILL)
                proc.popen.wait(timeout=10)
            # Children it left behind in its group (none expected) go too.
            _signal_group(proc.popen, signal.SIGKILL)
            proc.log.close()
            if proc in self.procs:
                self.procs.remove(proc)


def _signal_group(popen: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # start_new_session made the child the leader of its own group: its pid is the group id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, sig)


def ensure_broker(stack: Stack, bootstrap: str) -> bool:
    """Start the local broker when none answers at ``bootstrap``; True when this run started it."""
    from pipeline.ops import broker

    if broker.is_reachable(bootstrap, timeout_s=3.0):
        return False
    print(f"bench: no broker at {bootstrap}; starting the local one...", file=sys.stderr)
    settings = BrokerSettings()
    started = broker.start(settings)
    if started:
        stack.broker_settings = settings
    return started


async def create_topics(settings: KafkaSettings) -> list[str]:
    """The declared topics for this run's prefix (idempotent)."""
    from pipeline.kafka import admin

    names: list[str] = await admin.ensure_topics(settings)
    return names


def delete_topics(bootstrap: str, prefixes: tuple[str, ...]) -> list[str]:
    """Delete every topic whose name starts with one of ``prefixes`` (this run's, only)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefixes)]
    if not names:
        return []
    for future in admin.delete_topics(names, operation_timeout=30).values():
        with contextlib.suppress(Exception):
            future.result(timeout=30)
    return names


def sumstream_env(run_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment of a sumstream child process of this run.

    No real API key is passed on: every upstream call of a benchmark goes to the simulator.
    """
    env = child_env(data_dir=str(run_dir / "data"), **overrides)
    for name in (
        "SUMSTREAM_ANTHROPIC_API_KEY",
        "SUMSTREAM_ANTHROPIC_BASE_URL",
        "ANTHROPIC_API_KEY",
    ):
        env.pop(name, None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def write_keys(path: Path, keys: list[tuple[str, str, str]]) -> None:
    """A gateway keys file (JSON) for (key, user, tier) triples, storing only the hashes."""
    import hashlib

    rows = [
        {"sha256": hashlib.sha256(key.encode()).hexdigest(), "user": user, "tier": tier}
        for key, user, tier in keys
    ]
    path.write_text(json.dumps({"keys": rows}, indent=1))


# -- what the report says about the machine ---------------------------------------------------


def broker_jit() -> str:
    """Which JIT the running broker uses (from its command line)."""
    for cmdline_path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            argv = Path(cmdline_path).read_bytes().split(b"\0")
        except OSError:
            continue
        if b"kafka.Kafka" in argv:
            c1 = any(a.startswith(b"-XX:TieredStopAtLevel=") for a in argv)
            return "C1 only (-XX:TieredStopAtLevel=1)" if c1 else "full tiered JIT (C2)"
    return "unknown"


def kafka_version() -> str:
    """The version of the running broker's jars (from its command line), else of the pom."""
    for cmdline_path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            argv = Path(cmdline_path).read_bytes().split(b"\0")
        except OSError:
            continue
        if b"kafka.Kafka" not in argv:
            continue
        with contextlib.suppress(ValueError, IndexError):
            classpath = argv[argv.index(b"-cp") + 1].decode()
            for entry in classpath.split(":"):
                for jar in glob.glob(entry):
                    name = Path(jar).name
                    if name.startswith("kafka-server-") and name.endswith(".jar"):
                        version = name.removeprefix("kafka-server-").removesuffix(".jar")
                        if version[:1].isdigit():
                            return version
    pom = REPO_ROOT / "deploy" / "kafka" / "pom.xml"
    with contextlib.suppress(OSError):
        text = pom.read_text()
        start = text.find("<kafka.version>")
        if start >= 0:
            end = text.find("</kafka.version>", start)
            return text[start + len("<kafka.version>") : end] + " (pom)"
    return "unknown"


def machine() -> dict[str, Any]:
    """Cores, memory, CPU model, load, Python and library versions."""
    import platform
    from importlib import metadata

    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "kafka": kafka_version(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in (
        "anthropic",
        "faust-streaming",
        "aiokafka",
        "confluent-kafka",
        "fastavro",
        "uvicorn",
        "starlette",
        "fastapi",
        "sse-starlette",
        "httpx",
        "uvloop",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    info["versions"] = versions
    return info


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (other users of the machine show here)."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def listening_pid(port: int) -> int | None:
    """The pid of the process listening on TCP ``port`` here (to meter a broker we did not
    start); None when it cannot be seen."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                # local address is HEX_IP:HEX_PORT; state 0A is LISTEN.
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    if os.readlink(f"{fd_dir}/{fd}") in targets:
                        return int(fd_dir.split("/")[2])
    return None
