"""Real sumstream processes for end-to-end tests: simulator, workers and gateways as subprocesses
on the broker the test command started, each test module with its own topics and consumer group."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gateway.http.auth import hash_key
from pipeline.core.settings import KafkaSettings
from pipeline.kafka.admin import create_topics

REPO = Path(__file__).resolve().parents[2]
BOOTSTRAP = os.environ.get("SUMSTREAM_BOOTSTRAP_SERVERS", "127.0.0.1:9092")

# Two users with their own keys, so ownership checks have someone to fail against.
KEYS = {
    "key-ann": ("ann", "enterprise"),
    "key-ben": ("ben", "enterprise"),
    "key-fay": ("fay", "free"),
    # Admission tests (test_backpressure.py): a flooder, light users, a tight-limit user.
    "key-flood": ("flood", "pro"),
    **{f"key-light-{i}": (f"light-{i}", "pro") for i in range(1, 6)},
    "key-tina": ("tina", "tight"),
    "key-zed": ("zed", "quick"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
        log = self.log_path.open("ab")
        self.log_start = log.tell()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "pipeline.ops.cli", *self.args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
        log.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill9(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
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

    def metrics_port(self, timeout_s: float = 90.0) -> int:
        """The port a worker serves /metrics on, from its `metrics` log line (it may have been
        started with --metrics-port 0: any free port)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in reversed(self.log_lines()):
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict) and record.get("msg") == "metrics":
                        return int(record["port"])
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} logged no metrics port in {timeout_s} s:\n{self.tail()}")


def wait_http(url: str, proc: Proc, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready in {timeout_s} s:\n{proc.tail()}")


@dataclass
class Stack:
    """A running pipeline: simulator, workers, gateways, all on one random topic prefix."""

    tmp: Path
    prefix: str = field(default_factory=lambda: f"e2e-{uuid.uuid4().hex[:8]}.")
    app_id: str = field(default_factory=lambda: f"e2e-{uuid.uuid4().hex[:8]}")
    sim_port: int = field(default_factory=free_port)
    procs: list[Proc] = field(default_factory=list)
    gateways: list[str] = field(default_factory=list)
    workers: list[Proc] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)

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
                "SUMSTREAM_BOOTSTRAP_SERVERS": BOOTSTRAP,
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

    def start_worker(self, stages: str = "preprocess,inference,postprocess", **env: str) -> Proc:
        n = len(self.workers)
        proc = self.spawn(
            f"worker-{n}", ["worker", "--stages", stages, "--metrics-port", "0"], **env
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

    def sim_config(self, **knobs: Any) -> dict[str, Any]:
        r = httpx.post(f"{self.sim_url}/_sim/config", json=knobs, timeout=5)
        r.raise_for_status()
        return dict(r.json())

    def sim_stats(self) -> dict[str, Any]:
        r = httpx.get(f"{self.sim_url}/_sim/stats", timeout=5)
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
    extra = dict(env or {})
    if bootstrap != BOOTSTRAP:
        extra["SUMSTREAM_BOOTSTRAP_SERVERS"] = bootstrap
    stack = Stack(tmp, extra_env=extra)
    try:
        create_topics(KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=stack.prefix))
        stack.start_simulator(**sim)
        for _ in range(workers):
            stack.start_worker()
        for i in range(gateways):
            stack.start_gateway(i, gateways)
        yield stack
    finally:
        stack.stop()


def auth(key: str = "key-ann") -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class SseEvent:
    event: str
    data: Any
    id: str | None = None


@dataclass
class StreamResult:
    """Everything one SSE client received."""

    status_code: int
    events: list[SseEvent] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def of(self, name: str) -> list[SseEvent]:
        return [e for e in self.events if e.event == name]

    @property
    def request_id(self) -> str:
        return str(self.of("accepted")[0].data["id"])

    @property
    def text(self) -> str:
        return "".join(e.data["text"] for e in self.of("token"))

    @property
    def seqs(self) -> list[int]:
        return [int(e.id) for e in self.of("token") if e.id is not None]

    @property
    def done(self) -> dict[str, Any]:
        done = self.of("done")
        assert done, f"no done event in {[e.event for e in self.events]}"
        return dict(done[-1].data)


async def sse_events(response: httpx.Response) -> AsyncIterator[SseEvent]:
    """Parse an SSE body (WHATWG rules: event/data/id fields, blank line ends an event)."""
    event, data, ident = "message", [], None
    async for line in response.aiter_lines():
        if line == "":
            if data:
                raw = "\n".join(data)
                try:
                    parsed: Any = json.loads(raw)
                except json.JSONDecodeError:
                    parsed = raw
                yield SseEvent(event, parsed, ident)
            event, data, ident = "message", [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            ident = value


async def collect(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    stop_after_tokens: int | None = None,
    **kwargs: Any,
) -> StreamResult:
    """Run one SSE request to its end (the `done` event) or until ``stop_after_tokens``."""
    async with client.stream(method, url, **kwargs) as response:
        result = StreamResult(response.status_code, headers=dict(response.headers))
        if response.status_code >= 300:
            await response.aread()
            result.events.append(SseEvent("http_error", response.json()))
            return result
        async for ev in sse_events(response):
            result.events.append(ev)
            if ev.event == "done":
                break
            if stop_after_tokens is not None and len(result.of("token")) >= stop_after_tokens:
                break
    return result


# name -> (rpm, tpm, max_input_tokens, max_output_tokens, weight, monthly_budget_usd,
#          max_queue_wait_s); the order of config/tiers.toml's fields.
TierRow = tuple[int, int, int, int, int, float, float]
# Every tier of a test tiers file allows every priced model (the default first).
TEST_TIER_MODELS = [
    "claude-haiku-4-5",
    "claude-3-5-haiku-latest",
    "claude-sonnet-4-5",
    "claude-opus-4-5",
    "claude-opus-4-1",
]


def write_tiers(
    path: Path, tiers: dict[str, TierRow], *, reject: frozenset[str] = frozenset()
) -> Path:
    """A tiers file for a test stack: ``reject`` tiers refuse oversized input, others truncate."""
    lines: list[str] = []
    for name, (rpm, tpm, max_in, max_out, weight, budget, wait) in tiers.items():
        policy = "reject" if name in reject else "truncate"
        lines += [
            f"[{name}]",
            f"rpm = {rpm}",
            f"tpm = {tpm}",
            f"max_input_tokens = {max_in}",
            f"max_output_tokens = {max_out}",
            f"weight = {weight}",
            f"monthly_budget_usd = {budget}",
            f"max_queue_wait_s = {wait}",
            f'on_input_too_large = "{policy}"',
            f"models = {json.dumps(TEST_TIER_MODELS)}",
            "",
        ]
    path.write_text("\n".join(lines))
    return path
