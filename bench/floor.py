"""The floor: CPU per request and TTFT of the minimal implementations of sumstream's
architecture, bottom up, beside the baseline and sumstream itself, on this machine
(docs/architecture.md, "Performance targets").

    python -m bench.floor                 # 3 rounds of every row, about 5 minutes on 2 cores
    python -m bench.floor --rounds 1 --rows baseline,bare

Rows (each a closed loop of ``--concurrency`` streams, ``--requests`` timed requests, the
simulator and corpus the bench uses):

* ``baseline``: bench/baseline.py (direct SDK -> SSE);
* ``sumstream``: the bench's sumstream (its workers and one gateway); its topics are counted
  afterwards, which gives the records one request needs (N deltas and their sizes);
* ``bare``: the broker carrying exactly those records, produced and consumed by bare aiokafka in
  one process (gateway tail, and one worker group for preprocess, inference, postprocess);
* ``faust``: the worker side as a Faust app that only forwards, calling the model;
* ``gateway``: Starlette/uvicorn POST + SSE fed from one consumer, in front of that Faust app,
  driven by the bench's HTTP client: the whole floor at once.

It starts its own broker (ports 19190/19191, data in ``.data-floor/``) so other users of the
shared broker do not show in the broker's CPU, and uses ports 19150-19189 for the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from bench import client, corpus, profile, stack, stats
from bench.floor_report import ROWS, census, markdown, summarize
from pipeline.core.settings import REPO_ROOT

BROKER_PORT, CONTROLLER_PORT = 19190, 19191
SIM_PORT, BASELINE_PORT, GATEWAY_PORT, SUMSTREAM_GATEWAY_PORT = 19150, 19151, 19160, 19161
FLOOR_TOPICS = ("requests", "preprocessed", "tokens", "results")


def broker_env(data_dir: Path) -> None:
    """Point this process and its children at the floor's own broker."""
    os.environ.update(
        {
            "SUMSTREAM_DATA_DIR": str(data_dir),
            "SUMSTREAM_BROKER_PORT": str(BROKER_PORT),
            "SUMSTREAM_CONTROLLER_PORT": str(CONTROLLER_PORT),
            "SUMSTREAM_BOOTSTRAP_SERVERS": f"127.0.0.1:{BROKER_PORT}",
        }
    )
    jars = REPO_ROOT / ".data" / "kafka" / "jars"
    if "SUMSTREAM_JARS_DIR" not in os.environ and jars.is_dir():
        os.environ["SUMSTREAM_JARS_DIR"] = str(jars)


