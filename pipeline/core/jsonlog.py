"""The worker's log lines: JSON on stderr, tagged with the stage and request id of the record
being handled, and never a request body from the HTTP client libraries."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pipeline.core.settings import WorkerSettings

# Attributes every LogRecord has; anything else was passed as ``extra=`` and is logged.
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI copy of msg (the gateway's lines)
}


# The record a stage is handling: (stage, request id = the record's key). Set around each
# record by ``process`` (pipeline/worker/agents.py); tasks started meanwhile (the inference run of a
# job) copy it, so their lines, the upstream client's included, carry the request id too.
_RECORD: ContextVar[tuple[str, str] | None] = ContextVar("sumstream_record", default=None)
# A key is a request id; a longer one is not (a poison record) and is cut.
MAX_LOGGED_KEY = 64
# Loggers that print request bodies (the prompt, i.e. the document) at DEBUG: never below INFO.
BODY_LOGGERS = ("anthropic", "httpx", "httpx2", "httpcore")


@contextmanager
def record_context(stage: str, key: bytes | None) -> Iterator[None]:
    """Tag every log line emitted while handling one record with its stage and request id."""
    request_id = key[:MAX_LOGGED_KEY].decode("utf-8", "replace") if key else ""
    token = _RECORD.set((stage, request_id))
    try:
        yield
    finally:
        _RECORD.reset(token)


class RecordContextFilter(logging.Filter):
    """Adds ``stage`` and ``request_id`` of the record being handled; explicit extras win."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _RECORD.get()
        if current is not None:
            stage, request_id = current
            if not hasattr(record, "stage"):
                record.stage = stage
            if request_id and not hasattr(record, "request_id"):
                record.request_id = request_id
        return True


class RepeatFilter(logging.Filter):
    """Lets through at most ``burst`` warnings of one kind per ``window_s``, then counts them.

    A kind is (logger, level, message template): a broker outage makes the Kafka clients log
    the same line thousands of times with other arguments. The first line after a window in
    which lines were held back carries ``suppressed`` (how many). INFO and below pass: those
    are per-request lines, not storms.
    """

    def __init__(
        self,
        burst: int = 5,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        max_kinds: int = 1024,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self._clock = clock
        self._max_kinds = max_kinds
        # kind -> [window start, lines let through in the window, lines held back]
        self._kinds: dict[tuple[str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        kind = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        seen = self._kinds.get(kind)
        if seen is None or now - seen[0] >= self.window_s:
            if seen is None and len(self._kinds) >= self._max_kinds:
                self._kinds.pop(next(iter(self._kinds)))  # the oldest kind goes first
            held = int(seen[2]) if seen else 0
            self._kinds[kind] = [now, 1, 0]
            if held:
                record.suppressed = held
            return True
        if seen[1] < self.burst:
            seen[1] += 1
            return True
        seen[2] += 1
        return False


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra=`` fields (request_id, stage...) become keys.

    Shared with the gateway (gateway/logs.py), so every process writes the same shape: ts is
    ISO 8601 UTC in ms.
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def logging_config(settings: WorkerSettings) -> dict[str, Any]:
    """A dictConfig for Faust's worker: JSON lines on stderr (or plain text).

    No document text at any level: the HTTP client libraries stay at INFO or above.
    """
    formatter = (
        {"()": f"{__name__}.JsonFormatter"}
        if settings.log_json
        else {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}
    )
    level = settings.log_level.upper()
    numeric = logging.getLevelNamesMapping().get(level, logging.INFO)
    body_level = logging.getLevelName(max(logging.INFO, numeric))
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "filters": {
            "record": {"()": f"{__name__}.RecordContextFilter"},
            "repeats": {"()": f"{__name__}.RepeatFilter"},
        },
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "filters": ["record", "repeats"],
            },
        },
        "loggers": {name: {"level": body_level} for name in BODY_LOGGERS},
        "root": {"handlers": ["stderr"], "level": level},
    }
