"""``sumstream gateway``: the HTTP gateway on uvicorn."""

from __future__ import annotations

import argparse
import socket
from typing import Any

import uvicorn

from gateway import logs
from gateway.http.app import create_app
from gateway.http.auth import hash_key
from gateway.http.protocol import ConnectionLimits, bounded_protocol
from gateway.settings import GatewaySettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="listen address (SUMSTREAM_HOST)")
    parser.add_argument("--port", type=int, help="listen port (SUMSTREAM_PORT)")
    parser.add_argument(
        "--instance-index", type=int, help="this instance's index i of N (SUMSTREAM_INSTANCE_INDEX)"
    )
    parser.add_argument(
        "--instance-count", type=int, help="N, the number of gateways (SUMSTREAM_INSTANCE_COUNT)"
    )
    parser.add_argument("--keys-file", help="API keys file (SUMSTREAM_KEYS_FILE)")
    parser.add_argument(
        "--hash-key",
        metavar="KEY",
        help="print the SHA-256 to store for KEY in the keys file, exit",
    )


def run(args: argparse.Namespace) -> int:
    if args.hash_key:
        print(hash_key(args.hash_key))
        return 0
    overrides: dict[str, Any] = {
        name: value
        for name in ("host", "port", "instance_index", "instance_count", "keys_file")
        if (value := getattr(args, name, None)) is not None
    }
    settings = GatewaySettings(**overrides)
    logs.configure(settings.log_level)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        http=bounded_protocol(
            ConnectionLimits(
                max_header_bytes=settings.max_header_bytes,
                max_headers=settings.max_headers,
                header_timeout_s=settings.header_timeout_s,
                max_connections=settings.max_connections,
            )
        ),
        # A frame bigger than a submit's largest body closes its socket (1009).
        ws_max_size=settings.ws_message_limit_bytes,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run(sockets=[listening_socket(settings)])
    return 0


def listening_socket(settings: GatewaySettings) -> socket.socket:
    """The listening socket; accepted connections inherit its send buffer size, which
    bounds what a client that stops reading holds in the kernel (a stream then backs up
    into its bounded per-client queue, and is cut off with a resume cursor)."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if settings.socket_send_buffer_bytes is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.socket_send_buffer_bytes)
        sock.bind((settings.host, settings.port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock
