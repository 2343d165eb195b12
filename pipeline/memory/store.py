"""The ``preferences`` topic as a table: every partition read into a map by user id.

The compacted topic is the table's log: the last record of a user is their preferences, a
tombstone forgets them. Every gateway (which writes it) and every worker running preprocess
(which reads it into prompts) holds the whole map, as the quota ledger does for ``quota``;
a write is applied locally once the broker acknowledged it, so the writer reads its own write.
See docs/architecture.md, "Context and memory".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, cast

from aiokafka import TopicPartition

from pipeline.core.codec import codec
from pipeline.core.errors import CodecError
from pipeline.core.records import UserPreferences
from pipeline.core.settings import KafkaSettings
from pipeline.core.topics import TopicNames
from pipeline.memory.compacted import CompactedTable

log = logging.getLogger("sumstream.memory")


class PreferencesTable(CompactedTable):
    """Every user's current preferences, read from the compacted ``preferences`` topic."""

    name = "preferences"
    what = "preferences"

    def __init__(
        self, settings: KafkaSettings, *, writer: bool = False, start_timeout_s: float = 60.0
    ) -> None:
        topic = TopicNames.from_settings(settings).preferences
        super().__init__(settings, topic, writer=writer, start_timeout_s=start_timeout_s)
        self._by_user: dict[str, UserPreferences] = {}

    def get(self, user_id: str) -> UserPreferences | None:
        """The user's preferences as last read (None: none set, or forgotten)."""
        return self._by_user.get(user_id)

    def forgotten_at(self, user_id: str) -> int:
        """When the user last asked to be forgotten (epoch ms; 0: never)."""
        found = self._by_user.get(user_id)
        return found["forgotten_at"] if found else 0

    def version(self, user_id: str) -> int:
        found = self._by_user.get(user_id)
        return found["version"] if found else 0

    async def start(self) -> None:
        await super().start()
        log.info("preferences ready", extra={"topic": self.topic, "users": len(self._by_user)})

    async def put(self, record: UserPreferences) -> None:
        """Write ``record`` as its user's preferences; applied here once acknowledged."""
        value = codec().encode("UserPreferences", record)
        await self._send(record["user_id"], value)
        await self._apply(record["user_id"], record)

    async def forget(self, user_id: str) -> bool:
        """Write the user's tombstone; True when there was something to forget."""
        had = user_id in self._by_user
        await self._send(user_id, None)
        await self._apply(user_id, None)
        return had

    async def wait_for(self, user_id: str, version: int, timeout_s: float) -> bool:
        """Wait until the user's preferences reach ``version`` (True) or ``timeout_s`` passes."""
        if self.version(user_id) >= version:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(lambda: self.version(user_id) >= version)
        return self.version(user_id) >= version

    async def _apply_batch(self, tp: TopicPartition, messages: list[Any]) -> None:
        for message in messages:
            user_id = (message.key or b"").decode("utf-8", "replace")
            if message.value is None:
                await self._apply(user_id, None)
                continue
            try:
                record = cast(UserPreferences, codec().decode_as(message.value, "UserPreferences"))
            except CodecError as exc:
                log.warning(
                    "unreadable preferences record skipped",
                    extra={"partition": tp.partition, "offset": message.offset, "error": str(exc)},
                )
                continue
            # The key is the namespace: a record naming another user is not theirs to set.
            if record["user_id"] == user_id:
                await self._apply(user_id, record)

    async def _apply(self, user_id: str, record: UserPreferences | None) -> None:
        async with self._changed:
            if record is None:
                self._by_user.pop(user_id, None)
            else:
                self._by_user[user_id] = record
            self._changed.notify_all()
