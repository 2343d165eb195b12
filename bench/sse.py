"""An incremental parser of ``text/event-stream`` bodies, as a measuring client needs it."""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class SSEEvent:
    """One dispatched server-sent event."""

    event: str
    data: str
    id: str | None = None


class SSEParser:
    """Incremental parser of a ``text/event-stream`` body (WHATWG HTML, 9.2.6).

    Feed it bytes as they arrive; it returns the events completed by each chunk. Lines may
    end in CRLF, LF or CR, and a CRLF may be split across two chunks.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._last_id: str | None = None
        self._first = True
        self._skip_lf = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse ``chunk`` and return the events it completed."""
        text = self._decoder.decode(chunk)
        if self._first and text:
            # A leading byte-order mark is ignored by the spec.
            text = text.removeprefix("\ufeff")
            self._first = False
        if self._skip_lf and text:
            # The previous chunk ended in "\r": a "\n" here completes that CRLF, it is not
            # a second (blank) line.
            text = text.removeprefix("\n")
            self._skip_lf = False
        if text.endswith("\r"):
            self._skip_lf = True
        lines = _LINE_BREAK.split(self._pending + text)
        self._pending = lines.pop()
        out: list[SSEEvent] = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                out.append(event)
        return out

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        # "retry" and unknown fields do not matter to a measuring client.
        return None

    def _dispatch(self) -> SSEEvent | None:
        if self._id is not None:
            self._last_id = self._id
            self._id = None
        if not self._data:
            self._event = ""
            return None
        event = SSEEvent(self._event or "message", "\n".join(self._data), self._last_id)
        self._event = ""
        self._data = []
        return event
