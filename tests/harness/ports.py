"""Free TCP ports for the processes a test starts."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_block(count: int, low: int = 19100, high: int = 19199) -> int:
    """The first of ``count`` consecutive free loopback ports in [low, high]: a local cluster
    derives its nodes' ports from one base (tests keep such brokers in their own range)."""
    for base in range(low, high - count + 2):
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports in {low}-{high}")
