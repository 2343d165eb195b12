"""Long documents beside short ones (docs/architecture.md, "Long documents").

``python -m bench.long_documents`` starts a simulator, a worker and a gateway on a fresh topic
prefix, then runs the same closed loop of short summaries by ``--users`` users twice: alone,
and while ``--long`` users each summarize a ``--long-tokens``-token document of real text (the
standard library's sources) by map-reduce. It prints the short users' TTFT p50/p99 in both runs
and their ratio, and each long document's total time, calls and cost.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sysconfig
import time
import uuid
from pathlib import Path
from typing import Any

from bench import client, corpus, stack, stats
from pipeline.core.resources import DEFAULT_TIERS_FILE
from pipeline.core.settings import KafkaSettings
from pipeline.llm.extractive import count_tokens

# The tier of the long documents' users: map-reduce beyond one 8k call.
LONG_TIER = """
[long]
rpm = 1_200
tpm = 40_000_000
max_input_tokens = 8_000
max_output_tokens = 1_024
weight = 4
monthly_budget_usd = 10_000.0
max_queue_wait_s = 120.0
on_input_too_large = "truncate"
models = ["claude-haiku-4-5"]
long_documents = true
max_document_tokens = 200_000
chunk_tokens = 8_000
map_concurrency = 4
reduce_output_tokens = 400
"""


def stdlib_documents(count: int, tokens: int) -> list[str]:
    """``count`` distinct documents of at least ``tokens`` tokens of stdlib sources each."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if p.stat().st_size > 4_000)
    docs: list[str] = []
    parts: list[str] = []
    n = 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        n += count_tokens(text)
        if n >= tokens:
            docs.append("\n\n".join(parts))
            parts, n = [], 0
            if len(docs) == count:
                return docs
    raise RuntimeError(f"the stdlib has fewer than {count} documents of {tokens} tokens")


async def start(
    st: stack.Stack, run_id: str, users: int, long_users: int, extra_env: dict[str, str]
) -> dict[str, Any]:
    """Simulator, worker and gateway; the keys of the short and the long users."""
    settings = KafkaSettings(topic_prefix=f"{run_id}.")
    stack.ensure_broker(st, settings.bootstrap_servers)
    await stack.create_topics(settings)
    short_keys = [(secrets.token_urlsafe(18), f"short-{u:02d}", "pro") for u in range(users)]
    long_keys = [(secrets.token_urlsafe(18), f"long-{u:02d}", "long") for u in range(long_users)]
    keys_file = st.run_dir / "keys.json"
    stack.write_keys(keys_file, short_keys + long_keys)
    tiers_file = st.run_dir / "tiers.toml"
    tiers_file.write_text(DEFAULT_TIERS_FILE.read_text() + LONG_TIER)
    sim_port = stack.free_port()
    sim_env = stack.sumstream_env(st.run_dir)
    sim = st.spawn_cli(
        "llm-sim",
        ["llm-sim", "--port", str(sim_port), "--ttft-ms", "200", "--token-delay-ms", "10"],
        sim_env,
    )
    await st.wait_http(sim, f"http://127.0.0.1:{sim_port}/healthz", 30)
    env = stack.sumstream_env(
        st.run_dir,
        topic_prefix=settings.topic_prefix,
        app_id=run_id,
        llm_sim_url=f"http://127.0.0.1:{sim_port}",
        bootstrap_servers=settings.bootstrap_servers,
        keys_file=str(keys_file),
        tiers_file=str(tiers_file),
        **extra_env,
    )
    st.spawn_cli("worker", ["worker", "--metrics-port", "0"], env)
    port = stack.free_port()
    gateway = st.spawn_cli("gateway", ["gateway", "--host", "127.0.0.1", "--port", str(port)], env)
    await st.wait_http(gateway, f"http://127.0.0.1:{port}/readyz", 90)
    url = f"http://127.0.0.1:{port}/v1/summaries"
    return {
        "short": client.Target("short", url, tuple(k for k, _, _ in short_keys)),
        "long": client.Target("long", url, tuple(k for k, _, _ in long_keys)),
    }


