"""`sumstream worker`: create the topics, then run the Faust app (pipeline/worker/app.py)
with any subset of the three stages until stopped."""

from __future__ import annotations

import argparse
import asyncio
import logging
import logging.config
from typing import Any

import faust
import uvloop

from pipeline.core.errors import SumstreamError
from pipeline.core.jsonlog import logging_config
from pipeline.core.settings import WorkerSettings
from pipeline.kafka.admin import create_topics
from pipeline.worker.app import create_app

log = logging.getLogger("sumstream.worker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stages",
        default=None,
        help="comma-separated subset of preprocess,inference,postprocess (default: all, or "
        "SUMSTREAM_STAGES)",
    )
    parser.add_argument("--app-id", default=None, help="Faust app id = consumer group")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="Prometheus /metrics port (0: any free port, -1: off)",
    )
    parser.add_argument("--log-level", default=None)


def run(args: argparse.Namespace) -> int:
    """`sumstream worker`: create the topics, then run the Faust worker until stopped."""
    overrides: dict[str, Any] = {}
    if args.stages is not None:
        overrides["stages"] = args.stages
    if args.app_id is not None:
        overrides["app_id"] = args.app_id
    if args.metrics_port is not None:
        overrides["metrics_port"] = args.metrics_port
    if args.log_level is not None:
        overrides["log_level"] = args.log_level
    settings = WorkerSettings(**overrides)
    stages = [s.strip() for s in settings.stages.split(",") if s.strip()]
    logging.config.dictConfig(logging_config(settings))

    try:
        created = create_topics(settings)
    except SumstreamError as exc:
        log.error("cannot prepare the topics", extra={"error": str(exc), "code": exc.code})
        return 1
    if created:
        log.info("topics created", extra={"topics": created})
    # uvloop cuts the per-event cost of the asyncio machinery that every token passes through.
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    app = create_app(settings, stages)
    worker = faust.Worker(
        app,
        loop=loop,
        loglevel=settings.log_level.upper(),
        logging_config=logging_config(settings),
        quiet=True,
        redirect_stdouts=False,
    )
    log.info("worker starting", extra={"app_id": settings.app_id, "stages": stages})
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0
