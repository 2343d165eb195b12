"""Attaching SSE clients to a request's events, and cancelling the request they abandon.

A stream reads from the hub's memory when it still holds every event the client needs, else
from a short-lived reader of the log. When the last stream of an unfinished request closes,
a CANCEL follows unless a client comes back within ``cancel_grace_s``; a request still
queued (nothing streamed yet) is cancelled at once, before the pipeline calls the model. A
client that comes back at another gateway counts too: a stream that attaches to an existing
request announces it (ATTACHED on `quota`, which every gateway reads), and the gateway with the
latest attach owns the cancel (docs/architecture.md, "Cancel on disconnect across gateways").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, cast

from gateway.http.errors import BrokerUnavailable, NotReady
from gateway.settings import GatewaySettings
from gateway.streams.hub import StreamHub, Subscriber
from gateway.streams.lookup import RequestLookup
from gateway.streams.reader import read_token_events
from pipeline.core.records import TERMINAL_KINDS, SummaryResult
from pipeline.core.topics import TopicNames
from pipeline.kafka.connection import ConnectionConfig

log = logging.getLogger("sumstream.gateway")

SourceKind = Literal["memory", "log"]
# Starts a named background task that the gateway cancels and awaits on stop.
Spawn = Callable[[Coroutine[Any, Any, Any], str], "asyncio.Task[Any]"]
Cancel = Callable[[str, str, str], Awaitable[None]]
# Announces (user_id, request_id): a client attached to the request's stream here.
Announce = Callable[[str, str], None]


@dataclass
class StreamSource:
    """Where one SSE stream reads from: the hub's memory or a reader of the log."""

    subscriber: Subscriber
    kind: SourceKind
    task: asyncio.Task[None] | None = None

    def close(self, hub: StreamHub) -> None:
        """Stop feeding the subscriber and end it."""
        if self.task is not None:
            self.task.cancel()
        else:
            hub.unsubscribe(self.subscriber)
        self.subscriber.close("closed")


