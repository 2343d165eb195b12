"""The one test harness: processes, ports, topics, SSE clients and waiting, shared by the
integration and end-to-end tests."""

from __future__ import annotations

from tests.harness.ports import free_port, free_port_block
from tests.harness.procs import (
    BOOTSTRAP,
    KEYS,
    REPO,
    Proc,
    Stack,
    auth,
    running_stack,
    wait_for_balanced_group,
    wait_http,
)
from tests.harness.sse import SseEvent, StreamResult, collect, sse_events, summary_result
from tests.harness.tiers import TierRow, write_tiers
from tests.harness.topics import Record, end_offsets, produce_raw, read_topic, signed
from tests.harness.waiting import eventually, eventually_async

__all__ = [
    "BOOTSTRAP",
    "KEYS",
    "REPO",
    "Proc",
    "Record",
    "SseEvent",
    "Stack",
    "StreamResult",
    "TierRow",
    "auth",
    "collect",
    "end_offsets",
    "eventually",
    "eventually_async",
    "free_port",
    "free_port_block",
    "produce_raw",
    "read_topic",
    "running_stack",
    "signed",
    "sse_events",
    "summary_result",
    "wait_for_balanced_group",
    "wait_http",
    "write_tiers",
]
