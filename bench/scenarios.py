"""The scenarios of issue 7, and the run state they share.

Each scenario measures both systems, one at a time, in alternating order; every phase records
its streams and the CPU each process used meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import analysis, client, corpus, profile, stack
from pipeline.llm.extractive import count_tokens

# Tokens of a request's prompt beyond its document (instructions, tags, system prompt).
PROMPT_OVERHEAD_TOKENS = 60

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
    # 6: 429 on a random share of calls (retry-after 1 s), closed loops.
    r429_clients: int = 10
    r429_requests: int = 60
    r429_share: float = 0.3
    # 7: open-loop arrivals against a tokens-per-minute bucket of half the offered load.
    tb_requests: int = 60
    tb_offered_per_s: float = 4.0
    deadline_s: float = 60.0
    profile_s: float = 8.0
    profile_level: int = 50
    max_streams: int = 256
    users: int = 256
    tier: str = "pro"
    # sumstream's processes: one worker per core by default (`sumstream up` does the same).
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    gateways: int = 1
    # 6: the scaling table, (workers, gateways) at `scaling_level` streams; a fresh stack each.
    scaling: tuple[tuple[int, int], ...] = ((1, 1), (2, 1), (1, 2), (2, 2))
    scaling_level: int = 50
    scaling_requests: int = 150
    # 6: the same corpus at longer summaries, at `scaling_level` streams.
    long_tokens: int = 300
    long_requests: int = 100
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
    scaling=((1, 1), (2, 1)),
    scaling_level=10,
    scaling_requests=20,
    long_requests=20,
    r429_requests=20,
    tb_requests=16,
    deadline_s=30.0,
    profile_s=0.0,
)


@dataclass
class Sumstream:
    """One started sumstream: where to send requests, its process groups, its processes."""

    target: client.Target
    pids: dict[str, tuple[int, ...]]
    procs: list[stack.Proc]


StartSumstream = Callable[["Plan", stack.Stack, str, str, int, int], Coroutine[Any, Any, Sumstream]]


@dataclass
class Bench:
    """One run: the systems under test, the simulator, and everything recorded."""

    plan: Plan
    stack: stack.Stack
    sim_url: str
    targets: dict[str, client.Target]
    pids: dict[str, tuple[int, ...]]
    streams: list[dict[str, Any]] = field(default_factory=list)
    phases: list[dict[str, Any]] = field(default_factory=list)
    next_index: int = 0
    docs: dict[int, tuple[str, str]] = field(default_factory=dict)
    log: Callable[[str], None] = print
    skipped: list[str] = field(default_factory=list)
    # Starts another sumstream (scenario 6's scaling table); set by bench/run.py.
    start_sumstream: StartSumstream | None = None

    def prepare(self, n: int, max_tokens: int | None = None) -> int:
        """Reserve ``n`` fresh documents (computed now, not while streams are timed)."""
        first = self.next_index
        for i in range(first, first + n):
            self.docs[i] = corpus.request(i, max_tokens or self.plan.max_tokens)
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


Load = Callable[[client.Target, int], Awaitable[list[client.StreamRecord]]]


async def _against_limited_upstream(
    b: Bench, name: str, knobs: dict[str, Any], load: Load, n: int, drain: bool = False, **meta: Any
) -> None:
    """One phase of ``n`` requests per system (``load(target, first index)``) against the
    simulator set to ``knobs``, each with the simulator's counts of its own calls."""
    for system in b.order(0):
        await b.sim("POST", "/_sim/reset")
        await b.sim("POST", "/_sim/config", knobs)
        if drain:
            await _drain_bucket(b)
        # Only what follows is the system's (the drain's own calls are not).
        before = await b.sim("GET", "/_sim/stats?request_id=-")
        first = b.prepare(n)
        await b.phase(
            name, system, functools.partial(_load_from, load, first), scenario=name, **meta
        )
        # Retries still under way count too: give them a moment before reading the counts.
        await asyncio.sleep(1.0)
        after = await b.sim("GET", "/_sim/stats?request_id=-")
        b.phases[-1]["sim_stats"] = _stats_since(before, after)
    await b.sim("POST", "/_sim/reset")