class ClientStreams:
    """The SSE streams open on this gateway, counted per request for the disconnect cancel."""

    def __init__(
        self,
        settings: GatewaySettings,
        connection: ConnectionConfig,
        topics: TopicNames,
        hub: StreamHub,
        lookup: RequestLookup,
        *,
        spawn: Spawn,
        cancel: Cancel,
        running: Callable[[], bool],
        gateway_id: str = "",
        announce: Announce | None = None,
    ) -> None:
        self.settings = settings
        self.gateway_id = gateway_id
        self._announce = announce
        self.connection = connection
        self.topics = topics
        self.hub = hub
        self.lookup = lookup
        self._spawn = spawn
        self._cancel = cancel
        self._running = running
        self._open: Counter[str] = Counter()
        self._cancel_timers: dict[str, asyncio.Task[None]] = {}
        # request_id -> the gateway of its latest announced attach, in log order (bounded).
        self._attached: OrderedDict[str, str] = OrderedDict()

    def open(self, request_id: str, after_seq: int, *, announce_for: str = "") -> StreamSource:
        """Events after ``after_seq``: from memory when it covers them, else from the log.

        With ``announce_for`` (the user id), the attach is announced to every gateway: this
        stream's client came back (a resume, a replayed POST), maybe having left another one.
        """
        self._open[request_id] += 1
        if announce_for and self._announce is not None:
            self.attached(request_id, self.gateway_id)
            self._announce(announce_for, request_id)
        timer = self._cancel_timers.pop(request_id, None)
        if timer is not None:
            timer.cancel()
        sub = self.hub.subscribe(request_id, after_seq)
        if sub is not None:
            return StreamSource(sub, "memory")
        return self.read_from_log(request_id, after_seq)

    def read_from_log(
        self, request_id: str, after_seq: int, *, result: SummaryResult | None = None
    ) -> StreamSource:
        """A short-lived reader of the request's partitions feeding a subscriber.

        With ``result`` known, it reads the tokens written so far and stops; else it follows
        them to the terminal event and then waits for the result.
        """
        sub = Subscriber(request_id, self.settings.client_queue_events)
        task = self._spawn(self._feed_from_log(sub, after_seq, result), f"log-reader-{request_id}")
        return StreamSource(sub, "log", task)

    async def _feed_from_log(
        self, sub: Subscriber, after_seq: int, result: SummaryResult | None
    ) -> None:
        request_id = sub.request_id
        reason = "finished"
        try:
            terminal = False
            events = read_token_events(
                self.connection,
                self.topics.tokens,
                request_id,
                follow=result is None,
                idle_timeout_s=self.settings.reader_idle_timeout_s,
            )
            async with contextlib.aclosing(events):
                async for event in events:
                    if event["seq"] > after_seq or event["kind"] in TERMINAL_KINDS:
                        # The hub's subscribers carry plain dicts.
                        await sub.put(("token", cast(dict[str, Any], event)))
                    terminal = event["kind"] in TERMINAL_KINDS
            if result is None:
                result = await self.lookup.result_of(request_id, follow=terminal)
            if result is not None:
                await sub.put(("result", cast(dict[str, Any], result)))
            else:
                reason = "stream_idle"
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("log reader failed", extra={"request_id": request_id})
            reason = "reader_failed"
        finally:
            sub.close(reason)

    def attached(self, request_id: str, gateway_id: str) -> None:
        """A client attached to ``request_id``'s stream at ``gateway_id`` (ATTACHED, in log order).

        Another gateway's attach takes this one's disconnect cancel away: its timer stops.
        """
        self._attached[request_id] = gateway_id
        self._attached.move_to_end(request_id)
        while len(self._attached) > self.settings.max_tracked_streams:
            self._attached.popitem(last=False)
        if gateway_id != self.gateway_id:
            timer = self._cancel_timers.pop(request_id, None)
            if timer is not None:
                timer.cancel()
                log.info(
                    "disconnect cancel left to another gateway", extra={"request_id": request_id}
                )

    def _attached_elsewhere(self, request_id: str) -> bool:
        owner = self._attached.get(request_id)
        return owner is not None and owner != self.gateway_id

    def closed(self, request_id: str, user_id: str, *, finished: bool) -> None:
        """An SSE stream ended; unfinished ones are cancelled unless a client comes back."""
        self._open[request_id] -= 1
        if self._open[request_id] <= 0:
            del self._open[request_id]
        if finished or not self._running() or request_id in self._cancel_timers:
            return
        if self._attached_elsewhere(request_id):
            return  # its latest client is at another gateway, which owns the cancel
        # The grace lets a client reconnect to text already flowing. A queued request has no
        # text yet: should it start within the grace, its model call is made (and billed) for
        # a client that has gone.
        grace = 0.0 if self._still_queued(request_id) else self.settings.cancel_grace_s
        self._cancel_timers[request_id] = self._spawn(
            self._cancel_unless_back(request_id, user_id, grace), f"cancel-grace-{request_id}"
        )

    def _still_queued(self, request_id: str) -> bool:
        """Accepted here and nothing streamed yet (no STARTED, no token, no end)."""
        stream = self.hub.get(request_id)
        return (
            stream is not None
            and stream.last_seq == 0
            and stream.terminal is None
            and stream.result is None
        )

    async def _cancel_unless_back(self, request_id: str, user_id: str, grace_s: float) -> None:
        try:
            await asyncio.sleep(grace_s)
            stream = self.hub.get(request_id)
            if self._open[request_id] > 0 or (stream is not None and stream.result):
                return
            if self._attached_elsewhere(request_id):
                return
            await self._cancel(request_id, user_id, "disconnect")
        except (BrokerUnavailable, NotReady) as exc:
            log.warning("disconnect cancel failed: %s", exc, extra={"request_id": request_id})
        finally:
            if self._cancel_timers.get(request_id) is asyncio.current_task():
                del self._cancel_timers[request_id]
