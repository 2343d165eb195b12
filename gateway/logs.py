"""Structured JSON logs: one object a line, with request_id when there is one.

Never pass document text or keys to a logger; only ids, users, tiers, codes and timings.
"""

from __future__ import annotations

import logging

# One formatter for every sumstream process: the workers' (pipeline/core/jsonlog.py).
from pipeline.core.jsonlog import JsonFormatter, RepeatFilter


def configure(level: str = "INFO") -> None:
    """Send every log record to stderr as JSON."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
