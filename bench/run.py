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
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import analysis, client, report, stack
from bench.scenarios import (
    QUICK,
    SYSTEMS,
    Bench,
    Plan,
    Sumstream,
    bursts,
    long_summaries,
    overhead,
    profile_sumstream,
    random_429,
    rate_limited,
    scaling,
    throughput,
    token_bucket,
    warm,
)
from pipeline.core.settings import REPO_ROOT, KafkaSettings

RESULTS = REPO_ROOT / "bench" / "results"


async def start_systems(plan: Plan, st: stack.Stack, run_id: str) -> Bench:
    """Broker (if needed), topics, simulator, baseline, workers and gateways; all ready."""
    pids: dict[str, tuple[int, ...]] = {}
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
    pids["llm-sim"] = (sim.pid,)
    targets: dict[str, client.Target] = {}
    if "baseline" in plan.systems:
        port = stack.free_port()
        base = st.spawn(
            "baseline",
            [sys.executable, "-m", "bench.baseline", "--port", str(port), "--sim-url", sim_url],
            env,
        )
        await st.wait_http(base, f"http://127.0.0.1:{port}/healthz", 30)
        pids["baseline"] = (base.pid,)
        targets["baseline"] = client.Target("baseline", f"http://127.0.0.1:{port}/v1/summaries")
    if "sumstream" in plan.systems:
        sumstream = await start_sumstream(plan, st, run_id, sim_url, plan.workers, plan.gateways)
        targets["sumstream"] = sumstream.target
        pids.update(sumstream.pids)
    pids["client"] = (os.getpid(),)
    return Bench(plan, st, sim_url, targets, pids, start_sumstream=start_sumstream)


async def start_sumstream(
    plan: Plan,
    st: stack.Stack,
    run_id: str,
    sim_url: str,
    workers: int,
    gateways: int,
    port: Callable[[], int] = stack.free_port,
) -> Sumstream:
    """``workers`` worker processes (all stages, splitting the partitions) and ``gateways``
    gateways (each owning its share of the partitions) on the topics of ``run_id``."""
    settings = KafkaSettings(topic_prefix=f"{run_id}.")
    stack.ensure_broker(st, settings.bootstrap_servers)
    await stack.create_topics(settings)
    keys = [(secrets.token_urlsafe(18), f"bench-{u:03d}", plan.tier) for u in range(plan.users)]
    keys_file = st.run_dir / f"keys-{run_id}.json"
    stack.write_keys(keys_file, keys)
    common = {
        "topic_prefix": settings.topic_prefix,
        "app_id": run_id,
        "llm_sim_url": sim_url,
        "bootstrap_servers": settings.bootstrap_servers,
        "max_streams": str(plan.max_streams),
        # The workers read the same keys: a user's tier comes from the server's table.
        "keys_file": str(keys_file),
    }
    env = stack.sumstream_env(st.run_dir, **common)
    procs = [
        st.spawn_cli(f"{run_id}-worker-{i}", ["worker", "--metrics-port", "0"], env)
        for i in range(workers)
    ]
    urls = []
    for i in range(gateways):
        gateway_port = port()
        gateway = st.spawn_cli(
            f"{run_id}-gateway-{i}",
            [
                *("gateway", "--host", "127.0.0.1", "--port", str(gateway_port)),
                *("--instance-index", str(i), "--instance-count", str(gateways)),
            ],
            env,
        )
        await st.wait_http(gateway, f"http://127.0.0.1:{gateway_port}/readyz", 90)
        procs.append(gateway)
        urls.append(f"http://127.0.0.1:{gateway_port}/v1/summaries")
    pids = {
        "worker": tuple(p.pid for p in procs if "-worker-" in p.name),
        "gateway": tuple(p.pid for p in procs if "-gateway-" in p.name),
    }
    broker_port = int(settings.bootstrap_servers.split(",")[0].rsplit(":", 1)[1])
    broker_pid = stack.listening_pid(broker_port)
    if broker_pid is not None:
        pids["broker"] = (broker_pid,)
    target = client.Target(
        "sumstream", urls[0], tuple(k for k, _, _ in keys), more_urls=tuple(urls[1:])
    )
    return Sumstream(target, pids, procs)


async def warm_up(b: Bench, timeout_s: float = 120.0) -> dict[str, float]:
    """One correct stream from each system (the worker joins its group meanwhile), then a few
    concurrent ones so connections, JIT-less caches and consumer fetch sessions are warm."""
    took: dict[str, float] = {}
    for system, target in b.targets.items():
        t0 = time.perf_counter()
        await warm(b, target, timeout_s)
        took[system] = round(time.perf_counter() - t0, 2)
    return took


async def run_bench(
    plan: Plan,
    out_dir: Path,
    log: Callable[[str], None] = print,
    logs_root: Path = REPO_ROOT / ".data" / "bench",
) -> Path:
    """The whole run; returns the path of the markdown report. Child logs, the keys file and
    Faust's data go to ``<logs_root>/<stamp>-<run id>/``."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_id = f"bench-{secrets.token_hex(4)}"
    run_dir = logs_root / f"{stamp}-{run_id}"
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
        meta["broker_jit"] = stack.broker_jit()
        meta["pids"] = {p.name: p.pid for p in st.procs}
        meta["processes"] = {"workers": plan.workers, "gateways": plan.gateways}
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
            ("random_429", False, lambda: random_429(b)),
            ("token_bucket", False, lambda: token_bucket(b)),
            ("long_summaries", True, lambda: long_summaries(b)),
            ("scaling", True, lambda: scaling(b, run_id)),
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
