"""The ``sumstream`` command. Each subcommand's module is imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, help); each module has ``add_arguments(parser)`` and ``run(args)``.
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("pipeline.ops.up", "run everything: broker, topics, simulator, workers, gateway"),
    "broker": ("pipeline.ops.broker", "the local Kafka broker: start, stop, status"),
    "topics": ("pipeline.ops.topics", "create or describe the topics"),
    "lag": ("pipeline.ops.lag", "consumer lag per stage"),
    "worker": ("pipeline.worker.app", "a Faust worker running some or all stages"),
    "gateway": ("gateway.http.server", "the HTTP gateway (uvicorn)"),
    "llm-sim": ("pipeline.llm.simulator.app", "the Anthropic-compatible LLM simulator"),
    "submit": (
        "pipeline.ops.submit",
        "produce a request as another system would and print the stream",
    ),
    "replay": ("pipeline.ops.replay", "inspect, re-run or export past requests"),
    "top": ("pipeline.ops.top", "a live terminal view of the pipeline"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="sumstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not args_list or args_list[0] in {"-h", "--help"} or args_list[0] not in COMMANDS:
        parser.parse_args(args_list)
        return 2
    name = args_list[0]
    module = importlib.import_module(COMMANDS[name][0])
    cmd_parser = argparse.ArgumentParser(prog=f"sumstream {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(args_list[1:])
    result: int = module.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