def _load_from(
    load: Load, first: int, target: client.Target
) -> Awaitable[list[client.StreamRecord]]:
    return load(target, first)


async def rate_limited(b: Bench) -> None:
    """4: the upstream takes at most ``rl_max_concurrent`` streams (429 beyond)."""
    p = b.plan
    b.log(f"scenario 4: upstream limited to {p.rl_max_concurrent} streams, {p.rl_clients} clients")

    async def everyone_at_once(target: client.Target, first: int) -> list[client.StreamRecord]:
        return await client.burst(
            target,
            "rate_limited",
            b.doc,
            users=p.rl_clients,
            max_output_tokens=p.max_tokens,
            first_index=first,
            deadline_s=p.deadline_s,
        )

    knobs = {"max_concurrent": p.rl_max_concurrent}
    await _against_limited_upstream(
        b, "rate_limited", knobs, everyone_at_once, p.rl_clients, concurrency=p.rl_clients
    )


async def random_429(b: Bench) -> None:
    """6: ``r429_share`` of the calls answered 429 with retry-after 1 s, closed loops."""
    p = b.plan
    b.log(
        f"scenario 6: random {p.r429_share:.0%} 429 (retry-after 1 s), {p.r429_clients} "
        f"clients, {p.r429_requests} requests"
    )

    async def closed_loops(target: client.Target, first: int) -> list[client.StreamRecord]:
        return await client.closed_loop(
            target,
            "random_429",
            b.doc,
            concurrency=p.r429_clients,
            requests=p.r429_requests,
            max_output_tokens=p.max_tokens,
            first_index=first,
            deadline_s=p.deadline_s,
        )

    # One seed for both systems: the same draws, so the attempts compare.
    knobs = {"error_rate": p.r429_share, "error_status": 429, "retry_after_s": 1.0, "seed": 1}
    await _against_limited_upstream(
        b, "random_429", knobs, closed_loops, p.r429_requests, concurrency=p.r429_clients
    )


async def token_bucket(b: Bench) -> None:
    """7: a tokens-per-minute bucket that allows half the offered load, drained at the start
    (another client of the same organisation spent it); requests arrive on a fixed schedule."""
    p = b.plan
    sample = b.prepare(p.tb_requests)
    docs = [b.doc(sample + i) for i in range(p.tb_requests)]
    # What the simulator charges a request: its prompt (document + instructions) and summary.
    cost = sum(count_tokens(d) + count_tokens(e) + PROMPT_OVERHEAD_TOKENS for d, e in docs)
    per_minute = int(cost / len(docs) * p.tb_offered_per_s * 60 / 2)
    b.log(
        f"scenario 7: {p.tb_requests} requests at {p.tb_offered_per_s:g}/s against a "
        f"{per_minute} tokens-per-minute bucket (half the offered load)"
    )

    async def arrivals(target: client.Target, first: int) -> list[client.StreamRecord]:
        async def one(k: int) -> list[client.StreamRecord]:
            await asyncio.sleep(k / p.tb_offered_per_s)  # the arrival schedule
            return await client.burst(
                target,
                "token_bucket",
                b.doc,
                users=1,
                max_output_tokens=p.max_tokens,
                first_index=first + k,
                deadline_s=p.deadline_s,
            )

        batches = await asyncio.gather(*(one(k) for k in range(p.tb_requests)))
        return [r for batch in batches for r in batch]

    knobs = {"tokens_per_minute": per_minute}
    await _against_limited_upstream(
        b, "token_bucket", knobs, arrivals, p.tb_requests, drain=True, tokens_per_minute=per_minute
    )


