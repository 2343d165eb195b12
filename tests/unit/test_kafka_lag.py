"""The lag reader's committed-offset read rides out a moving group coordinator."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from pipeline.core.errors import SumstreamError
from pipeline.kafka.admin import kafka_error
from pipeline.kafka.lag import committed_offsets, metadata_is_stale

PARTS = [TopicPartition("t.requests", 0)]


class FlakyCoordinator:
    """A consumer whose first ``committed`` calls fail with the given error codes."""

    def __init__(self, *codes: int) -> None:
        self.codes = list(codes)
        self.calls = 0

    def committed(self, parts: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        self.calls += 1
        if self.codes:
            raise KafkaException(KafkaError(self.codes.pop(0)))
        return [TopicPartition(tp.topic, tp.partition, 7) for tp in parts]


@pytest.mark.parametrize(
    "code", [KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS]
)
def test_committed_offsets_asks_again_while_the_coordinator_moves(code: int) -> None:
    reader = FlakyCoordinator(code, code)
    result = committed_offsets(reader, PARTS, 1.0, retry_s=0)  # type: ignore[arg-type]
    assert [(tp.partition, tp.offset) for tp in result] == [(0, 7)]
    assert reader.calls == 3


def test_committed_offsets_gives_up_after_its_attempts() -> None:
    reader = FlakyCoordinator(*[KafkaError.NOT_COORDINATOR] * 5)
    with pytest.raises(KafkaException):
        committed_offsets(reader, PARTS, 1.0, attempts=3, retry_s=0)  # type: ignore[arg-type]
    assert reader.calls == 3


def test_committed_offsets_raises_other_errors_at_once() -> None:
    reader = FlakyCoordinator(KafkaError.GROUP_AUTHORIZATION_FAILED)
    with pytest.raises(KafkaException):
        committed_offsets(reader, PARTS, 1.0, retry_s=0)  # type: ignore[arg-type]
    assert reader.calls == 1


def test_a_fenced_leader_epoch_means_stale_metadata_through_our_error() -> None:
    cause = KafkaException(KafkaError(KafkaError.FENCED_LEADER_EPOCH))
    try:
        raise kafka_error("reading offsets", cause) from cause
    except SumstreamError as exc:
        assert metadata_is_stale(exc)
    other = KafkaException(KafkaError(KafkaError._ALL_BROKERS_DOWN))
    assert not metadata_is_stale(other)
    assert not metadata_is_stale(RuntimeError("no Kafka error behind it"))
