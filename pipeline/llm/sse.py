"""A lean decoder of the Messages API's server-sent events (docs/architecture.md, "The lean
upstream path").

The SDK's stream iterator builds a typed event object per token; at 10 ms a token and a hundred
streams that is a quarter of the worker's CPU. This decoder splits the raw body into frames and
parses only the JSON of each frame with orjson; the client keeps the SDK for the request itself
(auth, headers, status errors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Frame:
    """One event: its name (``event:``) and its parsed ``data:`` (None when it had none)."""

    event: str
    data: Any


class SseDecoder:
    """Feed it raw body chunks; it returns the complete frames each chunk finished."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[Frame]:
        """The frames completed by ``chunk`` (a ValueError if a frame's data is not JSON)."""
        buffer = self._buffer + chunk
        held = b""
        if b"\r" in buffer:
            # The spec allows CRLF and CR line ends; the API sends LF, so this is the slow path.
            # A CR at the end may be half of a CRLF whose LF is in the next chunk.
            if buffer.endswith(b"\r"):
                buffer, held = buffer[:-1], b"\r"
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        frames: list[Frame] = []
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            frame = _parse(buffer[start:end])
            if frame is not None:
                frames.append(frame)
            start = end + 2
        self._buffer = buffer[start:] + held
        return frames


def _parse(raw: bytes) -> Frame | None:
    event = "message"
    data: list[bytes] = []
    for line in raw.split(b"\n"):
        if not line or line.startswith(b":"):
            continue  # a comment (keep-alive)
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"event":
            event = value.decode()
        elif name == b"data":
            data.append(value)
    if not data and event == "message":
        return None
    return Frame(event, orjson.loads(b"\n".join(data)) if data else None)
