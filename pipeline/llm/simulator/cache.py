"""Prompt caching as the Messages API reports it: ``cache_control`` breakpoints and their usage.

A block marked ``cache_control`` ends a cacheable prefix (system blocks, then message blocks, in
order). A call reads the longest marked prefix still cached, writes the prefix up to its last
breakpoint, and pays full input price for the rest; usage splits the three as
``cache_read_input_tokens``, ``cache_creation_input_tokens`` and ``input_tokens``. A prefix
shorter than ``min_tokens`` is not cached, and an entry lives ``ttl_s`` after its last use.
See docs/architecture.md, "Prompt caching".
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from pipeline.llm import extractive

# The API refuses a request with more breakpoints than this.
MAX_BREAKPOINTS = 4
TTLS_S = {"5m": 300.0, "1h": 3600.0}


@dataclass(frozen=True, slots=True)
class Segment:
    """One content block in prompt order; ``ttl_s`` is set when it ends a cacheable prefix."""

    role: str
    text: str
    ttl_s: float | None = None


@dataclass(frozen=True, slots=True)
class CacheUsage:
    """How a call's input divides between fresh, written and read tokens."""

    input_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


@dataclass(frozen=True, slots=True)
class _Breakpoint:
    key: bytes
    tokens: int
    ttl_s: float


def breakpoints(model: str, segments: tuple[Segment, ...]) -> list[_Breakpoint]:
    """Every marked prefix: its hash (model and text so far) and its token count."""
    digest = hashlib.sha256(model.encode())
    tokens = 0
    found: list[_Breakpoint] = []
    for segment in segments:
        # The role and a separator go into the hash so "ab"+"c" and "a"+"bc" differ.
        digest.update(b"\x00" + segment.role.encode() + b"\x01" + segment.text.encode())
        tokens += extractive.count_tokens(segment.text)
        if segment.ttl_s is not None:
            found.append(_Breakpoint(digest.copy().digest(), tokens, segment.ttl_s))
    return found


class PromptCache:
    """Cached prefixes by hash, each with its expiry; bounded, least recently used first out."""

    def __init__(self, *, min_tokens: int = 1024, max_entries: int = 10_000) -> None:
        self.min_tokens = min_tokens
        self._expires: OrderedDict[bytes, float] = OrderedDict()
        self._max_entries = max_entries
        self.read_tokens = 0
        self.written_tokens = 0

    def account(
        self, model: str, segments: tuple[Segment, ...], input_tokens: int, now: float
    ) -> CacheUsage:
        """Split ``input_tokens`` of one call and update the cache with its prefixes."""
        marks = [b for b in breakpoints(model, segments) if b.tokens >= self.min_tokens]
        if not marks:
            return CacheUsage(input_tokens)
        read = 0
        for mark in reversed(marks):
            expiry = self._expires.get(mark.key)
            if expiry is not None and expiry > now:
                read = mark.tokens
                break
        # Every marked prefix is written or refreshed: a hit extends its life, as the API does.
        for mark in marks:
            self._expires[mark.key] = now + mark.ttl_s
            self._expires.move_to_end(mark.key)
        while len(self._expires) > self._max_entries:
            self._expires.popitem(last=False)
        written = max(0, marks[-1].tokens - read)
        read, written = min(read, input_tokens), min(written, max(0, input_tokens - read))
        self.read_tokens += read
        self.written_tokens += written
        return CacheUsage(input_tokens - read - written, written, read)
