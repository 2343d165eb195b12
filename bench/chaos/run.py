"""`python -m bench.chaos` (`make chaos`): start the cluster and the pipeline, run the load and
the seeded faults, drain, check, and write the report under ``.data/chaos/``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.chaos import cluster as kafka
from bench.chaos.checks import TERMINAL, ClientStream, Verdict, delta_seqs, evaluate
from bench.chaos.load import USERS, Client, document
from bench.chaos.report import write_report
from bench.chaos.schedule import Fault, plan
from bench.stack import Proc, Stack, free_port, sumstream_env, write_keys
from pipeline.core.pricing import PriceTable
from pipeline.core.settings import REPO_ROOT, KafkaSettings, WorkerSettings
from pipeline.core.topics import TopicNames
from pipeline.kafka.admin import create_topics
from pipeline.ops import broker
from pipeline.ops.replay import with_keys

SESSION_TIMEOUT_S = WorkerSettings().session_timeout_s


@dataclass
class Run:
    """Everything one chaos run started and saw."""

    seed: int
    duration_s: float
    run_dir: Path
    stack: Stack
    settings: KafkaSettings
    cluster: Any
    env: dict[str, str]
    sim_url: str
    workers: list[Proc] = field(default_factory=list)
    gateways: list[tuple[Proc, int]] = field(default_factory=list)
    streams: list[ClientStream] = field(default_factory=list)
    produced: list[str] = field(default_factory=list)
    maybe_produced: list[str] = field(default_factory=list)
    poison: set[tuple[int, int]] = field(default_factory=set)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    def note(self, what: str, **detail: Any) -> None:
        entry = {"t_s": round(time.monotonic() - self.t0, 2), "event": what, **detail}
        self.timeline.append(entry)
        print(f"chaos: {entry['t_s']:7.1f} s  {what} {detail or ''}", file=sys.stderr, flush=True)

    def gateway_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for proc, port in self.gateways if proc.alive()] or [
            f"http://127.0.0.1:{port}" for _, port in self.gateways
        ]


# -- the processes ----------------------------------------------------------------------------


def start_worker(run: Run, index: int) -> Proc:
    args = ["worker", "--stages", "preprocess,inference,postprocess", "--metrics-port", "0"]
    return run.stack.spawn_cli(f"worker-{index}", args, run.env)


async def start_gateway(run: Run, index: int, port: int) -> Proc:
    args = ["gateway", "--port", str(port), "--instance-index", str(index)]
    proc = run.stack.spawn_cli(f"gateway-{index}", [*args, "--instance-count", "2"], run.env)
    await run.stack.wait_http(proc, f"http://127.0.0.1:{port}/readyz", timeout_s=180)
    return proc


def kill(run: Run, proc: Proc, sig: signal.Signals = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.popen.pid, sig)
    if sig == signal.SIGKILL:
        proc.popen.wait()
        proc.log.close()
        run.stack.procs.remove(proc)


def last_assignment(proc: Proc) -> set[int] | None:
    """The in-flight partitions a worker logged last (None before its first assignment)."""
    found: set[int] | None = None
    for line in proc.log_path.read_text(errors="replace").splitlines():
        if '"inflight partitions assigned"' in line:
            with contextlib.suppress(ValueError, KeyError):
                found = set(json.loads(line)["partitions"])
    return found


async def settled(run: Run, timeout_s: float = 180.0) -> None:
    """Wait until the workers' group has settled: each holds a share, together all, no overlap.
    The load starts after, so the group's first formation is not among the faults."""
    deadline = time.monotonic() + timeout_s
    partitions = set(range(run.settings.work_partitions))
    while time.monotonic() < deadline:
        run.stack.check_alive()
        shares = [last_assignment(w) or set() for w in run.workers]
        every = [p for share in shares for p in share]
        if all(shares) and sorted(every) == sorted(partitions):
            return
        await asyncio.sleep(0.5)
    raise TimeoutError("the workers' group did not settle")


