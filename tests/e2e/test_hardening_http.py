"""Connection bounds of a real gateway process: request-head size and field count, the time to
send a head, and open connections (gateway/http/protocol.py). Before these bounds a 10 MB header
was answered 200, unterminated heads grew the gateway by hundreds of MB and silent connections
stayed open for ever."""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pipeline.core.settings import KafkaSettings
from pipeline.kafka.admin import create_topics
from tests.harness import BOOTSTRAP, Proc, Stack, eventually

pytestmark = pytest.mark.e2e

MAX_HEADER_BYTES = 8 * 1024
MAX_CONNECTIONS = 6


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp: Path = tmp_path_factory.mktemp("hardening-http")
    stack = Stack(tmp)
    create_topics(KafkaSettings(bootstrap_servers=BOOTSTRAP, topic_prefix=stack.prefix))
    try:
        # gateway 0: a short head timeout; gateway 1: a connection cap (and a long timeout, so
        # its idle connections stay open while the cap is tested).
        stack.start_gateway(
            SUMSTREAM_HEADER_TIMEOUT_S="1", SUMSTREAM_MAX_HEADER_BYTES=str(MAX_HEADER_BYTES)
        )
        stack.start_gateway(
            SUMSTREAM_HEADER_TIMEOUT_S="300", SUMSTREAM_MAX_CONNECTIONS=str(MAX_CONNECTIONS)
        )
        yield stack
    finally:
        stack.stop()


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def exchange(url: str, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    with socket.create_connection(address(url), timeout=60) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        return read_to_close(sock)


def read_to_close(sock: socket.socket) -> bytes:
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            received += chunk
    return received


def refused(url: str, reason: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(
        rf'^sumstream_gateway_connections_refused_total{{reason="{reason}"}} (\S+)$', text, re.M
    )
    return float(match.group(1)) if match else 0.0


def rss_kib(proc: Proc) -> int:
    assert proc.popen is not None
    status = Path(f"/proc/{proc.popen.pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]


def test_a_header_beyond_the_head_limit_is_answered_431(stack: Stack) -> None:
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 100)
    answer = exchange(stack.gateways[0], big + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_more_header_fields_than_allowed_are_answered_431(stack: Stack) -> None:
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(150))
    answer = exchange(stack.gateways[0], b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_a_head_within_the_limits_is_served(stack: Stack) -> None:
    answer = exchange(
        stack.gateways[0], b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_unterminated_heads_are_cut_off_and_do_not_grow_the_gateway(stack: Stack) -> None:
    gateway = stack.procs[0]
    url = stack.gateways[0]
    before_refused = refused(url, "head_too_large")
    before_rss = rss_kib(gateway)
    chunk = b"a" * 65536
    for _ in range(10):
        with socket.create_connection(address(url), timeout=60) as sock:
            sock.sendall(b"POST /v1/summaries HTTP/1.1\r\nX-Big: ")
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for _ in range(5 * 1024 * 1024 // len(chunk)):  # 5 MB, never terminated
                    sock.sendall(chunk)
            read_to_close(sock)
    assert refused(url, "head_too_large") == before_refused + 10
    # 10 x 5 MB were offered; what the gateway kept of them is bounded by one read each.
    assert rss_kib(gateway) - before_rss < 20 * 1024


def test_a_connection_that_sends_no_head_is_closed_with_408(stack: Stack) -> None:
    url = stack.gateways[0]
    before = refused(url, "head_timeout")
    with socket.create_connection(address(url), timeout=60) as sock:
        answer = read_to_close(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert refused(url, "head_timeout") == before + 1


def test_connections_beyond_the_cap_are_refused_with_503_until_some_close(stack: Stack) -> None:
    url = stack.gateways[1]
    idle = [socket.create_connection(address(url), timeout=60) for _ in range(MAX_CONNECTIONS)]
    try:
        answer = exchange(url, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503 ")
    finally:
        for sock in idle:
            sock.close()
    # Closed connections free their places: the next request is served (the server may see
    # the closes a moment later, so this waits for the condition).
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    eventually(
        lambda: exchange(url, request).startswith(b"HTTP/1.1 200 "),
        timeout=30,
        message="a connection is served once the idle ones closed",
    )
