"""Issue 17 item 8: operational endpoints are not open to the network by default.

A real worker and gateway on the shared broker: the worker's /metrics listens on loopback only
(it has no authentication), and the gateway's /metrics (on the public API port) needs the
metrics token once one is configured. The simulator's /_sim/* is
tests/integration/test_simulator_admin.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pipeline.kafka.admin import create_topics
from tests.harness import Stack

pytestmark = pytest.mark.integration

TOKEN = "metrics-secret"


@contextlib.contextmanager
def stack_with_metrics_token(tmp: Path, bootstrap: str) -> Iterator[Stack]:
    stack = Stack(tmp, bootstrap=bootstrap, extra_env={"SUMSTREAM_METRICS_TOKEN": TOKEN})
    create_topics(stack.settings)
    try:
        stack.start_simulator()
        stack.start_worker()
        stack.start_gateway()
        yield stack
    finally:
        stack.stop()
        stack.remove_topics()


def listening_addresses(port: int) -> set[str]:
    """Local IPv4/IPv6 addresses (hex, as /proc/net/tcp* writes them) listening on ``port``."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                address, _, hex_port = fields[1].rpartition(":")
                if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                    found.add(address)
    return found


def test_worker_metrics_and_gateway_metrics_are_not_open_to_the_network(
    tmp_path: Path, bootstrap: str
) -> None:
    with stack_with_metrics_token(tmp_path, bootstrap) as stack:
        worker_port = stack.workers[0].metrics_port()
        # 127.0.0.1 only; before, 0.0.0.0 (00000000): every interface.
        assert listening_addresses(worker_port) == {"0100007F"}
        worker = httpx.get(f"http://127.0.0.1:{worker_port}/metrics", timeout=5)
        assert worker.status_code == 200

        anonymous = httpx.get(f"{stack.gateway}/metrics", timeout=5)
        assert anonymous.status_code == 401, anonymous.text
        wrong = httpx.get(
            f"{stack.gateway}/metrics", headers={"Authorization": "Bearer nope"}, timeout=5
        )
        assert wrong.status_code == 401
        scraped = httpx.get(
            f"{stack.gateway}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
        )
        assert scraped.status_code == 200
        assert "sumstream_gateway_lag_sample_age_seconds" in scraped.text
        # Probes stay open: a load balancer has no token.
        assert httpx.get(f"{stack.gateway}/healthz", timeout=5).status_code == 200
        assert httpx.get(f"{stack.gateway}/readyz", timeout=5).status_code == 200
