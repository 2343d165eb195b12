"""The Anthropic Messages wire format as the simulator speaks it.

Parsing and validating a request body (``parse_call``), the model's answer (``reply_to``), and
the bytes of the reply: the message object, the named SSE events of a stream, the error body.
See docs/architecture.md, "The LLM simulator".
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from pipeline.llm import extractive
from pipeline.llm.simulator.cache import MAX_BREAKPOINTS, TTLS_S, CacheUsage, Segment

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
ERROR_MESSAGES = {429: "Rate limited", 500: "Internal server error", 529: "Overloaded"}
# Context windows in tokens, as the API documents them; a model not listed gets the default.
# The ``context_window_tokens`` knob overrides them all (tests shrink it).
CONTEXT_WINDOWS = {"claude-sonnet-4-5": 200_000, "claude-opus-4-5": 200_000}
DEFAULT_CONTEXT_WINDOW = 200_000


class Rejection(Exception):
    """A request answered with an error before any token (HTTP status + Anthropic error body)."""

    def __init__(self, status: int, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        # Set when this rejection knows its own wait (a rate-limit bucket), else the knob's.
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class Call:
    """The parts of a valid Messages request the simulator uses."""

    model: str
    max_tokens: int
    stream: bool
    prompt: str  # the last user message holding a <document>, else the last one
    prefill: str  # the final assistant message's text, "" without one
    input_tokens: int
    stop_sequences: tuple[str, ...] = ()
    # Every block in prompt order, with its cache_control breakpoint (cache.py).
    segments: tuple[Segment, ...] = ()


@dataclass(frozen=True, slots=True)
class Reply:
    text: str
    pieces: list[str]
    stop_reason: str
    stop_sequence: str | None


def reply_to(call: Call) -> Reply:
    """The model's answer: the summary after the prefill, cut by stop sequences and max_tokens.

    A prefill that is a prefix of the summary (e.g. the text already streamed, its trailing
    whitespace stripped as the API demands) is continued so that prefill + answer == summary.
    Any other prefill is answered with a space and the whole summary, as a model would start
    over after text that is not its own.
    """
    summary = extractive.full_summary(extractive.document_of(call.prompt))
    if summary.startswith(call.prefill):
        text = summary[len(call.prefill) :]
    else:
        text = " " + summary if summary else ""
    stop_reason, stop_sequence = "end_turn", None
    hits = [(text.find(s), s) for s in call.stop_sequences if s and s in text]
    if hits:
        at, stop_sequence = min(hits)
        text, stop_reason = text[:at], "stop_sequence"
    pieces = extractive.tokens(text)
    if len(pieces) > call.max_tokens:
        pieces = pieces[: call.max_tokens]
        text, stop_reason, stop_sequence = "".join(pieces), "max_tokens", None
    return Reply(text, pieces, stop_reason, stop_sequence)


def parse_call(body: bytes) -> Call:
    """Validate a Messages request body like the real API does where that is cheap."""
    try:
        data = json.loads(body)
    except ValueError:
        raise _invalid("There was an error parsing the body of your request as JSON") from None
    if not isinstance(data, dict):
        raise _invalid("body: Input should be an object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid(
            "model: Field required" if model is None else "model: Input should be a string"
        )
    max_tokens = data.get("max_tokens")
    if max_tokens is None:
        raise _invalid("max_tokens: Field required")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise _invalid("max_tokens: Input should be a valid integer")
    if max_tokens < 1:
        raise _invalid("max_tokens: Input should be greater than or equal to 1")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise _invalid("stream: Input should be a valid boolean")
    messages = data.get("messages")
    if messages is None:
        raise _invalid("messages: Field required")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages: at least one message is required")
    turns: list[tuple[str, str]] = []
    segments = _segments("system", data.get("system"), "system")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid(f"messages.{i}: Input should be an object")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise _invalid(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        text, has_other_blocks = _text_of(message.get("content"), f"messages.{i}.content")
        final_assistant = role == "assistant" and i == len(messages) - 1
        blank = not text or text.isspace()
        if blank and not has_other_blocks and not final_assistant:
            raise _invalid(
                f"messages.{i}: all messages must have non-empty content except for the "
                "optional final assistant message"
            )
        turns.append((role, text))
        segments += _segments(role, message.get("content"), f"messages.{i}.content")
    prefill = turns[-1][1] if turns[-1][0] == "assistant" else ""
    if prefill != prefill.rstrip():
        raise _invalid("final assistant content cannot end with trailing whitespace")
    users = [text for role, text in turns if role == "user"]
    if not users:
        raise _invalid("messages: at least one user message is required")
    # A conversation about a document (follow-ups) is answered from the document it holds.
    prompt = next((text for text in reversed(users) if "<document>" in text), users[-1])
    system = data.get("system")
    if system is not None:
        _text_of(system, "system")  # validates it; its blocks are in segments
    stop_sequences = data.get("stop_sequences") or []
    if not isinstance(stop_sequences, list) or not all(isinstance(s, str) for s in stop_sequences):
        raise _invalid("stop_sequences: Input should be a list of strings")
    # Counted per block, as the cache counts its prefixes (cache.py), so the two always agree.
    input_tokens = sum(extractive.count_tokens(segment.text) for segment in segments)
    marked = sum(1 for segment in segments if segment.ttl_s is not None)
    if marked > MAX_BREAKPOINTS:
        raise _invalid(
            f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. "
            f"Found {marked}."
        )
    return Call(
        model,
        max_tokens,
        stream,
        prompt,
        prefill,
        input_tokens,
        tuple(stop_sequences),
        tuple(segments),
    )


def context_window(model: str, override: int = 0) -> int:
    """The context window of ``model`` in tokens (``override`` when it is set)."""
    return override or CONTEXT_WINDOWS.get(model, DEFAULT_CONTEXT_WINDOW)


def check_context(call: Call, window: int) -> None:
    """Refuse a call over the context window with the real API's 400 and message."""
    if call.input_tokens > window:
        raise _invalid(f"prompt is too long: {call.input_tokens} tokens > {window} maximum")
    if call.input_tokens + call.max_tokens > window:
        raise _invalid(
            f"input length and `max_tokens` exceed context limit: {call.input_tokens} + "
            f"{call.max_tokens} > {window}, decrease input length or `max_tokens` and try again"
        )


