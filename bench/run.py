"""``python -m bench.run`` (``make bench``): sumstream against the notebook design, side by side.

Starts what it needs (the broker only when none is reachable; the simulator, the baseline, a
worker and the gateway always, with a random topic prefix and app id), runs the scenarios of
issue 7 against both systems in the same run, writes ``bench/results/<timestamp>.json`` and
``.md`` plus PNG plots, copies the report to ``bench/REPORT.md``, and stops everything it
started. ``--quick`` is a smoke run of a minute or two.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench import analysis, client, corpus, profile, report, stack
from pipeline.settings import REPO_ROOT, KafkaSettings

RESULTS = REPO_ROOT / "bench" / "results"
SYSTEMS = ("baseline", "sumstream")


@dataclass(frozen=True)
class Plan:
    """What a run measures. FULL fits in about 10 minutes on 2 cores; QUICK in one or two."""

    quick: bool = False
    systems: tuple[str, ...] = SYSTEMS
    ttft_ms: float = 200.0
    token_delay_ms: float = 10.0
    max_tokens: int = 100
    # 1: closed-loop concurrency levels and requests per system at each.
    levels: tuple[int, ...] = (1, 10, 50, 100)
    requests: dict[int, int] = field(default_factory=lambda: {1: 16, 10: 60, 50: 150, 100: 200})
    # 2 and 5: simultaneous users -> bursts per system of that size.
    bursts: dict[int, int] = field(default_factory=lambda: {10: 4, 100: 2})
    # 3: levels beyond those of scenario 1, each run for a fixed time.
    throughput_levels: tuple[int, ...] = (200,)
    throughput_duration_s: float = 6.0
    # 4: clients against an upstream limited to rl_max_concurrent streams.
    rl_clients: int = 64
    rl_max_concurrent: int = 8
    deadline_s: float = 60.0
    profile_s: float = 8.0
    profile_level: int = 50
    max_streams: int = 256
    users: int = 256
    tier: str = "pro"
    # Optional steps (throughput beyond scenario 1, profile) are skipped when the run has
    # used this share of its budget, so scenario 4 and the teardown still fit.
    budget_s: float = 600.0
    optional_until: float = 0.6

    @property
    def burst_users(self) -> tuple[int, ...]:
        return tuple(self.bursts)


QUICK = Plan(
    quick=True,
    levels=(1, 10),
    requests={1: 4, 10: 20},
    bursts={10: 1},
    throughput_levels=(),
    rl_clients=16,
    rl_max_concurrent=4,
    deadline_s=30.0,
    profile_s=0.0,
)


@dataclass
class Bench:
    """One run: the systems under test, the simulator, and everything recorded."""

    plan: Plan
    stack: stack.Stack
    sim_url: str
    targets: dict[str, client.Target]
    pids: dict[str, int]
    streams: list[dict[str, Any]] = field(default_factory=list)
    phases: list[dict[str, Any]] = field(default_factory=list)
    next_index: int = 0
    docs: dict[int, tuple[str, str]] = field(default_factory=dict)
    log: Callable[[str], None] = print
    skipped: list[str] = field(default_factory=list)

    def prepare(self, n: int) -> int:
        """Reserve ``n`` fresh documents (computed now, not while streams are timed)."""
        first = self.next_index
        for i in range(first, first + n):
            self.docs[i] = corpus.request(i, self.plan.max_tokens)
        self.next_index += n
        return first

    def doc(self, i: int) -> tuple[str, str]:
        return self.docs[i]

    async def sim(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        async with httpx.AsyncClient(base_url=self.sim_url, timeout=10.0) as http:
            resp = await http.request(method, path, json=body)
            resp.raise_for_status()
            return resp.json()

    async def phase(
        self,
        name: str,
        system: str,
        run: Callable[[client.Target], Awaitable[list[client.StreamRecord]]],
        **meta: Any,
    ) -> list[client.StreamRecord]:
        """Run one measured phase of one system, with its CPU use per process."""
        self.stack.check_alive()
        meter = profile.CpuMeter(self.pids)
        meter.start()
        t0 = time.time()
        records = await run(self.targets[system])
        cpu = meter.stop()
        ok = sum(1 for r in records if r.complete and r.in_order and r.own)
        self.log(
            f"  {name:<22} {system:<9} {len(records):>4} streams, {ok:>4} correct, "
            f"{cpu['wall_s']:>6.1f} s, machine busy {cpu['machine_busy']:.0%}"
        )
        self.phases.append(
            {"name": name, "system": system, "started": t0, "cpu": cpu, "n": len(records), **meta}
        )
        run_no = len(self.phases) - 1
        self.streams.extend(r.to_json() | {"run": run_no} for r in records)
        return records

    def keeps_pace(self, system: str) -> bool:
        """Whether ``system``'s p99 inter-token gap stayed within the throughput target of
        the simulator's pacing at every closed-loop level measured so far."""
        by = analysis.group(self.streams)
        for name in {p["name"] for p in self.phases if p["system"] == system}:
            if not name.startswith(("overhead/", "throughput/")):
                continue
            summary = analysis.summarize(by[(name, system)])
            over = summary["gap"]["p99"] - self.plan.token_delay_ms
            if not over <= analysis.THROUGHPUT_GAP_OVERHEAD_MS:
                return False
        return True

    def order(self, i: int) -> list[str]:
        """Systems in alternating order, so drift in the machine's load hits both alike."""
        systems = list(self.plan.systems)
        return systems if i % 2 == 0 else systems[::-1]


