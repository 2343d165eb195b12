"""``sumstream llm-sim``: run the simulator with uvicorn, flags over SUMSTREAM_SIM_* variables."""

from __future__ import annotations

import argparse
import contextlib
import sys

import uvicorn
from pydantic import ValidationError

from pipeline.core.settings import SimulatorSettings
from pipeline.llm.simulator.app import KNOBS, Simulator


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for `sumstream llm-sim`; each overrides its SUMSTREAM_SIM_* variable."""
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--ttft-ms", type=float, help="time to the first token")
    parser.add_argument("--token-delay-ms", type=float, help="delay between tokens")
    parser.add_argument(
        "--max-concurrent", type=int, help="open responses before 429 (0: no limit)"
    )
    parser.add_argument(
        "--error-rate", type=float, help="share of requests failed before any token"
    )
    parser.add_argument("--error-status", type=int, help="429, 500 or 529")
    parser.add_argument("--seed", type=int, help="seed of the error-rate draws")
    parser.add_argument("--fail-next", type=int, help="fail the next N requests")
    parser.add_argument("--fail-all", action="store_true", default=None, help="fail every request")
    parser.add_argument("--fault-at-token", type=int, help="break streams after N tokens")
    parser.add_argument("--fault-kind", choices=["error", "drop"])
    parser.add_argument("--fault-times", type=int, help="streams that get the fault (-1: all)")
    parser.add_argument("--retry-after-s", type=float, help="retry-after on 429 and 529")
    parser.add_argument("--cache-min-tokens", type=int, help="shortest prompt prefix cached")
    parser.add_argument(
        "--record-prompts",
        action="store_true",
        default=None,
        help="keep each call's prompt text for GET /_sim/stats (tests)",
    )
    for bucket in ("requests", "tokens", "input-tokens", "output-tokens"):
        parser.add_argument(
            f"--{bucket}-per-minute", type=int, help=f"{bucket} bucket per minute (0: no limit)"
        )


def run(args: argparse.Namespace) -> int:
    """Run the simulator with uvicorn until interrupted."""
    names = ("host", "port", "log_level", *KNOBS)
    overrides = {n: v for n in names if (v := getattr(args, n, None)) is not None}
    try:
        settings = SimulatorSettings(**overrides)
    except ValidationError as exc:
        print(f"sumstream llm-sim: {exc}", file=sys.stderr)
        return 2
    print(
        f"llm-sim on http://{settings.host}:{settings.port} (ttft {settings.ttft_ms:g} ms, "
        f"token delay {settings.token_delay_ms:g} ms)",
        file=sys.stderr,
        flush=True,
    )
    # uvicorn re-raises the Ctrl-C it has already handled by shutting down.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(
            Simulator(settings),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
    return 0