def prepare(body: bytes, window_override: int = 0) -> tuple[Call, Reply]:
    """The call in ``body`` and its answer, or the Rejection the API would give it."""
    call = parse_call(body)
    check_context(call, context_window(call.model, window_override))
    return call, reply_to(call)


def parse_count(body: bytes) -> int:
    """The ``input_tokens`` of a ``count_tokens`` body (model, messages, optional system)."""
    try:
        data = json.loads(body)
    except ValueError:
        raise _invalid("There was an error parsing the body of your request as JSON") from None
    if not isinstance(data, dict):
        raise _invalid("body: Input should be an object")
    # The same validation as a Messages call; max_tokens is not part of a count.
    return parse_call(json_bytes({**data, "max_tokens": 1})).input_tokens


def _text_of(content: object, where: str) -> tuple[str, bool]:
    """The text of a content field (string or blocks) and whether it had non-text blocks."""
    if isinstance(content, str):
        return content, False
    if content is None:
        raise _invalid(f"{where}: Field required")
    if not isinstance(content, list):
        raise _invalid(f"{where}: Input should be a valid string or list of content blocks")
    parts: list[str] = []
    other = False
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise _invalid(f"{where}.{j}.type: Field required")
        if block["type"] != "text":
            other = True
            continue
        if not isinstance(block.get("text"), str):
            raise _invalid(f"{where}.{j}.text: Field required")
        parts.append(block["text"])
    return "".join(parts), other


def _segments(role: str, content: object, where: str) -> list[Segment]:
    """The text blocks of an already validated content field, with their breakpoints."""
    if content is None:
        return []
    if isinstance(content, str):
        return [Segment(role, content)]
    found: list[Segment] = []
    for j, block in enumerate(content if isinstance(content, list) else []):
        control = block.get("cache_control")
        ttl_s = None
        if control is not None:
            if not isinstance(control, dict) or control.get("type") != "ephemeral":
                raise _invalid(f"{where}.{j}.cache_control.type: Input should be 'ephemeral'")
            ttl = control.get("ttl", "5m")
            if ttl not in TTLS_S:
                raise _invalid(f"{where}.{j}.cache_control.ttl: Input should be '5m' or '1h'")
            ttl_s = TTLS_S[ttl]
        found.append(Segment(role, str(block.get("text") or ""), ttl_s))
    return found


def _invalid(message: str) -> Rejection:
    return Rejection(400, message)


def error_body(status: int, message: str) -> dict[str, Any]:
    """The Anthropic error object for an HTTP status."""
    kind = ERROR_TYPES.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def usage(call: Call, cached: CacheUsage | None, output_tokens: int) -> dict[str, int]:
    """The usage object: ``input_tokens`` are those neither read from nor written to the cache."""
    cached = cached or CacheUsage(call.input_tokens)
    return {
        "input_tokens": cached.input_tokens,
        "cache_creation_input_tokens": cached.cache_creation_input_tokens,
        "cache_read_input_tokens": cached.cache_read_input_tokens,
        "output_tokens": output_tokens,
    }


def message(
    call: Call,
    reply: Reply,
    content: list[dict[str, str]],
    output_tokens: int,
    cached: CacheUsage | None = None,
) -> dict[str, Any]:
    return {
        "id": f"msg_sim{secrets.token_hex(10)}",
        "type": "message",
        "role": "assistant",
        "model": call.model,
        "content": content,
        "stop_reason": reply.stop_reason,
        "stop_sequence": reply.stop_sequence,
        "usage": usage(call, cached, output_tokens),
    }


def json_bytes(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def event(name: str, data: object) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + json_bytes(data) + b"\n\n"


SSE_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
BLOCK_START = event(
    "content_block_start",
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
)
PING = event("ping", {"type": "ping"})
BLOCK_STOP = event("content_block_stop", {"type": "content_block_stop", "index": 0})
MESSAGE_STOP = event("message_stop", {"type": "message_stop"})
# A delta frame is these two around the JSON string of the token: built per token without
# serialising the whole event.
DELTA_HEAD = (
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":'
)
DELTA_TAIL = b"}}\n\n"


def delta_frame(token: str) -> bytes:
    """The ``content_block_delta`` event of one token."""
    return DELTA_HEAD + json_bytes(token) + DELTA_TAIL
