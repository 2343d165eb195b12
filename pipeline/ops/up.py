"""`sumstream up`: everything a person needs to summarize a document, in one command.

Starts the broker when none is reachable, creates the topics, starts the LLM simulator when
there is no ANTHROPIC_API_KEY, one worker process per core (every stage, splitting the
partitions), and the gateway. Ctrl-C stops everything it started, in reverse order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx

from pipeline.core.errors import SumstreamError
from pipeline.core.settings import BrokerSettings, WorkerSettings, child_env
from pipeline.kafka import admin
from pipeline.ops import broker

EXE = [sys.executable, "-m", "pipeline.ops.cli"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="gateway host")
    parser.add_argument("--port", type=int, default=8000, help="gateway port")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes, all stages, splitting the partitions (default: one per core)",
    )
    parser.add_argument("--sim-port", type=int, default=8088)
    parser.add_argument("--sim-ttft-ms", type=float, default=200.0)
    parser.add_argument("--sim-token-delay-ms", type=float, default=20.0)
    parser.add_argument("--ready-timeout", type=float, default=120.0)


@dataclass
class Stack:
    """The processes `up` started, stopped in reverse order."""

    log_dir: Path
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    started_broker: bool = False

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        # Each process logs JSON lines to its own file; the terminal keeps the instructions.
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [*EXE, *args], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append((name, proc))

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                log = self.log_dir / f"{name}.log"
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                raise RuntimeError(f"{name} exited with code {proc.returncode}; {log}:\n{tail}")

    def stop(self, settings: BrokerSettings) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop in 15 s; killing it", file=sys.stderr)
                proc.kill()
                proc.wait()
        if self.started_broker:
            broker.stop(settings)


def wait_http(url: str, stack: Stack, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stack.check_alive()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s")


def _raise_interrupt(_sig: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    settings = BrokerSettings()
    worker = WorkerSettings()
    stack = Stack(settings.data_dir / "logs")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    t0 = time.monotonic()
    try:
        if not broker.is_reachable(settings.bootstrap_servers, timeout_s=2.0):
            print("no broker reachable; starting the local Kafka broker...", file=sys.stderr)
            stack.started_broker = broker.start(settings)
        asyncio.run(admin.ensure_topics(settings))
        dev_key = secrets.token_urlsafe(24)
        env_over: dict[str, str] = {}
        if worker.anthropic_api_key is None:
            env_over["llm_sim_url"] = _start_simulator(args, stack)
        gateway_env = child_env(**env_over)
        dev_key = gateway_env.setdefault("SUMSTREAM_DEV_API_KEY", dev_key)
        # Signs the web app's stream tokens (docs/architecture.md, "The web app and WebSocket API").
        gateway_env.setdefault("SUMSTREAM_STREAM_TOKEN_SECRET", secrets.token_urlsafe(32))
        for i in range(args.workers):
            # The workers read the same keys (the dev key's user "dev" and its tier).
            stack.spawn(
                f"worker-{i}",
                ["worker", "--metrics-port", str(worker.metrics_port + i)],
                child_env(**env_over, dev_api_key=dev_key),
            )
        stack.spawn(
            "gateway", ["gateway", "--host", args.host, "--port", str(args.port)], gateway_env
        )
        base = f"http://{args.host}:{args.port}"
        wait_http(f"{base}/readyz", stack, args.ready_timeout)
        elapsed = time.monotonic() - t0
        print(_banner(base, dev_key, stack.log_dir, elapsed, args.workers), flush=True)
        while True:
            stack.check_alive()
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("\nstopping...", file=sys.stderr)
        return 0
    except (RuntimeError, TimeoutError, SumstreamError) as exc:
        print(f"sumstream up failed: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop(settings)


def _start_simulator(args: argparse.Namespace, stack: Stack) -> str:
    """Start the LLM simulator (no API key is set) and return its URL once it answers."""
    sim_url = f"http://127.0.0.1:{args.sim_port}"
    stack.spawn(
        "llm-sim",
        [
            "llm-sim",
            "--port",
            str(args.sim_port),
            "--ttft-ms",
            str(args.sim_ttft_ms),
            "--token-delay-ms",
            str(args.sim_token_delay_ms),
        ],
        child_env(llm_sim_url=sim_url),
    )
    wait_http(f"{sim_url}/healthz", stack, args.ready_timeout)
    return sim_url


def _banner(base: str, dev_key: str, log_dir: Path, elapsed_s: float, workers: int) -> str:
    """What a person at the terminal needs: where it runs, the key, a command to try."""
    return (
        f"\nsumstream is up in {elapsed_s:.1f} s\n"
        f"  web app   {base}/  (sign in with the API key below)\n"
        f"  gateway   {base}  (OpenAPI: {base}/docs)\n"
        f"  workers   {workers} processes (one per core by default: --workers N)\n"
        f"  API key   {dev_key}\n"
        f"  logs      {log_dir}/\n\n"
        "Summarize a file:\n"
        "  python3 -c 'import json,sys;print(json.dumps({\"document\":sys.stdin.read()}))' \\\n"
        "      < README.md > /tmp/doc.json\n"
        f"  curl -N {base}/v1/summaries -H 'Authorization: Bearer {dev_key}' \\\n"
        "       -H 'Content-Type: application/json' --data-binary @/tmp/doc.json\n\n"
        "Ctrl-C stops everything."
    )
