from __future__ import annotations

import asyncio

import pytest

from pipeline.worker.inference.runs import ResumeState, Run, RunState


def make_run(resume: ResumeState | None = None) -> Run:
    job = {"request_id": "r1", "user_id": "u", "source": "replay", "weight": 4}
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    return Run(job=job, grant=future, resume=resume, deadline_ms=0)  # type: ignore[arg-type]


async def test_a_run_goes_queued_running_finishing_ended_closed() -> None:
    run = make_run()
    assert run.state is RunState.QUEUED
    for state in (RunState.RUNNING, RunState.FINISHING, RunState.ENDED, RunState.CLOSED):
        run.advance(state)
        assert run.state is state
    assert run.closed and not run.ended


@pytest.mark.parametrize("state", [RunState.QUEUED, RunState.RUNNING, RunState.FINISHING])
async def test_any_unended_run_may_close_without_an_end(state: RunState) -> None:
    run = make_run()
    run.state = state
    run.advance(RunState.CLOSED)
    assert run.closed


@pytest.mark.parametrize(
    ("start", "to"),
    [
        (RunState.QUEUED, RunState.FINISHING),
        (RunState.QUEUED, RunState.ENDED),
        (RunState.RUNNING, RunState.ENDED),
        (RunState.ENDED, RunState.FINISHING),
        (RunState.CLOSED, RunState.RUNNING),
    ],
)
async def test_a_transition_the_lifecycle_lacks_is_refused(start: RunState, to: RunState) -> None:
    run = make_run()
    run.state = start
    with pytest.raises(RuntimeError, match=f"{start.name} -> {to.name}"):
        run.advance(to)


async def test_a_resumed_run_continues_from_the_streamed_state() -> None:
    resume = ResumeState("Hello", 4, 2, 30, 7, {"inference_start": 5})
    run = make_run(resume)
    assert (run.seq, run.text, run.attempts, run.streamed) == (4, "Hello", 2, 7)
    assert (run.input_tokens, run.output_tokens, run.trace) == (30, 7, {"inference_start": 5})
    assert (run.request_id, run.user_id, run.weight, run.meta.source) == ("r1", "u", 4, "replay")


# -- what a released run used that `tokens` does not show (docs/architecture.md, "Billing a
# resumed stream") ------------------------------------------------------------------------------


def _attempt(run: Run, *, input_tokens: int, output_tokens: int) -> None:
    """What an upstream attempt adds to the run (attempts.py does this as a stream ends)."""
    run.attempts += 1
    run.input_tokens += input_tokens
    run.output_tokens += output_tokens


async def test_a_run_that_published_nothing_leaves_its_whole_work_unbilled() -> None:
    run = make_run()
    _attempt(run, input_tokens=161, output_tokens=30)  # streamed into a frozen worker
    used = run.unpublished_usage()
    assert used is not None
    assert (used["input_tokens"], used["output_tokens"]) == (161, 30)


async def test_published_seqs_and_the_usage_a_delta_carried_are_not_counted_again() -> None:
    run = make_run()
    _attempt(run, input_tokens=161, output_tokens=0)
    run.outbox.published(1, run.usage())  # its first DELTA carried the attempt's input
    run.output_tokens += 9  # nine tokens received; one of them out
    used = run.unpublished_usage()
    assert used is not None
    assert (used["input_tokens"], used["output_tokens"]) == (0, 8)


async def test_a_resumed_run_counts_only_its_own_work() -> None:
    resume = ResumeState(text="ab", last_seq=3, attempts=1, input_tokens=161, output_tokens=2)
    run = make_run(resume)
    _attempt(run, input_tokens=170, output_tokens=5)  # a second attempt, nothing published
    used = run.unpublished_usage()
    assert used is not None
    assert (used["input_tokens"], used["output_tokens"]) == (170, 5)


async def test_a_run_whose_work_is_all_out_has_nothing_unbilled() -> None:
    run = make_run()
    _attempt(run, input_tokens=161, output_tokens=0)
    run.outbox.published(1, run.usage())
    run.output_tokens += 4
    run.outbox.published(3, None)
    assert run.unpublished_usage() is None


async def test_only_a_run_whose_terminal_may_be_out_writes_no_usage_event() -> None:
    from pipeline.worker.inference.engine import _unpublished

    run, ending = make_run(), make_run()
    for r in (run, ending):
        _attempt(r, input_tokens=161, output_tokens=30)
        r.advance(RunState.RUNNING)
        r.advance(RunState.FINISHING)  # both reached their end
    ending.terminal_out = True  # its terminal, which bills the whole run, may be out
    # `run` failed to flush its deltas before its terminal was sent (chaos seed 11: two runs
    # released by a rebalance this way went unbilled).
    [usage_event] = _unpublished([run, ending])
    assert usage_event["kind"] == "USAGE" and usage_event["seq"] == 0
    assert usage_event["usage"] is not None
    assert usage_event["usage"]["output_tokens"] == 30