async def inject(run: Run, fault: Fault) -> None:
    """Apply one fault and undo it ``hold_s`` later."""
    await asyncio.sleep(max(0.0, fault.at_s - (time.monotonic() - run.t0)))
    if fault.kind == "kill-leader-broker":
        topic = TopicNames.from_settings(run.settings).tokens
        leader = await asyncio.to_thread(kafka.leader_of, run.settings, topic, 0)
        await asyncio.to_thread(broker.kill_node, run.cluster, leader)
        run.note("SIGKILL broker", node=leader, leads=f"{topic}[0]")
        await asyncio.sleep(fault.hold_s)
        await asyncio.to_thread(broker.start, run.cluster, 180.0)
        run.note("broker restarted", node=leader)
    elif fault.kind == "kill-worker":
        proc = run.workers[fault.target]
        kill(run, proc)
        run.note("SIGKILL worker", worker=fault.target)
        await asyncio.sleep(fault.hold_s)
        run.workers[fault.target] = start_worker(run, fault.target)
        run.note("worker restarted", worker=fault.target)
    elif fault.kind == "kill-gateway":
        proc, port = run.gateways[fault.target]
        kill(run, proc)
        run.note("SIGKILL gateway", gateway=fault.target)
        await asyncio.sleep(fault.hold_s)
        run.gateways[fault.target] = (await start_gateway(run, fault.target, port), port)
        run.note("gateway restarted", gateway=fault.target)
    elif fault.kind == "stop-worker":
        proc = run.workers[fault.target]
        kill(run, proc, signal.SIGSTOP)
        run.note("SIGSTOP worker", worker=fault.target, for_s=fault.hold_s)
        await asyncio.sleep(fault.hold_s)
        kill(run, proc, signal.SIGCONT)
        run.note("SIGCONT worker", worker=fault.target)
    else:
        where = await asyncio.to_thread(kafka.produce_poison, run.settings)
        run.poison.add(where)
        run.note("poison record", partition=where[0], offset=where[1])


async def another_system(run: Run, rng: random.Random, stop: asyncio.Event) -> None:
    """Requests produced straight onto `requests`, one every second or two."""
    while not stop.is_set():
        doc = document(rng)
        try:
            run.produced.append(
                await asyncio.to_thread(
                    kafka.produce_straight, run.settings, "ops", "enterprise", doc
                )
            )
        except kafka.InDoubt as exc:
            run.maybe_produced.append(exc.request_id)
            run.note("straight record not acknowledged (in doubt)", error=str(exc)[:120])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=rng.uniform(1.0, 2.0))


# -- afterwards -------------------------------------------------------------------------------


async def drain(run: Run, timeout_s: float) -> dict[str, dict[str, Any]]:
    """Results of the run, once every accepted request has a terminal one (or at the timeout)."""
    topic = TopicNames.from_settings(run.settings).results
    deadline = time.monotonic() + timeout_s
    while True:
        records = await asyncio.to_thread(kafka.read_all, run.settings, topic, "SummaryResult")
        results = {r["request_id"]: r for r in records}  # the latest per request (compaction)
        accepted = {s.request_id for s in run.streams if s.request_id} | set(run.produced)
        waiting = [i for i in accepted if results.get(i, {}).get("status") not in TERMINAL]
        if not waiting or time.monotonic() > deadline:
            run.note("drained", results=len(results), waiting=len(waiting))
            return results
        await asyncio.sleep(2.0)


