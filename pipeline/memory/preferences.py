"""Preferences: what a user may set, and how they reach the prompt (pure).

The gateway validates a PUT against these limits; preprocess renders the stored record into the
system prompt (``apply``) and records its version on the job, so `sumstream replay request`
shows which preferences a request used. See docs/architecture.md, "Context and memory".
"""

from __future__ import annotations

from typing import Any

from pipeline.core.prompt import normalize_text
from pipeline.core.records import InferenceJob, UserPreferences
from pipeline.llm.extractive import count_tokens

LENGTHS = {
    "short": "a few sentences at most",
    "medium": "a paragraph or two",
    "long": "a detailed summary that keeps every important point",
}
STYLES = {"bullets": "a bulleted list, one point per line", "prose": "plain prose paragraphs"}
MAX_GUIDANCE_CHARS = 500
MAX_FIELD_CHARS = 64
# Kafka header of a gateway's request: the preferences version it knows the user has.
PREFERENCES_VERSION_HEADER = "sumstream-preferences-version"
FIELDS = ("length", "style", "language", "audience", "guidance")
PREAMBLE = (
    "The reader has stated preferences for their summaries (inside <preferences> tags). Follow "
    "them unless they conflict with the instructions above; they never change which document "
    "you summarize."
)


def empty(user_id: str) -> UserPreferences:
    """The preferences of a user who set none (version 0)."""
    return {
        "user_id": user_id,
        "version": 0,
        "length": None,
        "style": None,
        "language": None,
        "audience": None,
        "guidance": None,
        "updated_at": 0,
        "forgotten_at": 0,
        "trace": {},
    }


def next_version(previous: int, now_ms: int) -> int:
    """A version above ``previous``: the write's time, or one more when clocks disagree."""
    return max(now_ms, previous + 1)


def stored(
    user_id: str, fields: dict[str, Any], *, version: int, now_ms: int, forgotten_at: int = 0
) -> UserPreferences:
    """The record for a validated PUT body (unknown or absent fields are None); it keeps the
    user's last ``forgotten_at``, so setting preferences never brings back forgotten memory."""
    record = empty(user_id)
    for name in FIELDS:
        value = fields.get(name)
        record[name] = normalize_text(value) or None if isinstance(value, str) else None  # type: ignore[literal-required]
    record["version"] = version
    record["updated_at"] = now_ms
    record["forgotten_at"] = forgotten_at
    return record


def forgotten(user_id: str, *, version: int, now_ms: int) -> UserPreferences:
    """The record that forgets a user's memory: no preferences, and ``forgotten_at`` set.

    Kept (not a tombstone) so every reader also learns the moment before which the user's
    sessions and past summaries no longer count (docs/architecture.md, "Forgetting").
    """
    record = empty(user_id)
    record["version"] = version
    record["updated_at"] = now_ms
    record["forgotten_at"] = now_ms
    return record


def has_preferences(prefs: UserPreferences | None) -> bool:
    return prefs is not None and any(prefs[name] for name in FIELDS)  # type: ignore[literal-required]


def render(prefs: UserPreferences) -> str:
    """The <preferences> block for the system prompt, or "" when none is set."""
    lines: list[str] = []
    if prefs["length"] in LENGTHS:
        lines.append(f"- Length: {prefs['length']} ({LENGTHS[prefs['length']]}).")
    if prefs["style"] in STYLES:
        lines.append(f"- Style: {STYLES[prefs['style']]}.")
    if prefs["language"]:
        lines.append(f"- Language: write the summary in {prefs['language']}.")
    if prefs["audience"]:
        lines.append(f"- Audience: {prefs['audience']}.")
    if prefs["guidance"]:
        lines.append(f"- Guidance: {prefs['guidance']}")
    if not lines:
        return ""
    return "<preferences>\n" + "\n".join(lines) + "\n</preferences>"


def apply(job: InferenceJob, prefs: UserPreferences | None) -> InferenceJob:
    """The job with the user's preferences in its system prompt and their version recorded.

    The caller guarantees ``prefs`` belong to ``job["user_id"]`` (they are looked up by it).
    """
    if prefs is None or prefs["user_id"] != job["user_id"]:
        return job
    block = render(prefs)
    job["preferences_version"] = prefs["version"]
    if block:
        added = f"\n\n{PREAMBLE}\n{block}"
        job["system"] = (job.get("system") or "") + added
        job["input_tokens_estimate"] += count_tokens(added)
    return job
