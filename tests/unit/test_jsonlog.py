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

from gateway import logs as gateway_logs
from pipeline.core.jsonlog import (
    BODY_LOGGERS,
    JsonFormatter,
    RecordContextFilter,
    RepeatFilter,
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
    assert config["handlers"]["stderr"]["filters"] == ["record", "repeats"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def warning(msg: str, *args: object, name: str = "aiokafka") -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)


def test_repeated_warnings_pass_a_burst_then_the_next_window_reports_how_many_were_held() -> None:
    clock = FakeClock()
    repeats = RepeatFilter(burst=5, window_s=10.0, clock=clock)
    passed = [repeats.filter(warning("Unable to connect to node %s", n)) for n in range(100)]
    assert passed.count(True) == 5 and passed[:5] == [True] * 5
    clock.now = 10.0
    record = warning("Unable to connect to node %s", 7)
    assert repeats.filter(record)
    assert record.suppressed == 95  # type: ignore[attr-defined]


def test_other_kinds_and_info_lines_are_not_held_back_by_a_storm() -> None:
    repeats = RepeatFilter(burst=1, window_s=10.0, clock=FakeClock())
    assert repeats.filter(warning("storm %s", 1))
    assert not repeats.filter(warning("storm %s", 2))
    assert repeats.filter(warning("other line"))
    assert repeats.filter(warning("storm %s", 3, name="sumstream.worker"))
    info = logging.LogRecord("aiokafka", logging.INFO, __file__, 1, "storm %s", (4,), None)
    assert all(repeats.filter(info) for _ in range(50))


def test_the_worker_and_gateway_handlers_carry_the_repeat_filter() -> None:
    config = logging_config(WorkerSettings())
    assert "repeats" in config["handlers"]["stderr"]["filters"]
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        gateway_logs.configure("INFO")
        assert any(isinstance(f, RepeatFilter) for f in root.handlers[0].filters)
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