def create_floor_topics(bootstrap: str, prefix: str, partitions: int = 6) -> None:
    """The four topics a floor row uses, with sumstream's partition counts."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = [NewTopic(f"{prefix}{n}", partitions, 1) for n in FLOOR_TOPICS]
    for future in admin.create_topics(new, operation_timeout=30).values():
        future.result(timeout=30)


class Floor:
    """One floor run: the started processes, the simulator and what each row measured."""

    def __init__(self, args: argparse.Namespace, st: stack.Stack) -> None:
        self.args = args
        self.st = st
        self.bootstrap = f"127.0.0.1:{BROKER_PORT}"
        self.sim_url = f"http://127.0.0.1:{SIM_PORT}"
        self.broker_pid: int | None = None
        self.results: list[dict[str, Any]] = []
        self.round = 0
        self.incorrect = 0
        self.failures: list[str] = []
        self.bursts: list[dict[str, Any]] = []
        self.census: dict[str, Any] | None = None
        self.baseline: stack.Proc | None = None
        self.next_index = 0

    def docs(self, n: int) -> Callable[[int], tuple[str, str]]:
        first = self.next_index
        table = {i: corpus.request(i, self.args.max_tokens) for i in range(first, first + n)}
        self.next_index += n
        return table.__getitem__

    async def measure(
        self,
        row: str,
        pids: Mapping[str, tuple[int, ...]],
        load: Callable[[], Awaitable[list[float]]],
    ) -> dict[str, Any]:
        """Run ``load`` (it returns TTFTs in ms) with the CPU of ``pids`` metered."""
        load_before = stack.loadavg()
        self.incorrect = 0
        meter = profile.CpuMeter({**pids, "broker": (self.broker_pid or 0,)})
        meter.start()
        ttfts = await load()
        cpu = meter.stop()
        n = len(ttfts)
        per = {k: round(v["cpu_s"] * 1000.0 / n, 1) for k, v in cpu["processes"].items()}
        system = {k: v for k, v in per.items() if k != "broker" or row != "baseline"}
        result = {
            "row": row,
            "round": self.round,
            "n": n,
            "cpu_ms": per,
            "total_ms": round(sum(system.values()), 1),
            "ttft_p50": round(stats.percentile(ttfts, 50), 1),
            "ttft_p99": round(stats.percentile(ttfts, 99), 1),
            "machine_busy": cpu["machine_busy"],
            "incorrect": self.incorrect,
            "load": [load_before, stack.loadavg()],
        }
        print(f"floor: {json.dumps(result)}", file=sys.stderr)
        self.results.append(result)
        return result

    async def http_loop(
        self, target: client.Target, n: int, concurrency: int | None = None
    ) -> list[float]:
        records = await client.closed_loop(
            target,
            "floor",
            self.docs(n),
            concurrency=concurrency or self.args.concurrency,
            requests=n,
            max_output_tokens=self.args.max_tokens,
            first_index=self.next_index - n,
        )
        bad = [r for r in records if not (r.complete and r.in_order)]
        if bad:
            # Counted and reported, not fatal: the row's CPU is still that of its requests.
            self.incorrect += len(bad)
            reasons = {r.failure or r.outcome for r in bad}
            print(f"floor: {target.name}: {len(bad)} streams incorrect: {reasons}", file=sys.stderr)
        return [r.ttft_ms for r in records if r.ttft_ms is not None]

    async def burst(self, row: str, target: client.Target) -> None:
        """The 100-user burst of the bench: its p99 TTFT over a single user's, and `accepted`
        p99 (the baseline has no `accepted`: its status line stands in)."""
        if not self.args.burst:
            return
        single = await self.http_loop(target, 8, concurrency=1)
        n = self.args.burst
        records = await client.burst(
            target,
            "floor",
            self.docs(n),
            users=n,
            max_output_tokens=self.args.max_tokens,
            first_index=self.next_index - n,
        )
        ttfts = [r.ttft_ms for r in records if r.ttft_ms is not None]
        accepted = [r.accepted_ms or r.ttfb_ms for r in records]
        figures = {
            "row": row,
            "round": self.round,
            "users": n,
            "single_p99": round(stats.percentile(single, 99), 1),
            "burst_p99": round(stats.percentile(ttfts, 99), 1),
            "accepted_p99": round(stats.percentile([a for a in accepted if a is not None], 99), 1),
        }
        figures["ratio"] = round(figures["burst_p99"] / figures["single_p99"], 2)
        print(f"floor: burst {json.dumps(figures)}", file=sys.stderr)
        self.bursts.append(figures)

    async def row_baseline(self) -> None:
        if self.baseline is None:
            argv = [sys.executable, "-m", "bench.baseline", "--port", str(BASELINE_PORT)]
            self.baseline = self.st.spawn("baseline", [*argv, "--sim-url", self.sim_url], env())
            await self.st.wait_http(self.baseline, f"http://127.0.0.1:{BASELINE_PORT}/healthz", 30)
        target = client.Target("baseline", f"http://127.0.0.1:{BASELINE_PORT}/v1/summaries")
        await self.http_loop(target, self.args.concurrency)  # warm-up
        pids = {"baseline": (self.baseline.pid,)}
        await self.measure("baseline", pids, lambda: self.http_loop(target, self.args.requests))
        await self.burst("baseline", target)

    async def row_sumstream(self) -> None:
        """A fresh sumstream each round, stopped after it: idle, its consumers' polls would
        show in the broker's CPU in the other rows."""
        from bench import run, scenarios

        plan = scenarios.Plan(workers=self.args.workers)
        run_id = f"floor-{uuid.uuid4().hex[:8]}"
        started = await run.start_sumstream(
            plan,
            self.st,
            run_id,
            self.sim_url,
            self.args.workers,
            1,
            port=lambda: SUMSTREAM_GATEWAY_PORT,
        )
        try:
            target = started.target
            await self.http_loop(target, 2 * self.args.concurrency)  # warm-up and the join
            pids = {k: v for k, v in started.pids.items() if k != "broker"}
            await self.measure(
                "sumstream", pids, lambda: self.http_loop(target, self.args.requests)
            )
            await self.burst("sumstream", target)
        finally:
            self.st.stop(started.procs)
        self.census = census(self.bootstrap, f"{run_id}.")
        print(f"floor: census {json.dumps(self.census)}", file=sys.stderr)

    def config(self, prefix: str, upstream: bool) -> str:
        census_ = self.census or {}
        sizes = dict(census_.get("mean_bytes", {}))
        cfg = {
            "bootstrap": self.bootstrap,
            "prefix": prefix,
            "deltas": self.args.deltas or round(census_.get("deltas_per_request", 33)),
            "tokens": self.args.max_tokens,
            "upstream": self.sim_url if upstream else None,
            "sizes": sizes,
        }
        return json.dumps(cfg)

    async def pipe(self, row: str, prefix: str, with_worker: bool, more: dict[str, Any]) -> None:
        """The bare gateway side (and worker side) as a child driven over stdin."""
        argv = [sys.executable, "-m", "bench.floor_parts", "pipe"]
        argv += ["--config", self.config(prefix, upstream=not with_worker)]
        argv += ["--concurrency", str(self.args.concurrency), "--requests", str(self.args.requests)]
        if with_worker:
            argv.append("--worker")
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO_ROOT,
            env=env(),
        )
        assert proc.stdin is not None and proc.stdout is not None
        stdin, stdout = proc.stdin, proc.stdout
        try:
            line = await asyncio.wait_for(stdout.readline(), 120)
            if line.strip() != b"ready":
                raise RuntimeError(f"floor_parts pipe did not start: {line!r}")

            async def load() -> list[float]:
                stdin.write(b"go\n")
                await stdin.drain()
                out = json.loads(await asyncio.wait_for(stdout.readline(), 120))
                ttfts: list[float] = out["ttft_ms"]
                return ttfts

            await self.measure(row, {"pipe": (proc.pid,), **more}, load)
            stdin.write(b"done\n")
            await stdin.drain()
            await asyncio.wait_for(proc.wait(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    async def row_bare(self) -> None:
        prefix = f"floor-{uuid.uuid4().hex[:8]}."
        create_floor_topics(self.bootstrap, prefix)
        await self.pipe("bare", prefix, with_worker=True, more={})

    async def row_lean(self) -> None:
        """The floor without Faust: the bare worker side calling the model, and the gateway."""
        prefix = f"floor-{uuid.uuid4().hex[:8]}."
        create_floor_topics(self.bootstrap, prefix)
        parts = [sys.executable, "-m", "bench.floor_parts"]
        config = self.config(prefix, upstream=True)
        worker = self.st.spawn(f"lean-{prefix}", [*parts, "worker", "--config", config], env())
        await self.gateway_row("lean", config, prefix, worker)

    async def gateway_row(self, row: str, config: str, prefix: str, worker: stack.Proc) -> None:
        """The Starlette gateway in front of ``worker``, driven by the bench's HTTP client."""
        argv = [sys.executable, "-m", "bench.floor_parts", "gateway", "--config", config]
        gateway = self.st.spawn(f"gateway-{prefix}", [*argv, "--port", str(GATEWAY_PORT)], env())
        try:
            await self.st.wait_http(gateway, f"http://127.0.0.1:{GATEWAY_PORT}/healthz", 60)
            url = f"http://127.0.0.1:{GATEWAY_PORT}/v1/summaries"
            target = client.Target("floor-gateway", url)
            await self.http_loop(target, max(2 * self.args.concurrency, 40))  # warm-up
            pids = {"gateway": (gateway.pid,), "worker": (worker.pid,)}
            await self.measure(row, pids, lambda: self.http_loop(target, self.args.requests))
            await self.burst(row, target)
        finally:
            self.st.stop([gateway, worker])

    async def rows_faust_gateway(self, rows: set[str]) -> None:
        """The forwarding Faust worker behind the bare gateway side, then behind the gateway."""
        prefix = f"floor-{uuid.uuid4().hex[:8]}."
        create_floor_topics(self.bootstrap, prefix)
        config = self.config(prefix, upstream=True)
        parts = [sys.executable, "-m", "bench.floor_parts"]
        worker = self.st.spawn(f"faust-{prefix}", [*parts, "faust", "--config", config], env())
        try:
            if "faust" in rows:
                await self.pipe("faust", prefix, with_worker=False, more={"worker": (worker.pid,)})
            if "gateway" in rows:
                await self.gateway_row("gateway", config, prefix, worker)
        finally:
            self.st.stop([p for p in (worker,) if p in self.st.procs])


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


async def run_floor(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.core.settings import BrokerSettings
    from pipeline.ops import broker

    data_dir = REPO_ROOT / ".data-floor"
    broker_env(data_dir)
    run_dir = data_dir / "runs" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    run_dir.mkdir(parents=True, exist_ok=True)
    st = stack.Stack(run_dir)
    floor = Floor(args, st)
    started = broker.start(BrokerSettings())
    floor.broker_pid = stack.listening_pid(BROKER_PORT)
    rows = set(args.rows)
    try:
        sim_argv = ["llm-sim", "--port", str(SIM_PORT), "--ttft-ms", str(args.ttft_ms)]
        sim_argv += ["--token-delay-ms", str(args.token_ms), "--log-level", "warning"]
        sim = st.spawn_cli("llm-sim", sim_argv, env())
        await st.wait_http(sim, f"{floor.sim_url}/healthz", 30)
        for round_no in range(args.rounds):
            print(f"floor: round {round_no + 1} of {args.rounds}", file=sys.stderr)
            floor.round = round_no
            steps: list[tuple[bool, Callable[[], Awaitable[None]]]] = [
                ("sumstream" in rows, floor.row_sumstream),
                ("baseline" in rows, floor.row_baseline),
                ("bare" in rows, floor.row_bare),
                (bool(rows & {"faust", "gateway"}), lambda: floor.rows_faust_gateway(rows)),
                ("lean" in rows, floor.row_lean),
            ]
            for wanted, step in steps:
                if not wanted:
                    continue
                try:
                    await step()
                except Exception as exc:  # one row's failure must not lose the others
                    print(f"floor: a row failed: {exc!r}", file=sys.stderr)
                    floor.failures.append(repr(exc))
    finally:
        st.close()
        if started and not args.keep_broker:
            broker.stop(BrokerSettings())
    return {
        "machine": stack.machine(),
        "broker_jit": stack.broker_jit(),
        "args": vars(args),
        "census": floor.census,
        "failures": floor.failures,
        "bursts": floor.bursts,
        "results": floor.results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=lambda s: s.split(","), default=list(ROWS))
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--ttft-ms", type=float, default=200.0)
    parser.add_argument("--token-ms", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--deltas", type=int, default=0, help="DELTA records per request (0: sumstream's)"
    )
    parser.add_argument("--burst", type=int, default=100, help="users at once (0: none)")
    parser.add_argument("--keep-broker", action="store_true")
    parser.add_argument("--render", type=Path, help="print the table of an earlier run's JSON")
    args = parser.parse_args(argv)
    if args.render is not None:
        report = json.loads(args.render.read_text())
        out = args.render
    else:
        report = asyncio.run(run_floor(args))
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        out = REPO_ROOT / "bench" / "results" / f"floor-{stamp}.json"
    report["summary"] = summarize(report["results"])
    out.write_text(json.dumps(report, indent=1))
    table = markdown(report)
    # The JSON is gitignored with the bench's; the table beside it is what gets committed.
    incorrect = {r["row"]: 0 for r in report["results"]}
    for r in report["results"]:
        incorrect[r["row"]] += r.get("incorrect", 0)
    notes = (
        f"machine: {report['machine'].get('cores')} cores, broker {report['broker_jit']}; "
        f"streams without a correct end per row: {incorrect}; failed rows: "
        f"{report.get('failures') or 'none'}\n\ncensus: {report['census']}\n"
    )
    out.with_suffix(".md").write_text(f"# floor {out.stem}\n\n{table}\n\n{notes}")
    print(table)
    print(f"\ncensus: {json.dumps(report['census'])}\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