def ttft(records: list[client.StreamRecord]) -> dict[str, float]:
    values = [r.ttft_ms for r in records if r.ttft_ms is not None and r.complete]
    return {
        "n": len(values),
        "complete": sum(1 for r in records if r.complete),
        "p50": stats.percentile(values, 50),
        "p99": stats.percentile(values, 99),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    run_id = f"bench-long-{uuid.uuid4().hex[:8]}"
    run_dir = Path(".data") / "bench" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    st = stack.Stack(run_dir)
    docs = {i: corpus.request(i, args.max_tokens) for i in range(args.requests * 4)}
    long_docs = stdlib_documents(args.long, args.long_tokens)
    try:
        extra = {}
        if args.initial_concurrency:
            extra["upstream_initial_concurrency"] = str(args.initial_concurrency)
        targets = await start(st, run_id, args.users, args.long, extra)
        short, long = targets["short"], targets["long"]
        # Warm: the worker joins its group before anything is timed.
        await client.closed_loop(
            short,
            "warm",
            docs.__getitem__,
            concurrency=2,
            requests=4,
            max_output_tokens=args.max_tokens,
            first_index=args.requests * 2,
        )
        alone = await client.closed_loop(
            short,
            "alone",
            docs.__getitem__,
            concurrency=args.users,
            requests=args.requests,
            max_output_tokens=args.max_tokens,
        )
        long_records = [client.StreamRecord("long", "long", i, "") for i in range(args.long)]
        t0 = time.perf_counter()
        long_runs = [
            asyncio.create_task(
                client.run_stream(long, i, doc, 400, long_records[i], deadline_s=900)
            )
            for i, doc in enumerate(long_docs)
        ]
        beside = await client.closed_loop(
            short,
            "beside",
            docs.__getitem__,
            concurrency=args.users,
            requests=args.requests,
            max_output_tokens=args.max_tokens,
            first_index=args.requests,
        )
        await asyncio.gather(*long_runs)
        long_wall = time.perf_counter() - t0
        # Alone again: the two runs alone bracket the one beside the long documents.
        alone += await client.closed_loop(
            short,
            "alone",
            docs.__getitem__,
            concurrency=args.users,
            requests=args.requests,
            max_output_tokens=args.max_tokens,
            first_index=args.requests * 3,
        )
    finally:
        st.close()
        stack.delete_topics(KafkaSettings().bootstrap_servers, (f"{run_id}.", f"{run_id}-"))
    a, b = ttft(alone), ttft(beside)
    return {
        "short_alone": a,
        "short_beside_long": b,
        "ttft_p99_ratio": b["p99"] / a["p99"] if a["p99"] else float("nan"),
        "long_wall_s": round(long_wall, 1),
        # When the slowest first tokens beside the long documents were asked for (s after
        # the long documents were sent): a burst at the start or a steady cost.
        "worst_beside": sorted(
            (
                (round(r.ttft_ms or 0.0), round(r.t_post - t0, 1))
                for r in beside
                if r.ttft_ms is not None
            ),
            reverse=True,
        )[:5],
        "long": [
            {
                "status": (r.done or {}).get("status"),
                "total_s": round((r.t_done or r.t_end or r.t_post) - r.t_post, 1),
                "usage": (r.done or {}).get("usage"),
                "cost_micro_usd": ((r.done or {}).get("cost") or {}).get("micro_usd"),
            }
            for r in long_records
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--requests", type=int, default=200, help="short requests per run")
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--long", type=int, default=5)
    parser.add_argument("--long-tokens", type=int, default=100_000)
    parser.add_argument(
        "--initial-concurrency",
        type=int,
        default=0,
        help="the worker's upstream_initial_concurrency (0: its default)",
    )
    result = asyncio.run(run(parser.parse_args()))
    a, b = result["short_alone"], result["short_beside_long"]
    for name, figures in (("alone (before and after)", a), ("beside the long ones", b)):
        print(
            f"short TTFT {name}: p50 {figures['p50']:.0f} ms, p99 {figures['p99']:.0f} ms "
            f"({figures['complete']} complete)"
        )
    print(f"p99 ratio: {result['ttft_p99_ratio']:.2f}")
    worst = ", ".join(f"{ms} ms at +{at} s" for ms, at in result["worst_beside"])
    print(f"slowest beside: {worst}")
    print(f"long documents: all done in {result['long_wall_s']} s")
    for i, doc in enumerate(result["long"]):
        usage = doc["usage"] or {}
        print(
            f"  long {i}: {doc['status']} in {doc['total_s']} s, {usage.get('attempts')} calls, "
            f"{usage.get('input_tokens')} in / {usage.get('output_tokens')} out, "
            f"{doc['cost_micro_usd']} micro-USD"
        )


if __name__ == "__main__":
    main()
