"""The pure parts of sessions (pipeline/worker/memory/sessions.py) and follow-up ids."""

from __future__ import annotations

from typing import cast

import pytest

from gateway.streams.ids import mint_follow_up_id
from pipeline.core import sealing
from pipeline.core.partitioning import partition_for
from pipeline.core.records import InferenceJob
from pipeline.core.sealing import FORGOTTEN, Keyring
from pipeline.core.tiers import Tier
from pipeline.worker.memory.sessions import Session, Turn, conversation


def session() -> Session:
    return Session(
        user_id="ann",
        document="The document.",
        instructions=None,
        max_output_tokens=None,
        model=None,
        created_at=1_000,
        tier="pro",
        answer="The summary.",
        turns=[Turn("f1", "Q1?", "A1."), Turn("f2", "Q2?", None), Turn("f3", "Q3?")],
    )


def test_a_session_survives_its_encoding() -> None:
    assert Session.decode(session().encode()) == session()


def test_the_conversation_alternates_and_skips_unanswered_turns() -> None:
    # f2 has no answer yet: left out, so roles keep alternating and no turn is empty.
    assert session().conversation("f3") == ["The summary.", "Q1?", "A1.", "Q3?"]
    assert session().conversation("f1") == ["The summary.", "Q1?"]


def test_a_session_expires_after_its_tiers_ttl() -> None:
    tier = Tier("t", 1, 1, 1, 1, 1, 1.0, 1.0, "reject", session_ttl_s=2.5)
    assert session().expires_at(tier) == 3_500


def test_a_follow_up_job_marks_the_document_for_caching() -> None:
    job = cast(InferenceJob, {"request_id": "f3", "input_tokens_estimate": 10})
    out = conversation(job, session(), "s1")
    assert out["cache_prompt"] is True and out["session_id"] == "s1"
    assert out["turns"][-1] == "Q3?"
    assert out["input_tokens_estimate"] > 10


def test_follow_up_ids_share_the_sessions_requests_partition_and_stay_owned() -> None:
    for session_id in ("01ARZ3NDEKTSV4RRFFQ69G5FAV", "01BX5ZZKBKACTAV9WEVGEMMVRZ"):
        minted = mint_follow_up_id(frozenset({1, 2}), 6, session_id, 4)
        assert partition_for(minted, 6) in {1, 2}
        assert partition_for(minted, 4) == partition_for(session_id, 4)


def test_a_follow_up_id_keeps_the_session_partition_when_ownership_is_impossible() -> None:
    # Odd stream partitions and an even requests partition cannot hold together (6 and 4).
    session_id = next(
        s
        for s in (f"01ARZ3NDEKTSV4RRFFQ69G5F{i:02d}" for i in range(99))
        if partition_for(s, 4) == 0
    )
    minted = mint_follow_up_id(frozenset({1, 3}), 6, session_id, 4)
    assert partition_for(minted, 4) == 0


def test_a_session_entry_holds_its_text_sealed_and_a_shredded_key_forgets_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ring = Keyring()
    monkeypatch.setattr(sealing, "keyring", lambda: ring)
    ring.add("ann", "k1", sealing.new_key())
    kept = session()
    kept.document, kept.answer = "ann-document-marker", "ann-answer-marker"
    kept.turns = [Turn("f1", "ann-question-marker", "ann-reply-marker")]
    raw = kept.encode()
    assert b"marker" not in raw and b"user_id" in raw
    assert Session.decode(raw) == kept
    ring.shred("ann", "k1")
    gone = Session.decode(raw)
    assert (gone.document, gone.answer, gone.turns[0].message) == (FORGOTTEN,) * 3
    assert gone.created_at == kept.created_at
