"""`sumstream submit FILE`: produce a request straight onto `requests`, as another system would,
then print the summary as it streams from `tokens` and the final result from `results`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from pipeline.core.clock import now_ms
from pipeline.core.codec import codec
from pipeline.core.ids import random_ulid
from pipeline.core.producers import ProducerIdentity, ProducerTable
from pipeline.core.settings import KafkaSettings
from pipeline.core.topics import TopicNames
from pipeline.kafka.connection import ConnectionConfig
from pipeline.kafka.tail import read_request_records
from pipeline.memory.keystore import DataKeyTable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="text file to summarize ('-' for stdin)")
    parser.add_argument("--user", default="cli", help="user id billed for the request")
    parser.add_argument(
        "--tier",
        default="pro",
        help="tier named in the record; the worker replaces it with the user's tier from the "
        "keys file (or the producer's tier for users without keys)",
    )
    parser.add_argument("--instructions", default=None)
    parser.add_argument("--max-output-tokens", type=int, default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--no-follow", action="store_true", help="produce and print the id only")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for the result"
    )


def build_request(document: str, *, user: str, tier: str, **fields: Any) -> dict[str, Any]:
    """A SummarizeRequest record as any producer should write it."""
    now = now_ms()
    return {
        "request_id": str(random_ulid(now)),
        "user_id": user,
        "tier": tier,
        "document": document,
        "source": "cli",
        "created_at": now,
        "trace": {"received": now, "enqueued": now},
        **fields,
    }


def request_producer(settings: KafkaSettings) -> Producer:
    """The producer of requests from outside the gateway (submit, replay rerun): idempotent,
    acks=all, and murmur2 partitioning like the Java clients and the gateway."""
    return ConnectionConfig.from_settings(settings).confluent_producer(
        {"enable.idempotence": True, "acks": "all", "partitioner": "murmur2_random"}
    )


# The producer name `sumstream submit` signs as unless SUMSTREAM_PRODUCER names another.
SUBMIT_PRODUCER = "demo"


def signer(settings: KafkaSettings, default: str) -> ProducerIdentity:
    """The producer this command signs its records as: SUMSTREAM_PRODUCER, else ``default``."""
    return ProducerTable.load(settings.producers_file).get(settings.producer or default)


def produce_request(
    settings: KafkaSettings, request: dict[str, Any], *, producer_name: str = SUBMIT_PRODUCER
) -> None:
    """Produce as every producer must: idempotent, acks=all, murmur2, signed
    (docs/architecture.md, "Identity")."""
    identity = signer(settings, producer_name)
    producer = request_producer(settings)
    errors: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    value = codec().encode("SummarizeRequest", request)
    producer.produce(
        TopicNames.from_settings(settings).requests,
        key=request["request_id"].encode(),
        value=value,
        headers=identity.headers(value),
        on_delivery=on_delivery,
    )
    remaining = producer.flush(30)
    if remaining or errors:
        raise RuntimeError(f"request not delivered: {errors or 'flush timed out'}")


async def follow(
    settings: KafkaSettings, request_id: str, timeout_s: float
) -> dict[str, Any] | None:
    """Print each token as it arrives, then return the SummaryResult (None on timeout).
    Preprocess seals the text with the user's data key, so the keys are read too."""
    topics = TopicNames.from_settings(settings)
    keys = DataKeyTable(settings)
    await keys.start()
    try:
        async for event in read_request_records(
            ConnectionConfig.from_settings(settings),
            topics.tokens,
            request_id,
            schema="TokenEvent",
            follow=True,
            idle_timeout_s=timeout_s,
            wait_for_key=keys.wait_for,
        ):
            if event["kind"] == "DELTA":
                sys.stdout.write(event["text"])
                sys.stdout.flush()
        sys.stdout.write("\n")
        async for result in read_request_records(
            ConnectionConfig.from_settings(settings),
            topics.results,
            request_id,
            schema="SummaryResult",
            follow=True,
            idle_timeout_s=timeout_s,
            stop_at_terminal=False,
            wait_for_key=keys.wait_for,
        ):
            return result
        return None
    finally:
        await keys.stop()


def run(args: argparse.Namespace) -> int:
    settings = KafkaSettings()
    text = sys.stdin.read() if str(args.file) == "-" else args.file.read_text(encoding="utf-8")
    request = build_request(
        text,
        user=args.user,
        tier=args.tier,
        instructions=args.instructions,
        max_output_tokens=args.max_output_tokens,
        model=args.model,
    )
    produce_request(settings, request)
    print(
        f"request {request['request_id']} produced to {settings.topic_prefix}requests",
        file=sys.stderr,
    )
    if args.no_follow:
        print(request["request_id"])
        return 0
    result = asyncio.run(follow(settings, request["request_id"], args.timeout))
    if result is None:
        print("no result before the timeout", file=sys.stderr)
        return 1
    summary = {k: result[k] for k in ("status", "usage", "latency_ms", "error")}
    print(json.dumps(summary, indent=2), file=sys.stderr)
    return 0 if result["status"] == "COMPLETED" else 1
