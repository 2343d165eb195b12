"""The ``sumstream`` command. Each subcommand's module is imported only when it runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Protocol


class Command(Protocol):
    """A subcommand module: its flags and its entry point."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


# One loader per subcommand: the import sits inside a function so that `sumstream --help`
# imports none of them, yet stays a plain import that import-linter and mypy can see.


def _up() -> Command:
    from pipeline.ops import up as command

    return command


def _broker() -> Command:
    from pipeline.ops import broker as command

    return command


def _topics() -> Command:
    from pipeline.ops import topics as command

    return command


def _lag() -> Command:
    from pipeline.ops import lag as command

    return command


def _worker() -> Command:
    from pipeline.worker import command

    return command


def _gateway() -> Command:
    from gateway.http import server as command

    return command


def _llm_sim() -> Command:
    from pipeline.llm.simulator import cli as command

    return command


def _submit() -> Command:
    from pipeline.ops import submit as command

    return command


def _replay() -> Command:
    from pipeline.ops import replay as command

    return command


def _top() -> Command:
    from pipeline.ops import top as command

    return command


# subcommand -> (loader, help)
COMMANDS: dict[str, tuple[Callable[[], Command], str]] = {
    "up": (_up, "run everything: broker, topics, simulator, workers, gateway"),
    "broker": (_broker, "the local Kafka broker: start, stop, status"),
    "topics": (_topics, "create or describe the topics"),
    "lag": (_lag, "consumer lag per stage"),
    "worker": (_worker, "a Faust worker running some or all stages"),
    "gateway": (_gateway, "the HTTP gateway (uvicorn)"),
    "llm-sim": (_llm_sim, "the Anthropic-compatible LLM simulator"),
    "submit": (_submit, "produce a request as another system would and print the stream"),
    "replay": (_replay, "inspect, re-run or export past requests"),
    "top": (_top, "a live terminal view of the pipeline"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="sumstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_loader, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not args_list or args_list[0] in {"-h", "--help"} or args_list[0] not in COMMANDS:
        parser.parse_args(args_list)
        return 2
    name = args_list[0]
    loader, help_text = COMMANDS[name]
    command = loader()
    cmd_parser = argparse.ArgumentParser(prog=f"sumstream {name}", description=help_text)
    command.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(args_list[1:])
    return command.run(args)


if __name__ == "__main__":
    sys.exit(main())
