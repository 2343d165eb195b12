"""The ``keys`` topic as the process's keyring: users' data keys for sealed text.

Every gateway and worker reads every partition of the compacted ``keys`` topic into
``pipeline.core.sealing.keyring()`` and follows it, like the preferences table. A key record is
keyed ``<user>/<key_id>``: two writers that create a key for one user at once both keep theirs,
and every sealed field names its key, so neither's text is lost. Forgetting writes a tombstone
for every key of the user this process knows. See docs/architecture.md, "Forgetting".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any, cast

from aiokafka import TopicPartition

from pipeline.core import sealing
from pipeline.core.clock import now_ms
from pipeline.core.codec import codec
from pipeline.core.errors import CodecError
from pipeline.core.records import DataKey
from pipeline.core.settings import KafkaSettings
from pipeline.core.topics import TopicNames
from pipeline.memory.compacted import CompactedTable

log = logging.getLogger("sumstream.memory")

# How long a reader waits for a key named by a record before it treats the key as shredded:
# the writer acknowledged the key before it produced any text sealed with it.
KEY_WAIT_S = 5.0


class DataKeyTable(CompactedTable):
    """Reads ``keys`` into the process keyring; a writer also creates and shreds keys."""

    name = "keys"
    what = "data keys"

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        writer: bool = False,
        start_timeout_s: float = 60.0,
        ring: sealing.Keyring | None = None,
    ) -> None:
        topic = TopicNames.from_settings(settings).keys
        super().__init__(settings, topic, writer=writer, start_timeout_s=start_timeout_s)
        # The process's keyring, which the codec opens with; a test may give its own.
        self.ring = ring if ring is not None else sealing.keyring()
        self._creating: dict[str, asyncio.Future[str]] = {}

    async def key_for(self, user_id: str) -> str:
        """The user's current key id, created (and acknowledged by the broker) if none."""
        found = self.ring.current(user_id)
        if found is not None:
            return found
        # One creation per user at a time in this process; another process may create its
        # own at once, which is harmless (module docstring).
        pending = self._creating.get(user_id)
        if pending is None:
            pending = asyncio.ensure_future(self._create(user_id))
            self._creating[user_id] = pending
            pending.add_done_callback(lambda _: self._creating.pop(user_id, None))
        return await asyncio.shield(pending)

    async def shred(self, user_id: str) -> list[str]:
        """Tombstone every key of the user this process knows; the key ids shredded."""
        ids = self.ring.key_ids(user_id)
        for key_id in ids:
            await self._send(f"{user_id}/{key_id}", None)
            self.ring.shred(user_id, key_id)
        return ids

    async def wait_for(self, key_id: str, timeout_s: float = KEY_WAIT_S) -> bool:
        """Wait until ``key_id`` is read (True); after ``timeout_s`` treat it as shredded."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(lambda: self._knows(key_id))
        if self._knows(key_id):
            return True
        log.warning("data key never arrived: its text reads as forgotten", extra={"key": key_id})
        self.ring.give_up(key_id)
        return False

    async def decode(self, value: bytes | None, name: str) -> dict[str, Any]:
        """``codec().decode_as``, waiting for a data key the record names but this process
        has not read yet (a stage's record may outrun the key on ``keys``)."""
        for _ in range(3):
            try:
                return codec().decode_as(value, name)
            except sealing.KeyUnknownError as exc:
                await self.wait_for(exc.key_id)
        return codec().decode_as(value, name)

    def _knows(self, key_id: str) -> bool:
        return self.ring.knows(key_id)

    async def _create(self, user_id: str) -> str:
        key_id = secrets.token_hex(8)
        record: DataKey = {
            "user_id": user_id,
            "key_id": key_id,
            "key": sealing.new_key(),
            "created_at": now_ms(),
            "trace": {},
        }
        await self._send(f"{user_id}/{key_id}", codec().encode("DataKey", record))
        await self._apply(record["user_id"], key_id, record["key"])
        return key_id

    async def _apply_batch(self, tp: TopicPartition, messages: list[Any]) -> None:
        for message in messages:
            user_id, _, key_id = (message.key or b"").decode("utf-8", "replace").rpartition("/")
            if message.value is None:
                self.ring.shred(user_id, key_id)
                continue
            try:
                record = cast(DataKey, codec().decode_as(message.value, "DataKey"))
            except CodecError as exc:
                log.warning(
                    "unreadable data key skipped",
                    extra={"partition": tp.partition, "offset": message.offset, "error": str(exc)},
                )
                continue
            # The record key is the namespace, as for preferences.
            if record["user_id"] == user_id and record["key_id"] == key_id:
                await self._apply(user_id, key_id, record["key"])

    async def _apply(self, user_id: str, key_id: str, key: bytes) -> None:
        async with self._changed:
            self.ring.add(user_id, key_id, key)
            self._changed.notify_all()
