"""The ``keys`` topic on the real broker (pipeline/memory/keystore.py): concurrent key creation,
shredding every key of a user, a key that never arrives (docs/architecture.md, "Forgetting")."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from pipeline.core.sealing import FORGOTTEN, Keyring
from pipeline.core.settings import KafkaSettings
from pipeline.core.topics import TopicNames
from pipeline.memory.keystore import DataKeyTable
from tests.harness import eventually_async

pytestmark = pytest.mark.integration


async def test_two_writers_keys_for_one_user_both_open_and_one_shred_removes_both(
    kafka_settings: KafkaSettings, make_topics: Callable[..., TopicNames]
) -> None:
    make_topics()
    rings = [Keyring(), Keyring(), Keyring()]
    first, second = (DataKeyTable(kafka_settings, writer=True, ring=r) for r in rings[:2])
    reader = DataKeyTable(kafka_settings, ring=rings[2])
    tables = [first, second, reader]
    await asyncio.gather(*(t.start() for t in tables))
    try:
        # Neither writer has read the other's key yet: each creates one of its own.
        ids = await asyncio.gather(first.key_for("ann"), second.key_for("ann"))
        assert ids[0] != ids[1]
        sealed = [rings[0].seal("from the first", ids[0]), rings[1].seal("from the second", ids[1])]
        await eventually_async(lambda: len(rings[2].key_ids("ann")) == 2 or None, timeout=30)
        assert [rings[2].open(s) for s in sealed] == ["from the first", "from the second"]
        await eventually_async(lambda: len(rings[0].key_ids("ann")) == 2 or None, timeout=30)
        assert sorted(await first.shred("ann")) == sorted(ids)
        await eventually_async(lambda: not rings[2].key_ids("ann") or None, timeout=30)
        assert [rings[2].open(s) for s in sealed] == [FORGOTTEN, FORGOTTEN]
        # A new key after forgetting seals new text; the old stays unreadable.
        fresh = await first.key_for("ann")
        assert fresh not in ids
        assert rings[0].open(rings[0].seal("new", fresh)) == "new"
        # A key a record names but nobody wrote: after the wait it reads as forgotten.
        assert not await reader.wait_for("0123456789abcdef", timeout_s=0.2)
        assert rings[2].open("ss1:0123456789abcdef:AAAA") == FORGOTTEN
    finally:
        await asyncio.gather(*(t.stop() for t in tables))
