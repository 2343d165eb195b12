"""Real sumstream processes for integration and end-to-end tests: the simulator, workers and
gateways as subprocesses on the shared broker, each stack on a topic prefix and app id of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka.admin import AdminClient

from gateway.http.auth import hash_key
from pipeline.core.settings import KafkaSettings
from pipeline.core.topics import TopicNames
from pipeline.kafka.admin import create_topics, delete_topics
from tests.harness.ports import free_port
from tests.harness.waiting import eventually

REPO = Path(__file__).resolve().parents[2]
BOOTSTRAP = os.environ.get("SUMSTREAM_BOOTSTRAP_SERVERS", "127.0.0.1:9092")

# Users with their own keys, so ownership checks have someone to fail against; the admission
# tests (tests/e2e/test_backpressure.py) add a flooder, light users and tight-limit users.
KEYS = {
    "key-ann": ("ann", "enterprise"),
    "key-ben": ("ben", "enterprise"),
    "key-fay": ("fay", "free"),
    "key-flood": ("flood", "pro"),
    **{f"key-light-{i}": (f"light-{i}", "pro") for i in range(1, 6)},
    "key-tina": ("tina", "tight"),
    "key-zed": ("zed", "quick"),
}


def auth(key: str = "key-ann") -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Proc:
    """One sumstream subprocess, its log in a file, restartable."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    # Where this run's lines begin in the log (a restarted process appends to it).
    log_start: int = 0

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.log_start = log.tell()
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "pipeline.ops.cli", *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def check_alive(self) -> None:
        """Raise (ending any wait at once) when the process has exited."""
        if not self.alive():
            raise RuntimeError(f"{self.name} exited:\n{self.tail()}")

    def kill9(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill9()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def log_lines(self) -> list[str]:
        """This run's log lines (since the last start)."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self.log_start)
                return f.read().decode(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def records(self) -> list[dict[str, Any]]:
        """This run's JSON log lines (the others, Faust's own, skipped)."""
        out: list[dict[str, Any]] = []
        for line in self.log_lines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    record = json.loads(line)
                    if isinstance(record, dict):
                        out.append(record)
        return out

    def logged(self, msg: str, **fields: Any) -> list[dict[str, Any]]:
        """This run's log records with message ``msg`` and the given field values."""
        return [
            r
            for r in self.records()
            if r.get("msg") == msg and all(r.get(k) == v for k, v in fields.items())
        ]

    def wait_for_log(self, msg: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        """The first log record with message ``msg`` and ``fields``, once the process wrote it."""

        def found() -> dict[str, Any] | None:
            hits = self.logged(msg, **fields)
            if hits:
                return hits[0]
            self.check_alive()
            return None

        return eventually(found, timeout=timeout, message=f"{self.name} to log {msg!r} {fields}")

    def metrics_port(self, timeout: float = 90.0) -> int:
        """The port a worker serves /metrics on, from its `metrics` log line (it is started
        with --metrics-port 0: any free port)."""
        return int(self.wait_for_log("metrics", timeout=timeout)["port"])

    def owned_partitions(self) -> set[int]:
        """The in-flight partitions this worker was last assigned (from its log)."""
        assigned = self.logged("inflight partitions assigned")
        return set(assigned[-1]["partitions"]) if assigned else set()


def wait_http(url: str, proc: Proc, timeout: float = 90.0) -> None:
    """Wait until ``url`` answers 200, failing at once if ``proc`` exits."""

    def ready() -> bool:
        proc.check_alive()
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(url, timeout=1.0).status_code == 200
        return False

    eventually(ready, timeout=timeout, message=f"{url} ready\n{proc.tail()}")


def wait_for_balanced_group(workers: list[Proc], partitions: int, timeout: float = 90.0) -> None:
    """Wait until every worker's last assignment is its share of the in-flight partitions: each
    holds some, no two hold the same one, and together they hold all (the group has settled)."""

    def balanced() -> bool:
        for worker in workers:
            worker.check_alive()
        owned = [w.owned_partitions() for w in workers]
        every = [p for share in owned for p in share]
        assert all(owned), f"a worker holds nothing yet: {owned}"
        assert sorted(every) == list(range(partitions)), f"not one owner each: {owned}"
        return True

    eventually(balanced, timeout=timeout, message="the workers' group to settle")


@dataclass
class Stack:
    """A running pipeline: simulator, workers, gateways, all on one random topic prefix."""

    tmp: Path
    bootstrap: str = BOOTSTRAP
    prefix: str = field(default_factory=lambda: f"e2e-{uuid.uuid4().hex[:8]}.")
    app_id: str = field(default_factory=lambda: f"e2e-{uuid.uuid4().hex[:8]}")
    sim_port: int = field(default_factory=free_port)
    procs: list[Proc] = field(default_factory=list)
    gateways: list[str] = field(default_factory=list)
    workers: list[Proc] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def settings(self) -> KafkaSettings:
        # The topics this harness creates take the records the stack's processes may write.
        record_bytes = self.extra_env.get("SUMSTREAM_MAX_RECORD_BYTES")
        settings = KafkaSettings(bootstrap_servers=self.bootstrap, topic_prefix=self.prefix)
        if record_bytes:
            return settings.model_copy(update={"max_record_bytes": int(record_bytes)})
        return settings

    @property
    def topics(self) -> TopicNames:
        return TopicNames.from_settings(self.settings)

    @property
    def sim_url(self) -> str:
        return f"http://127.0.0.1:{self.sim_port}"

    @property
    def gateway(self) -> str:
        return self.gateways[0]

    def env(self, **extra: str) -> dict[str, str]:
        keys_file = self.tmp / "keys.json"
        if not keys_file.exists():
            entries = [{"sha256": hash_key(k), "user": u, "tier": t} for k, (u, t) in KEYS.items()]
            keys_file.write_text(json.dumps({"keys": entries}))
        env = dict(os.environ)
        env.update(
            {
                "SUMSTREAM_BOOTSTRAP_SERVERS": self.bootstrap,
                "SUMSTREAM_TOPIC_PREFIX": self.prefix,
                "SUMSTREAM_APP_ID": self.app_id,
                "SUMSTREAM_LLM_SIM_URL": self.sim_url,
                "SUMSTREAM_KEYS_FILE": str(keys_file),
                "SUMSTREAM_LOG_LEVEL": "info",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.pop("ANTHROPIC_API_KEY", None)
        env.pop("SUMSTREAM_ANTHROPIC_API_KEY", None)
        env.update(self.extra_env)
        env.update(extra)
        return env

    def spawn(self, name: str, args: list[str], **env: str) -> Proc:
        proc = Proc(name, args, self.env(**env), self.tmp / f"{name}.log")
        proc.start()
        self.procs.append(proc)
        return proc

    def start_simulator(self, ttft_ms: float = 20, token_delay_ms: float = 2, **knobs: str) -> Proc:
        args = ["llm-sim", "--port", str(self.sim_port), "--ttft-ms", str(ttft_ms)]
        args += ["--token-delay-ms", str(token_delay_ms)]
        for k, v in knobs.items():
            args += [f"--{k.replace('_', '-')}", v]
        proc = self.spawn("llm-sim", args)
        wait_http(f"{self.sim_url}/healthz", proc)
        return proc

    def start_worker(
        self, stages: str = "preprocess,inference,postprocess", name: str = "", **env: str
    ) -> Proc:
        proc = self.spawn(
            name or f"worker-{len(self.workers)}",
            ["worker", "--stages", stages, "--metrics-port", "0"],
            **env,
        )
        self.workers.append(proc)
        return proc

    def start_gateway(self, index: int = 0, count: int = 1, **env: str) -> Proc:
        port = free_port()
        args = ["gateway", "--port", str(port)]
        args += ["--instance-index", str(index), "--instance-count", str(count)]
        proc = self.spawn(f"gateway-{index}-of-{count}-{port}", args, **env)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/readyz", proc)
        self.gateways.append(url)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def remove_topics(self) -> None:
        """Delete this stack's topics and its workers' own (Faust's changelog and assignor
        topics, of its app id and of a ``-replay`` one beside it)."""
        delete_topics(self.settings)
        internal = [
            f"{app_id}-{name}"
            for app_id in (self.app_id, f"{self.app_id}-replay")
            for name in (
                "inflight-changelog",
                "request-ids-changelog",
                "longdoc-changelog",
                "sessions-changelog",
                "__assignor-__leader",
            )
        ]
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for future in admin.delete_topics(internal, operation_timeout=10).values():
            with contextlib.suppress(Exception):  # a topic that was never created
                future.result()

    def logs(self) -> str:
        return "\n\n".join(f"== {p.name} ==\n{p.tail(60)}" for p in self.procs)

    def metrics_urls(self) -> dict[str, str]:
        """The /metrics URL of every running gateway, worker and simulator, by process name."""
        urls: dict[str, str] = {}
        for proc in self.procs:
            if not proc.alive():
                continue
            if proc in self.workers:
                urls[proc.name] = f"http://127.0.0.1:{proc.metrics_port()}/metrics"
            elif proc.name == "llm-sim":
                urls[proc.name] = f"{self.sim_url}/metrics"
            elif proc.name.startswith("gateway-"):
                port = proc.args[proc.args.index("--port") + 1]
                urls[proc.name] = f"http://127.0.0.1:{port}/metrics"
        return urls

    # --- simulator control -------------------------------------------------------------

    def sim_admin_headers(self) -> dict[str, str]:
        """The simulator's admin bearer token, when the stack's environment sets one."""
        token = self.env().get("SUMSTREAM_SIM_ADMIN_TOKEN")
        return {"Authorization": f"Bearer {token}"} if token else {}

    def sim_config(self, **knobs: Any) -> dict[str, Any]:
        r = httpx.post(
            f"{self.sim_url}/_sim/config", json=knobs, headers=self.sim_admin_headers(), timeout=5
        )
        r.raise_for_status()
        return dict(r.json())

    def sim_stats(self) -> dict[str, Any]:
        r = httpx.get(f"{self.sim_url}/_sim/stats", headers=self.sim_admin_headers(), timeout=5)
        r.raise_for_status()
        return dict(r.json())


@contextlib.contextmanager
def running_stack(
    tmp: Path,
    workers: int = 1,
    gateways: int = 1,
    env: dict[str, str] | None = None,
    bootstrap: str = BOOTSTRAP,
    **sim: Any,
) -> Iterator[Stack]:
    """Topics, simulator (``sim`` knobs), workers and gateways; ``env`` goes to every process.

    ``bootstrap`` names another broker (a test that restarts its own) for every process.
    """
    stack = Stack(tmp, bootstrap=bootstrap, extra_env=dict(env or {}))
    try:
        create_topics(stack.settings)
        stack.start_simulator(**sim)
        for _ in range(workers):
            stack.start_worker()
        for i in range(gateways):
            stack.start_gateway(i, gateways)
        yield stack
    finally:
        stack.stop()