# -- scenarios --------------------------------------------------------------------------------


async def overhead(b: Bench) -> None:
    """1: closed loops at each concurrency, ABBA order (two halves per system)."""
    b.log("scenario 1: overhead by concurrency")
    p = b.plan
    for level_i, c in enumerate(p.levels):
        n = p.requests[c]
        halves = [n // 2, n - n // 2] if len(p.systems) > 1 else [n]
        order = b.order(level_i)
        schedule = list(zip(order, [halves[0]] * len(order), strict=True))
        if len(halves) > 1:
            schedule += list(zip(order[::-1], [halves[1]] * len(order), strict=True))
        for system, count in schedule:
            first = b.prepare(count)
            await b.phase(
                f"overhead/c{c}",
                system,
                functools.partial(
                    client.closed_loop,
                    phase=f"overhead/c{c}",
                    docs=b.doc,
                    concurrency=c,
                    requests=count,
                    max_output_tokens=p.max_tokens,
                    deadline_s=p.deadline_s,
                    first_index=first,
                ),
                scenario="overhead",
                concurrency=c,
            )


async def bursts(b: Bench) -> None:
    """2 and 5: all users at once, repeated, alternating systems."""
    b.log("scenario 2: bursts of simultaneous users")
    p = b.plan
    for users, repeats in p.bursts.items():
        for rep in range(repeats):
            for system in b.order(rep):
                first = b.prepare(users)
                await b.phase(
                    f"burst/u{users}",
                    system,
                    functools.partial(
                        client.burst,
                        phase=f"burst/u{users}",
                        docs=b.doc,
                        users=users,
                        max_output_tokens=p.max_tokens,
                        first_index=first,
                        deadline_s=p.deadline_s,
                    ),
                    scenario="burst",
                    concurrency=users,
                )
                await asyncio.sleep(0.5)


async def throughput(b: Bench) -> None:
    """3: higher closed-loop levels for a fixed time each (scenario 1's levels count too).

    A level runs only while some system still kept its p99 inter-token gap within the
    target at every level so far: past that, more load only measures a longer queue.
    """
    p = b.plan
    if not p.throughput_levels:
        return
    b.log("scenario 3: throughput beyond scenario 1's levels")
    for i, c in enumerate(p.throughput_levels):
        within = [s for s in p.systems if b.keeps_pace(s)]
        if not within:
            b.log(f"  throughput/c{c}: skipped, no system kept pace at the levels below")
            b.skipped.append(f"throughput/c{c} (no system kept pace below it)")
            return
        for system in b.order(i):
            count = c * 4
            first = b.prepare(count)
            await b.phase(
                f"throughput/c{c}",
                system,
                functools.partial(
                    client.closed_loop,
                    phase=f"throughput/c{c}",
                    docs=b.doc,
                    concurrency=c,
                    requests=count,
                    max_output_tokens=p.max_tokens,
                    duration_s=p.throughput_duration_s,
                    deadline_s=p.deadline_s,
                    first_index=first,
                ),
                scenario="throughput",
                concurrency=c,
            )


async def rate_limited(b: Bench) -> None:
    """4: the upstream takes at most ``rl_max_concurrent`` streams (429 beyond)."""
    p = b.plan
    b.log(f"scenario 4: upstream limited to {p.rl_max_concurrent} streams, {p.rl_clients} clients")
    for system in b.order(0):
        await b.sim("POST", "/_sim/reset")
        await b.sim("POST", "/_sim/config", {"max_concurrent": p.rl_max_concurrent})
        first = b.prepare(p.rl_clients)
        await b.phase(
            "rate_limited",
            system,
            functools.partial(
                client.burst,
                phase="rate_limited",
                docs=b.doc,
                users=p.rl_clients,
                max_output_tokens=p.max_tokens,
                first_index=first,
                deadline_s=p.deadline_s,
            ),
            scenario="rate_limited",
            concurrency=p.rl_clients,
        )
        # Retries still under way count too: give them a moment before reading the counts.
        await asyncio.sleep(1.0)
        b.phases[-1]["sim_stats"] = await b.sim("GET", "/_sim/stats?request_id=-")
    await b.sim("POST", "/_sim/reset")


async def profile_sumstream(b: Bench, out_dir: Path) -> dict[str, Any]:
    """py-spy on the gateway and the worker during an unmeasured closed loop."""
    p = b.plan
    if p.profile_s <= 0 or "sumstream" not in p.systems:
        return {}
    b.log(f"profile: py-spy on the gateway and the worker at {p.profile_level} streams")
    first = b.prepare(p.profile_level * 6)
    load = asyncio.create_task(
        client.closed_loop(
            b.targets["sumstream"],
            "profile",
            b.doc,
            concurrency=p.profile_level,
            requests=p.profile_level * 6,
            max_output_tokens=p.max_tokens,
            duration_s=p.profile_s + 3,
            deadline_s=p.deadline_s,
            first_index=first,
        )
    )
    await asyncio.sleep(1.5)  # past the ramp-up
    names = [n for n in ("gateway", "worker") if n in b.pids]
    files = {n: out_dir / f"pyspy-{n}.txt" for n in names}
    errors = await asyncio.gather(
        *(profile.record(b.pids[n], p.profile_s, files[n]) for n in names)
    )
    await load
    out: dict[str, Any] = {}
    for name, error in zip(names, errors, strict=True):
        if error is not None:
            out[name] = {"error": error}
        else:
            out[name] = profile.summarize_stacks(files[name].read_text(errors="replace"))
    return out


# -- the run ----------------------------------------------------------------------------------


async def start_systems(plan: Plan, st: stack.Stack, run_id: str) -> Bench:
    """Broker (if needed), topics, simulator, baseline, worker and gateway; all ready."""
    settings = KafkaSettings(topic_prefix=f"{run_id}.")
    pids: dict[str, int] = {}
    sim_port = stack.free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    env = stack.sumstream_env(st.run_dir)
    sim = st.spawn_cli(
        "llm-sim",
        [
            "llm-sim",
            "--port",
            str(sim_port),
            "--ttft-ms",
            str(plan.ttft_ms),
            "--token-delay-ms",
            str(plan.token_delay_ms),
            "--log-level",
            "warning",
        ],
        env,
    )
    await st.wait_http(sim, f"{sim_url}/healthz", 30)
    pids["llm-sim"] = sim.pid
    targets: dict[str, client.Target] = {}
    if "baseline" in plan.systems:
        port = stack.free_port()
        base = st.spawn(
            "baseline",
            [sys.executable, "-m", "bench.baseline", "--port", str(port), "--sim-url", sim_url],
            env,
        )
        await st.wait_http(base, f"http://127.0.0.1:{port}/healthz", 30)
        pids["baseline"] = base.pid
        targets["baseline"] = client.Target("baseline", f"http://127.0.0.1:{port}/v1/summaries")
    if "sumstream" in plan.systems:
        stack.ensure_broker(st, settings.bootstrap_servers)
        await stack.create_topics(settings)
        keys = [(secrets.token_urlsafe(18), f"bench-{u:03d}", plan.tier) for u in range(plan.users)]
        keys_file = st.run_dir / "keys.json"
        stack.write_keys(keys_file, keys)
        common = {
            "topic_prefix": settings.topic_prefix,
            "app_id": run_id,
            "llm_sim_url": sim_url,
            "bootstrap_servers": settings.bootstrap_servers,
            "max_streams": str(plan.max_streams),
        }
        worker = st.spawn_cli(
            "worker", ["worker", "--metrics-port", "0"], stack.sumstream_env(st.run_dir, **common)
        )
        port = stack.free_port()
        gateway = st.spawn_cli(
            "gateway",
            ["gateway", "--host", "127.0.0.1", "--port", str(port)],
            stack.sumstream_env(st.run_dir, keys_file=str(keys_file), **common),
        )
        await st.wait_http(gateway, f"http://127.0.0.1:{port}/readyz", 90)
        pids["worker"], pids["gateway"] = worker.pid, gateway.pid
        broker_pid = stack.listening_pid(
            int(settings.bootstrap_servers.split(",")[0].rsplit(":", 1)[1])
        )
        if broker_pid is not None:
            pids["broker"] = broker_pid
        targets["sumstream"] = client.Target(
            "sumstream",
            f"http://127.0.0.1:{port}/v1/summaries",
            tuple(k for k, _, _ in keys),
        )
    pids["client"] = os.getpid()
    return Bench(plan, st, sim_url, targets, pids)


async def warm_up(b: Bench, timeout_s: float = 120.0) -> dict[str, float]:
    """One correct stream from each system (the worker joins its group meanwhile), then a few
    concurrent ones so connections, JIT-less caches and consumer fetch sessions are warm."""
    took: dict[str, float] = {}
    for system, target in b.targets.items():
        t0 = time.perf_counter()
        while True:
            first = b.prepare(1)
            rec = client.StreamRecord(system, "warmup", first, b.doc(first)[1])
            await client.run_stream(
                target, 0, b.doc(first)[0], b.plan.max_tokens, rec, deadline_s=30
            )
            if rec.complete:
                break
            b.stack.check_alive()
            if time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(
                    f"{system}: no correct stream after {timeout_s:.0f} s "
                    f"(last: {rec.outcome}, {rec.failure or rec.error})"
                )
            await asyncio.sleep(1.0)
        took[system] = round(time.perf_counter() - t0, 2)
        first = b.prepare(20)
        await client.closed_loop(
            target,
            "warmup",
            b.doc,
            concurrency=10,
            requests=20,
            max_output_tokens=b.plan.max_tokens,
            first_index=first,
        )
    return took


async def run_bench(plan: Plan, out_dir: Path, log: Callable[[str], None] = print) -> Path:
    """The whole run; returns the path of the markdown report."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_id = f"bench-{secrets.token_hex(4)}"
    run_dir = REPO_ROOT / ".data" / "bench" / f"{stamp}-{run_id}"
    run_dir.mkdir(parents=True, exist_ok=True)
    st = stack.Stack(run_dir)
    t_start = time.perf_counter()
    meta: dict[str, Any] = {
        "stamp": stamp,
        "run_id": run_id,
        "machine": stack.machine(),
        "loadavg_start": stack.loadavg(),
        "logs": str(run_dir),
    }
    log(f"bench {run_id}: logs in {run_dir}")
    # SIGTERM (a CI timeout, a kill) cancels the run, so the finally below still stops every
    # process it started: they live in their own sessions and would outlive us otherwise.
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    settings = KafkaSettings()
    try:
        b = await start_systems(plan, st, run_id)
        b.log = log
        meta["ready_s"] = {p.name: p.ready_s for p in st.procs if p.ready_s is not None}
        meta["broker_started_by_bench"] = st.broker_settings is not None
        meta["pids"] = {p.name: p.pid for p in st.procs}
        meta["warmup_s"] = await warm_up(b)
        log(f"ready in {time.perf_counter() - t_start:.0f} s (warm-up {meta['warmup_s']})")
        prof: dict[str, Any] = {}
        errors: list[str] = []
        steps: list[tuple[str, bool, Callable[[], Awaitable[Any]]]] = [
            ("overhead", False, lambda: overhead(b)),
            ("profile", False, lambda: profile_sumstream(b, run_dir)),
            ("bursts", False, lambda: bursts(b)),
            ("throughput", True, lambda: throughput(b)),
            ("rate_limited", False, lambda: rate_limited(b)),
        ]
        skipped = b.skipped
        for name, optional, step in steps:
            elapsed = time.perf_counter() - t_start
            if optional and elapsed > plan.budget_s * plan.optional_until:
                log(f"skipping {name}: {elapsed:.0f} s of the {plan.budget_s:.0f} s budget used")
                skipped.append(name)
                continue
            try:
                result = await step()
            except Exception as exc:
                # Keep what was measured; the report says what failed and where the logs are.
                msg = f"{name}: {type(exc).__name__}: {exc}"
                log(f"FAILED {msg}")
                errors.append(msg)
                continue
            if name == "profile":
                prof = result
        meta["errors"] = errors
        meta["skipped"] = skipped
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        st.close()
        if "sumstream" in plan.systems:
            try:
                stack.delete_topics(settings.bootstrap_servers, (run_id,))
            except Exception as exc:  # cleanup must not hide the run's own error
                log(f"could not delete the run's topics: {exc}")
    meta["loadavg_end"] = stack.loadavg()
    meta["duration_s"] = round(time.perf_counter() - t_start, 1)
    results: dict[str, Any] = {
        "meta": meta,
        "plan": _plan_json(plan),
        "phases": b.phases,
        "profile": prof,
        "streams": b.streams,
    }
    results["analysis"] = analysis.analyze(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(results, separators=(",", ":")))
    md_path = report.write(results, out_dir, stamp)
    log(f"results: {json_path}\nreport:  {md_path}")
    return md_path


def _plan_json(plan: Plan) -> dict[str, Any]:
    out = asdict(plan)
    out["requests"] = {str(k): v for k, v in plan.requests.items()}
    out["bursts"] = {str(k): v for k, v in plan.bursts.items()}
    out["burst_users"] = list(plan.burst_users)
    return out


def _run(coro: Coroutine[Any, Any, Path]) -> Path:
    # uvloop (installed with uvicorn[standard]) keeps the load generator's own cost low.
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help="baseline,sumstream (or one of them)"
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--no-latest", action="store_true", help="do not copy the report to bench/REPORT.md"
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    systems = tuple(s for s in SYSTEMS if s in args.systems.split(","))
    if not systems:
        parser.error(f"--systems must name {' and/or '.join(SYSTEMS)}")
    plan = replace(plan, systems=systems)
    try:
        md_path = _run(run_bench(plan, args.out_dir))
    except (asyncio.CancelledError, KeyboardInterrupt):
        print("bench: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    results = json.loads(md_path.with_suffix(".json").read_text())
    if not args.no_latest:
        latest = REPO_ROOT / "bench" / "REPORT.md"
        latest.write_text(report.render(results, image_dir=_relative(args.out_dir, latest.parent)))
    return 1 if results["meta"].get("errors") else 0


def _relative(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), start.resolve())
    except ValueError:
        return str(path.resolve())


if __name__ == "__main__":
    sys.exit(main())
