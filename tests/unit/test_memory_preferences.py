"""Preferences (pipeline/memory/preferences.py) and preprocess's use of them (pure parts)."""

from __future__ import annotations

from typing import Any, cast

from pipeline.core.records import InferenceJob
from pipeline.memory import preferences as prefs
from pipeline.worker.memory.preferences import version_hint


def job(user: str = "ann") -> InferenceJob:
    return cast(
        InferenceJob,
        {
            "request_id": "r1",
            "user_id": user,
            "system": "You summarize.",
            "prompt": "<document>x</document>",
            "input_tokens_estimate": 10,
        },
    )


def test_stored_normalises_text_and_drops_empty_and_unknown_fields() -> None:
    body: dict[str, Any] = {
        "length": "short",
        "style": "bullets",
        "language": "  French ",
        "guidance": "   ",
        "user_id": "mallory",
    }
    record = prefs.stored("ann", body, version=7, now_ms=5)
    assert record["user_id"] == "ann"
    assert record["language"] == "French"
    assert record["guidance"] is None
    assert (record["version"], record["updated_at"]) == (7, 5)


def test_next_version_always_grows() -> None:
    assert prefs.next_version(0, 1_000) == 1_000
    # A clock behind the last write still gives a higher version.
    assert prefs.next_version(2_000, 1_000) == 2_001


def test_apply_puts_the_preferences_in_the_system_prompt_and_records_the_version() -> None:
    record = prefs.stored(
        "ann",
        {"length": "short", "style": "bullets", "guidance": "Mention costs"},
        version=3,
        now_ms=1,
    )
    applied = prefs.apply(job(), record)
    assert applied["system"].startswith("You summarize.")
    assert "<preferences>" in applied["system"] and "Mention costs" in applied["system"]
    assert "bulleted list" in applied["system"]
    assert applied["preferences_version"] == 3
    assert applied["input_tokens_estimate"] > 10
    assert "Mention costs" not in applied["prompt"]


def test_apply_ignores_none_and_another_users_preferences() -> None:
    assert "preferences_version" not in prefs.apply(job(), None)
    bens = prefs.stored("ben", {"guidance": "BEN-MARKER"}, version=1, now_ms=1)
    applied = prefs.apply(job("ann"), bens)
    assert "BEN-MARKER" not in applied["system"]
    assert "preferences_version" not in applied


def test_empty_preferences_add_nothing_but_the_version() -> None:
    applied = prefs.apply(job(), prefs.stored("ann", {}, version=4, now_ms=1))
    assert applied["system"] == "You summarize."
    assert applied["preferences_version"] == 4


def test_version_hint_reads_one_header_and_ignores_junk() -> None:
    header = prefs.PREFERENCES_VERSION_HEADER
    assert version_hint([(header, b"42"), ("other", b"1")]) == 42
    assert version_hint({header: b"not a number"}) == 0
    assert version_hint(None) == 0
    assert version_hint([(header, b"-5")]) == 0