def _stats_since(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The simulator's attempts and statuses between two reads of its stats."""
    statuses = {
        k: v - int(before["by_status"].get(k, 0))
        for k, v in after["by_status"].items()
        if v - int(before["by_status"].get(k, 0))
    }
    return {**after, "attempts": after["attempts"] - before["attempts"], "by_status": statuses}


async def _drain_bucket(b: Bench) -> None:
    """Spend the token bucket with big prompts, then small ones, each until a 429."""
    async with httpx.AsyncClient(base_url=b.sim_url, timeout=30.0) as http:
        for size in (40, 4, 1):
            prompt = " ".join(corpus.document(10_000 + i) for i in range(size))
            body = {
                "model": "claude-haiku-4-5",
                "max_tokens": 1,
                "messages": [{"role": "user", "content": prompt}],
            }
            for _ in range(200):
                resp = await http.post("/v1/messages", json=body, headers={"x-api-key": "other"})
                if resp.status_code == 429:
                    break


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
    names = [n for n in ("gateway", "worker") if b.pids.get(n)]
    files = {n: out_dir / f"pyspy-{n}.txt" for n in names}
    errors = await asyncio.gather(
        *(profile.record(b.pids[n][0], p.profile_s, files[n]) for n in names)
    )
    await load
    out: dict[str, Any] = {}
    for name, error in zip(names, errors, strict=True):
        if error is not None:
            out[name] = {"error": error}
        else:
            out[name] = profile.summarize_stacks(files[name].read_text(errors="replace"))
    return out


async def long_summaries(b: Bench) -> None:
    """6: the same corpus at ``long_tokens``-token summaries, both systems, ABBA halves."""
    p = b.plan
    c = p.scaling_level
    b.log(f"scenario 6: {p.long_tokens}-token summaries at {c} streams")
    halves = [p.long_requests // 2, p.long_requests - p.long_requests // 2]
    for half, order in zip(halves, (b.order(0), b.order(1)), strict=True):
        for system in order:
            first = b.prepare(half, p.long_tokens)
            await b.phase(
                f"long/c{c}",
                system,
                functools.partial(
                    client.closed_loop,
                    phase=f"long/c{c}",
                    docs=b.doc,
                    concurrency=c,
                    requests=half,
                    max_output_tokens=p.long_tokens,
                    deadline_s=p.deadline_s,
                    first_index=first,
                ),
                scenario="long",
                concurrency=c,
                max_tokens=p.long_tokens,
            )


async def scaling(b: Bench, run_id: str) -> None:
    """6: a fresh sumstream per (workers, gateways), the same closed loop on each."""
    p = b.plan
    if b.start_sumstream is None or "sumstream" not in p.systems:
        return
    b.log(f"scenario 6: scaling at {p.scaling_level} streams")
    main = dict(b.pids)
    try:
        for workers, gateways in p.scaling:
            label = f"w{workers}g{gateways}"
            started = await b.start_sumstream(
                p, b.stack, f"{run_id}-{label}", b.sim_url, workers, gateways
            )
            b.targets["sumstream"] = started.target
            b.pids = {**main, **started.pids}
            try:
                await warm(b, started.target)
                first = b.prepare(p.scaling_requests)
                await b.phase(
                    f"scaling/{label}",
                    "sumstream",
                    functools.partial(
                        client.closed_loop,
                        phase=f"scaling/{label}",
                        docs=b.doc,
                        concurrency=p.scaling_level,
                        requests=p.scaling_requests,
                        max_output_tokens=p.max_tokens,
                        deadline_s=p.deadline_s,
                        first_index=first,
                    ),
                    scenario="scaling",
                    concurrency=p.scaling_level,
                    workers=workers,
                    gateways=gateways,
                )
            finally:
                b.stack.stop(started.procs)
    finally:
        b.pids = main


async def warm(b: Bench, target: client.Target, timeout_s: float = 120.0) -> None:
    """Until one stream comes back complete (the workers have joined their group), then a few
    concurrent ones so connections and consumer fetch sessions are warm."""
    deadline = time.monotonic() + timeout_s
    while True:
        first = b.prepare(1)
        rec = client.StreamRecord(target.name, "warmup", first, b.doc(first)[1])
        await client.run_stream(target, 0, b.doc(first)[0], b.plan.max_tokens, rec, deadline_s=30)
        if rec.complete:
            break
        b.stack.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{target.name}: no correct stream after {timeout_s:.0f} s "
                f"(last: {rec.outcome}, {rec.failure or rec.error})"
            )
        await asyncio.sleep(1.0)
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