async def ledgers(run: Run, results: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Each gateway's quota ledger (GET /v1/usage) per user, once they have settled."""
    expected: dict[str, int] = {}
    for r in results.values():
        expected[r["user_id"]] = expected.get(r["user_id"], 0) + int(r["usage"]["cost_micro_usd"])
    out: dict[str, dict[str, int]] = {}
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(30):
            for i, url in enumerate(run.gateway_urls()):
                usage: dict[str, int] = {}
                for key, user, _tier in USERS:
                    answer = await client.get(
                        f"{url}/v1/usage", headers={"Authorization": f"Bearer {key}"}
                    )
                    usage[user] = (
                        int(answer.json()["cost_micro_usd"]) if answer.status_code == 200 else -1
                    )
                out[f"gateway-{i}"] = usage
            if all(
                u.get(user, 0) == expected.get(user, 0)
                for u in out.values()
                for _, user, _ in USERS
            ):
                break
            await asyncio.sleep(1.0)
    return out


async def sim_records(run: Run) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.get(f"{run.sim_url}/_sim/stats")
        r.raise_for_status()
        return dict(r.json()["requests"])


# -- the run ----------------------------------------------------------------------------------


async def chaos(run: Run, clients: int) -> Verdict:
    rng = random.Random(run.seed)
    run.note("starting the 3-node cluster")
    await asyncio.to_thread(broker.start, run.cluster, 240.0)
    await asyncio.to_thread(create_topics, run.settings)
    sim_port = run.sim_url.rsplit(":", 1)[1]
    sim_args = ["llm-sim", "--port", sim_port, "--ttft-ms", "50", "--token-delay-ms", "10"]
    sim = run.stack.spawn_cli("llm-sim", sim_args, run.env)
    await run.stack.wait_http(sim, f"{run.sim_url}/healthz", timeout_s=60)
    run.workers = [start_worker(run, i) for i in range(2)]
    for i in range(2):
        port = free_port()
        run.gateways.append((await start_gateway(run, i, port), port))
    await settled(run)
    run.note("pipeline up")

    faults = plan(run.seed, run.duration_s, SESSION_TIMEOUT_S)
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0)) as http:
        run.t0 = time.monotonic()
        run.note("load and faults start", faults=[f.as_json() for f in faults])
        users = [USERS[i % (len(USERS) - 1)] for i in range(clients)]
        load = [
            asyncio.create_task(
                Client(random.Random(rng.random()), run.gateway_urls, u, run.streams).run(
                    http, stop
                )
            )
            for u in users
        ]
        load.append(asyncio.create_task(another_system(run, random.Random(rng.random()), stop)))
        injected = [asyncio.create_task(inject(run, f)) for f in faults]
        await asyncio.sleep(run.duration_s)
        await asyncio.gather(*injected)
        stop.set()
        run.note("load stops; clients finish their requests")
        # Bounded (with the drain below) so that a whole run stays within 10 minutes.
        _, pending = await asyncio.wait(load, timeout=90)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        run.note("clients done", still_waiting=len(pending))
    # Text in the topics is sealed with the users' data keys: read them all first.
    return await with_keys(run.settings, check(run))


async def check(run: Run) -> Verdict:
    """Read the topics and the simulator's records back, and judge the run."""
    results = await drain(run, timeout_s=90)
    usage = await ledgers(run, results)
    dlq_topic = TopicNames.from_settings(run.settings).dlq
    dlq = await asyncio.to_thread(kafka.read_all, run.settings, dlq_topic, "DeadLetter")
    served = await sim_records(run)
    tokens_topic = TopicNames.from_settings(run.settings).tokens
    tokens = await asyncio.to_thread(kafka.read_all, run.settings, tokens_topic, "TokenEvent")
    return evaluate(
        run.streams,
        run.produced,
        results,
        served,
        PriceTable.load(WorkerSettings().prices_file),
        dlq,
        run.poison,
        usage,
        maybe=set(run.maybe_produced),
        written=delta_seqs(tokens),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, default=240.0, help="seconds of load")
    parser.add_argument("--short", action="store_true", help="75 s of load (CI)")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--base-port", type=int, default=19120, help="the cluster's 6 ports")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".data" / "chaos")
    args = parser.parse_args(argv)
    duration = 75.0 if args.short else args.duration
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = args.out / f"{stamp}-seed{args.seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    cluster = kafka.cluster_settings(run_dir / "cluster", args.base_port)
    settings = kafka.run_settings(cluster, f"chaos-{uuid.uuid4().hex[:6]}.")
    sim_url = f"http://127.0.0.1:{free_port()}"
    keys = run_dir / "keys.json"
    write_keys(keys, USERS)
    env = sumstream_env(
        run_dir,
        bootstrap_servers=settings.bootstrap_servers,
        topic_prefix=settings.topic_prefix,
        app_id=f"chaos-{args.seed}-{uuid.uuid4().hex[:6]}",
        llm_sim_url=sim_url,
        keys_file=str(keys),
        replication_factor="3",
        min_insync_replicas="2",
        log_level="info",
    )
    run = Run(args.seed, duration, run_dir, Stack(run_dir), settings, cluster, env, sim_url)
    try:
        verdict = asyncio.run(chaos(run, args.clients))
    finally:
        run.stack.close()
        broker.stop(cluster)
    write_report(run, verdict)
    print(verdict.last_line())
    return 0 if verdict.ok else 1
