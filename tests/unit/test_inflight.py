"""The in-flight table's state machine (pipeline/worker/inflight/entries.py) and the upstream
health that outlives a rebalance (pipeline/worker/inflight/work.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from pipeline.core.settings import WorkerSettings
from pipeline.worker.app import create_app
from pipeline.worker.inference.breaker import BreakerState
from pipeline.worker.inflight import Entry, EntryState, InflightWork
from pipeline.worker.inflight.entries import (
    JobAction,
    ResumeAction,
    done,
    is_stale,
    on_cancel,
    on_job,
    on_resume,
)

JOB = b"job bytes"
RUNNING = Entry(EntryState.RUNNING, 10, JOB)
CANCELLED_WITH_JOB = Entry(EntryState.CANCEL_REQUESTED, 10, JOB)
CANCELLED_BEFORE_JOB = Entry(EntryState.CANCEL_REQUESTED, 10)
DONE = Entry(EntryState.DONE, 10)


def test_entries_keep_the_changelog_letters_of_earlier_versions() -> None:
    assert [s.value for s in EntryState] == ["R", "C", "D"]
    assert RUNNING.encode()[:1] == b"R"
    assert Entry.decode(b"D" + bytes(8)) == Entry(EntryState.DONE, 0)


def test_done_marker_drops_the_job_bytes() -> None:
    assert done(42) == Entry(EntryState.DONE, 42, b"")


@pytest.mark.parametrize(
    ("entry", "handled_here", "action"),
    [
        (None, False, JobAction.ADMIT),
        (CANCELLED_BEFORE_JOB, False, JobAction.END_CANCELLED),
        (RUNNING, False, JobAction.RESUME),
        (CANCELLED_WITH_JOB, False, JobAction.RESUME),
        (RUNNING, True, JobAction.SKIP),
        (CANCELLED_WITH_JOB, True, JobAction.SKIP),
        (DONE, False, JobAction.SKIP),
        (DONE, True, JobAction.SKIP),
    ],
    ids=[
        "new-job-is-admitted",
        "cancel-came-first-ends-the-job",
        "running-nowhere-is-resumed",
        "cancelled-running-nowhere-is-resumed-to-end",
        "replay-of-a-running-job-is-skipped",
        "replay-of-a-cancelling-job-is-skipped",
        "replay-of-a-finished-job-is-skipped",
        "replay-of-a-finished-job-handled-here-is-skipped",
    ],
)
def test_a_job_record_moves_its_entry(
    entry: Entry | None, handled_here: bool, action: JobAction
) -> None:
    assert on_job(entry, handled_here=handled_here) is action


def test_a_cancel_before_the_job_writes_a_marker_without_job_bytes() -> None:
    assert on_cancel(None, now_ms=99) == Entry(EntryState.CANCEL_REQUESTED, 99, b"")


def test_a_cancel_of_an_entry_waiting_for_resume_keeps_its_job_and_time() -> None:
    assert on_cancel(RUNNING, now_ms=99) == Entry(EntryState.CANCEL_REQUESTED, 10, JOB)


@pytest.mark.parametrize("entry", [CANCELLED_WITH_JOB, CANCELLED_BEFORE_JOB, DONE])
def test_a_cancel_of_a_cancelled_or_finished_entry_writes_nothing(entry: Entry) -> None:
    assert on_cancel(entry, now_ms=99) is None


@pytest.mark.parametrize(
    ("current", "stream_ended", "action"),
    [
        (RUNNING, False, ResumeAction.CONTINUE),
        (RUNNING, True, ResumeAction.MARK_DONE),
        (CANCELLED_WITH_JOB, False, ResumeAction.END_CANCELLED),
        (CANCELLED_WITH_JOB, True, ResumeAction.MARK_DONE),
        (DONE, False, ResumeAction.SKIP),
        (DONE, True, ResumeAction.SKIP),
        (None, False, ResumeAction.SKIP),
    ],
    ids=[
        "unfinished-entry-is-continued",
        "replayed-finished-job-is-marked-done-not-run",
        "cancelled-entry-is-ended-here",
        "cancelled-entry-whose-stream-ended-is-marked-done",
        "finished-meanwhile-is-skipped",
        "finished-and-ended-is-skipped",
        "purged-meanwhile-is-skipped",
    ],
)
def test_a_resume_moves_its_entry(
    current: Entry | None, stream_ended: bool, action: ResumeAction
) -> None:
    assert on_resume(current, stream_ended=stream_ended) is action


@pytest.mark.parametrize(
    ("entry", "stale"),
    [
        (DONE, True),
        (CANCELLED_BEFORE_JOB, True),
        (CANCELLED_WITH_JOB, False),
        (RUNNING, False),
        (Entry(EntryState.DONE, 20), False),
    ],
    ids=["old-done", "old-cancel-without-job", "cancel-with-job", "running", "recent-done"],
)
def test_the_purge_deletes_only_old_markers(entry: Entry, stale: bool) -> None:
    assert is_stale(entry, horizon_ms=20) is stale


def test_only_done_entries_are_finished() -> None:
    assert [e.unfinished for e in (RUNNING, CANCELLED_WITH_JOB, DONE)] == [True, True, False]


async def test_a_rebalance_while_the_breaker_is_open_keeps_it_open_and_the_budget_spent(
    tmp_path: Path,
) -> None:
    settings = WorkerSettings(
        app_id=f"unit-inflight-{uuid.uuid4().hex[:8]}",
        topic_prefix="u.",
        data_dir=tmp_path,
        # Nothing listens there: the upstream is down for the whole test.
        llm_sim_url="http://127.0.0.1:9",
        breaker_failure_threshold=1,
        breaker_reset_s=3600.0,
    )
    app = create_app(settings, ["inference"])
    assert app.runtime is not None
    work = app.runtime.inflight
    assert isinstance(work, InflightWork)
    upstream = work.upstream
    await work.start()
    try:
        first_engine = work.engine
        upstream.breaker.record_failure()
        while upstream.budget.try_withdraw():
            pass
        assert upstream.breaker.state is BreakerState.OPEN
        assert upstream.budget.available == 0

        work.on_assigned({0, 1})
        await work.on_revoked()
        work.on_assigned({0, 1})

        engine = work.engine
        assert engine is first_engine  # the engine outlives the rebalance...
        assert engine.upstream is upstream  # ...and so does its upstream
        assert engine.breaker.state is BreakerState.OPEN
        assert engine.budget.available == 0
    finally:
        await work.stop()
