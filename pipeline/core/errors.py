"""The pipeline's error hierarchy. Retry logic reads ``retriable``; it never matches types."""

from __future__ import annotations


class SumstreamError(Exception):
    """Root of every error sumstream raises on purpose."""

    code: str = "internal_error"
    retriable: bool = False

    def __init__(self, message: str = "", *, retriable: bool | None = None) -> None:
        super().__init__(message or self.code)
        if retriable is not None:
            self.retriable = retriable


class CodecError(SumstreamError):
    """Bytes that are not a record of ours: bad marker, unknown fingerprint, corrupt body."""

    code = "undecodable_record"


class UnknownSchemaError(CodecError):
    code = "unknown_schema"


class ValidationError(SumstreamError):
    """A well-formed record whose values break the contract (empty document, bad tier...)."""

    code = "invalid_record"


class InputTooLargeError(ValidationError):
    code = "input_too_large"


class BrokerUnavailableError(SumstreamError):
    code = "broker_unavailable"
    retriable = True


class BrokerToolingError(SumstreamError):
    """Java or Maven missing, or the local broker failed to start."""

    code = "broker_tooling"


class UpstreamError(SumstreamError):
    """The model API failed. ``status`` is the HTTP status when there was one."""

    code = "upstream_error"

    def __init__(
        self,
        message: str = "",
        *,
        retriable: bool | None = None,
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, retriable=retriable)
        self.status = status
        self.retry_after_s = retry_after_s


class UpstreamUnavailableError(UpstreamError):
    """Retries or the breaker gave up; the request ends with what it has."""

    code = "upstream_unavailable"


class DeadlineExceededError(SumstreamError):
    code = "deadline_exceeded"


class CancelledError(SumstreamError):
    code = "cancelled"


class TopicConfigError(SumstreamError):
    """A topic exists with a partition count or configuration sumstream cannot use."""

    code = "topic_config"


class TopicMissingError(SumstreamError):
    """A topic sumstream needs does not exist (run `sumstream topics create`)."""

    code = "topic_missing"
