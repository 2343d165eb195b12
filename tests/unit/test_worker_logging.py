"""The worker's JSON log lines: request_id and stage of the record being handled on every line,
the gateway's timestamp format, and no request bodies from the HTTP client libraries."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from typing import Any

import pytest

from pipeline.core.jsonlog import (
    BODY_LOGGERS,
    JsonFormatter,
    RecordContextFilter,
    logging_config,
    record_context,
)
from pipeline.core.settings import WorkerSettings


def capture(body: Any) -> list[dict[str, Any]]:
    """Run ``body(logger)`` with the worker's filter and formatter; the JSON lines it wrote."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RecordContextFilter())
    logger = logging.getLogger("t.worker")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        result = body(logger)
        if asyncio.iscoroutine(result):
            raise TypeError("use acapture for coroutines")
    finally:
        logger.removeHandler(handler)
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_lines_inside_a_record_carry_its_request_id_and_stage() -> None:
    def body(log: logging.Logger) -> None:
        log.info("before")
        with record_context("postprocess", b"01J00000000000000000000000"):
            log.info("inside")
            log.info("explicit", extra={"request_id": "other", "stage": "x"})
        log.info("after")

    before, inside, explicit, after = capture(body)
    assert "request_id" not in before and "stage" not in before
    assert inside["request_id"] == "01J00000000000000000000000"
    assert inside["stage"] == "postprocess"
    assert (explicit["request_id"], explicit["stage"]) == ("other", "x")
    assert "request_id" not in after


def test_a_record_without_key_or_with_a_huge_key_is_tagged_safely() -> None:
    def body(log: logging.Logger) -> None:
        with record_context("preprocess", None):
            log.info("no key")
        with record_context("preprocess", b"x" * 10_000 + b"\xff"):
            log.info("poison key")

    no_key, poison = capture(body)
    assert no_key["stage"] == "preprocess" and "request_id" not in no_key
    assert poison["request_id"] == "x" * 64


async def test_tasks_started_while_handling_a_record_keep_its_request_id() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RecordContextFilter())
    logger = logging.getLogger("t.worker.task")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    release = asyncio.Event()

    async def run() -> None:
        await release.wait()
        logger.info("upstream call")  # like the inference run the agent's submit started

    try:
        with record_context("inference", b"01JRUN"):
            task = asyncio.create_task(run())
        release.set()
        await task
    finally:
        logger.removeHandler(handler)
    [line] = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert (line["request_id"], line["stage"]) == ("01JRUN", "inference")


def test_timestamps_are_iso_utc_like_the_gateway() -> None:
    [line] = capture(lambda log: log.info("hello %s", "you"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"]), line["ts"]
    assert (line["level"], line["logger"], line["msg"]) == ("info", "t.worker", "hello you")


@pytest.mark.parametrize(
    ("level", "body_level"), [("debug", "INFO"), ("info", "INFO"), ("warning", "WARNING")]
)
def test_http_client_loggers_never_log_bodies(level: str, body_level: str) -> None:
    config = logging_config(WorkerSettings(log_level=level))
    assert config["root"]["level"] == level.upper()
    # anthropic logs request options (the prompt: the document) at DEBUG.
    assert set(BODY_LOGGERS) >= {"anthropic", "httpx"}
    for name in BODY_LOGGERS:
        assert config["loggers"][name]["level"] == body_level
    assert config["handlers"]["stderr"]["filters"] == ["record"]
