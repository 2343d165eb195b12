"""Long documents: the plan's arithmetic, chunk ids, chunks with overlap, and the reduce
step's transitions (pure; docs/architecture.md, "Long documents")."""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal
from typing import Any

import pytest

from pipeline.core import longdoc
from pipeline.core.codec import codec
from pipeline.core.pricing import ModelPrice
from pipeline.core.records import ChunkSummary
from pipeline.core.settings import WorkerSettings
from pipeline.core.tiers import Tier
from pipeline.llm.extractive import count_tokens, document_of
from pipeline.worker.longdoc.reduce import DocState, on_cancel, on_plan, on_summary
from pipeline.worker.longdoc.split import LongJob, plan_ahead, with_overlap
from pipeline.worker.prepare import CHUNK_PLACEHOLDER, prepare

NOW = 1_750_000_000_000
PRICE = ModelPrice(Decimal(1), Decimal(5))
LONG = Tier(
    "pro",
    100,
    10_000_000,
    1_000,
    200,
    4,
    100.0,
    60.0,
    "truncate",
    long_documents=True,
    max_document_tokens=50_000,
    chunk_tokens=400,
    map_concurrency=2,
    reduce_output_tokens=100,
)
SHORT = Tier("free", 10, 1000, 1_000, 20, 1, 1.0, 30.0, "reject")
SENTENCE = "Section {n} of the contract sets the terms of payment for the supplier in full. "


def document(sentences: int) -> str:
    paragraphs = []
    for p in range(0, sentences, 5):
        paragraphs.append("".join(SENTENCE.format(n=n) for n in range(p, min(p + 5, sentences))))
    return "\n\n".join(p.strip() for p in paragraphs)


def request(doc: str, tier: str = "pro") -> dict[str, Any]:
    return {
        "request_id": "01J0000000000000000000000A",
        "user_id": "alice",
        "tier": tier,
        "document": doc,
        "instructions": None,
        "max_output_tokens": None,
        "model": None,
        "deadline_ms": None,
        "idempotency_key": None,
        "source": "gateway",
        "replay_of": None,
        "degraded": None,
        "created_at": NOW - 20,
        "trace": {"received": NOW - 20},
    }


# --- the plan ------------------------------------------------------------------------------


def test_a_document_within_one_call_is_planned_as_one_call() -> None:
    plan = longdoc.plan(900, LONG, max_output_tokens=200, overhead_tokens=50, price=PRICE)
    assert (plan.mode, plan.levels, plan.chunks) == ("single", (1,), 0)
    assert (plan.input_tokens, plan.output_tokens) == (950, 200)
    assert plan.cost_micro_usd == 950 + 5 * 200


def test_a_tier_without_long_documents_never_map_reduces() -> None:
    assert not longdoc.is_long(10_000, SHORT)
    assert longdoc.is_long(1_001, LONG) and not longdoc.is_long(1_000, LONG)


def test_collapse_levels_shrink_by_the_group_size_until_one_reduce_call() -> None:
    # 400-token calls take 4 summaries of 100 tokens each.
    assert longdoc.group_size(LONG) == 4
    assert longdoc.collapse_levels(4, LONG) == [1]
    assert longdoc.collapse_levels(5, LONG) == [2, 1]
    assert longdoc.collapse_levels(40, LONG) == [10, 3, 1]


def test_a_long_plan_counts_every_call_its_tokens_cost_and_time() -> None:
    plan = longdoc.plan(
        20_000, LONG, max_output_tokens=200, overhead_tokens=50, price=PRICE, chunks=56
    )
    assert plan.mode == "map_reduce"
    assert plan.levels == (56, 14, 4, 1)
    assert plan.calls == 75
    overlap = longdoc.overlap_tokens(LONG)
    assert plan.input_tokens == 20_000 + 55 * overlap + (56 + 14 + 4) * 100 + 75 * 50
    assert plan.output_tokens == (56 + 14 + 4) * 100 + 200
    assert plan.cost_micro_usd == plan.input_tokens + 5 * plan.output_tokens
    # Two calls at a time: 28 + 7 + 2 waves of summaries, then the final reduce.
    assert plan.seconds == pytest.approx(37 * (0.5 + 100 * 0.02) + 0.5 + 200 * 0.02)
    shown = plan.as_json()
    assert shown["chunks"] == 56 and shown["levels"] == 4 and shown["calls"] == 75


def test_chunk_ids_name_parent_level_and_index_and_nothing_else_parses() -> None:
    cid = longdoc.chunk_id("01J0000000000000000000000A", 2, 17)
    assert cid == "01J0000000000000000000000A~2.17"
    assert longdoc.parse_chunk_id(cid) == ("01J0000000000000000000000A", 2, 17)
    assert longdoc.parent_of(cid) == "01J0000000000000000000000A"
    for other in ("01J0000000000000000000000A", "a~b", "a~1", "a~1.x", "a~.2"):
        assert longdoc.parse_chunk_id(other) is None


# --- splitting -----------------------------------------------------------------------------


def test_each_chunk_starts_with_the_whole_last_sentences_of_the_one_before() -> None:
    parts = ["One two three. Four five six seven.", "Eight nine ten."]
    assert with_overlap(parts, 5) == [parts[0], "Four five six seven.\n\nEight nine ten."]
    assert with_overlap(parts, 0) == parts


def test_prepare_plans_a_long_document_as_map_jobs_a_plan_record_and_a_progress_event() -> None:
    doc = document(300)  # ~4,500 tokens: over the 1,000 one call may hold
    out = prepare(request(doc), {"pro": LONG}, WorkerSettings(), now_ms=NOW)
    assert isinstance(out, LongJob)
    parent = "01J0000000000000000000000A"
    assert [m["request_id"] for m in out.maps] == [
        longdoc.chunk_id(parent, 0, i) for i in range(len(out.maps))
    ]
    assert out.plan.chunks == len(out.maps) >= 12
    for m in out.maps:
        part = document_of(m["prompt"])
        assert count_tokens(part) <= LONG.chunk_tokens
        assert m["max_output_tokens"] == LONG.reduce_output_tokens
        assert m["user_id"] == "alice" and m["weight"] == LONG.weight
    # Every sentence of the document is in some chunk.
    texts = " ".join(document_of(m["prompt"]) for m in out.maps)
    assert all(SENTENCE.format(n=n).strip() in texts for n in range(300))
    assert CHUNK_PLACEHOLDER in out.final["prompt"] and out.final["chunks"] == []
    assert out.final["input_tokens_estimate"] + out.final["max_output_tokens"] == out.plan.tokens
    assert out.plan_record["levels"] == list(out.plan.levels)
    assert codec().decode_as(out.plan_record["job"], "InferenceJob")["request_id"] == parent
    assert out.progress["kind"] == "PROGRESS" and out.progress["seq"] == 0
    shown = json.loads(out.progress["text"])
    assert shown["stage"] == "plan" and shown["chunks"] == len(out.maps)


def test_the_plan_sent_ahead_counts_the_raw_document_as_prepare_counts_the_normalised_one() -> None:
    # Untidy whitespace, which normalising removes, changes no count.
    doc = document(300).replace(". ", ".  \t").replace("\n\n", " \n\n\n\n ")
    tiers = {"pro": LONG}
    ahead = plan_ahead(request(doc), tiers, WorkerSettings(), created_at=NOW - 20)
    out = prepare(request(doc), tiers, WorkerSettings(), now_ms=NOW)
    assert ahead is not None and isinstance(out, LongJob)
    early, exact = json.loads(ahead["text"]), json.loads(out.progress["text"])
    assert early["document_tokens"] == exact["document_tokens"]
    assert early["stage"] == "plan" and abs(early["chunks"] - exact["chunks"]) <= 2
    assert ahead["request_id"] == out.final["request_id"] and ahead["seq"] == 0
    assert (ahead["tier"], ahead["model"]) == (out.final["tier"], out.final["model"])


def test_no_plan_goes_ahead_for_a_document_one_call_holds_or_its_tier_refuses() -> None:
    settings = WorkerSettings()
    assert plan_ahead(request(document(20)), {"pro": LONG}, settings, created_at=NOW) is None
    assert (
        plan_ahead(request(document(300), "free"), {"free": SHORT}, settings, created_at=NOW)
        is None
    )
    refusing = {
        "pro": dataclasses.replace(LONG, max_document_tokens=2_000, on_input_too_large="reject")
    }
    assert plan_ahead(request(document(300)), refusing, settings, created_at=NOW) is None
    cutting = {"pro": dataclasses.replace(LONG, max_document_tokens=2_000)}
    ahead = plan_ahead(request(document(300)), cutting, settings, created_at=NOW)
    assert ahead is not None and json.loads(ahead["text"])["document_tokens"] == 2_000


def test_a_request_id_with_the_chunk_separator_is_invalid() -> None:
    from pipeline.core.errors import ValidationError

    with pytest.raises(ValidationError, match="~"):
        prepare(
            {**request("x"), "request_id": "a~0.1"}, {"pro": LONG}, WorkerSettings(), now_ms=NOW
        )


# --- the reduce step -----------------------------------------------------------------------


def planned(sentences: int = 300) -> tuple[LongJob, DocState]:
    out = prepare(request(document(sentences)), {"pro": LONG}, WorkerSettings(), now_ms=NOW)
    assert isinstance(out, LongJob)
    return out, on_plan(out.plan_record, LONG.reduce_output_tokens)


def summary(level: int, index: int, *, kind: str = "SUMMARY", tokens: int = 10) -> ChunkSummary:
    return {
        "request_id": "01J0000000000000000000000A",
        "kind": kind,  # type: ignore[typeddict-item]
        "level": level,
        "index": index,
        "text": f"summary {level}.{index}." if kind == "SUMMARY" else "",
        "usage": {"input_tokens": tokens, "output_tokens": 2, "attempts": 1, "cost_micro_usd": 3},
        "error": None,
        "levels": [],
        "group_size": 2,
        "job": b"",
        "plan": "",
        "created_at": NOW,
        "trace": {},
    }


def test_summaries_of_a_level_report_progress_then_the_complete_level_emits_collapse_jobs() -> None:
    out, state = planned()
    n = out.plan.chunks
    steps = [on_summary(state, summary(0, i)) for i in range(n)]
    for step in steps[:-1]:
        assert step.jobs == [] and step.progress is not None
    progress = json.loads(steps[-2].progress["text"])  # type: ignore[index]
    assert (progress["done"], progress["total"]) == (n - 1, out.plan.calls - 1)
    assert progress["input_tokens"] == 10 * (n - 1) and progress["cost_micro_usd"] == 3 * (n - 1)
    collapse = steps[-1].jobs
    assert len(collapse) == out.plan.levels[1]
    assert collapse[0]["request_id"].endswith("~1.0")
    assert "summary 0.0." in collapse[0]["prompt"] and "summary 0.3." in collapse[0]["prompt"]


def test_a_redelivered_summary_changes_nothing_and_bills_nothing_twice() -> None:
    _, state = planned()
    assert on_summary(state, summary(0, 0)).changed
    again = on_summary(state, summary(0, 0))
    assert not again.changed and again.jobs == [] and again.progress is None
    assert state.total_usage()["input_tokens"] == 10


def test_the_last_level_emits_the_final_reduce_with_every_call_billed_in_its_base_usage() -> None:
    out, state = planned()
    for level, calls in enumerate(out.plan.levels[:-1]):
        step = None
        for i in range(calls):
            step = on_summary(state, summary(level, i))
        assert step is not None
    assert step.progress is not None and json.loads(step.progress["text"])["stage"] == "reduce"
    (final,) = step.jobs
    assert final["request_id"] == "01J0000000000000000000000A"
    assert CHUNK_PLACEHOLDER not in final["prompt"]
    calls = out.plan.calls - 1
    base = final["base_usage"]
    assert base is not None
    billed = ("input_tokens", "output_tokens", "attempts", "cost_micro_usd")
    assert {k: base[k] for k in billed} == {  # type: ignore[literal-required]
        "input_tokens": 10 * calls,
        "output_tokens": 2 * calls,
        "attempts": calls,
        "cost_micro_usd": 3 * calls,
    }
    # Chunk calls cache nothing (each chunk is read once) and carry no memory.
    assert all(v == 0 for k, v in base.items() if k not in billed)
    # The state survives the table (JSON) unchanged.
    assert DocState.decode(state.encode()) == state
    assert on_summary(state, summary(0, 0)).jobs == []


def test_a_failed_chunk_is_named_as_a_missing_section_and_the_rest_goes_on() -> None:
    out, state = planned()
    n = out.plan.chunks
    for i in range(n):
        step = on_summary(state, summary(0, i, kind="FAILED" if i == 2 else "SUMMARY"))
    assert state.missing == [2]
    assert json.loads(step.progress["text"])["missing_sections"] == [3]  # type: ignore[index]
    assert len(step.jobs) == -(-(n - 1) // longdoc.group_size(LONG))


def test_a_level_with_no_summary_at_all_ends_the_request_with_an_error() -> None:
    out, state = planned()
    for i in range(out.plan.chunks):
        step = on_summary(state, summary(0, i, kind="FAILED"))
    assert step.terminal is not None and step.terminal["kind"] == "ERROR"
    assert step.terminal["error"]["code"] == "chunks_failed"  # type: ignore[index]
    assert step.terminal["usage"]["input_tokens"] == 10 * out.plan.chunks  # type: ignore[index]


def test_a_cancel_names_every_outstanding_call_and_ends_the_parent_once() -> None:
    out, state = planned()
    on_summary(state, summary(0, 0))
    calls, terminal = on_cancel(state, "client")
    assert calls == [
        longdoc.chunk_id("01J0000000000000000000000A", 0, i) for i in range(1, out.plan.chunks)
    ]
    assert terminal is not None and terminal["kind"] == "CANCELLED"
    assert terminal["usage"]["input_tokens"] == 10  # type: ignore[index]
    assert on_cancel(state, "client") == ([], None)
    assert on_summary(state, summary(0, 1)).jobs == []


def test_the_final_reduce_names_the_sections_whose_call_failed() -> None:
    out, state = planned(90)
    assert out.plan.levels == (out.plan.chunks, 1) and out.plan.chunks >= 3
    for i in range(out.plan.chunks):
        step = on_summary(state, summary(0, i, kind="FAILED" if i == 1 else "SUMMARY"))
    (final,) = step.jobs
    assert final["missing_sections"] == [2]
    assert "summary 0.1." not in final["prompt"] and "summary 0.2." in final["prompt"]


def test_map_summaries_from_calls_are_kept_for_reuse_and_reused_ones_counted() -> None:
    out, state = planned()
    assert out.reuse_key.startswith("alice/") and state.reuse_key == out.reuse_key
    called = on_summary(state, summary(0, 0))
    assert [r["index"] for r in called.keep] == [0]
    reused = summary(0, 1, tokens=0)
    reused["usage"] = {"input_tokens": 0, "output_tokens": 0, "attempts": 0, "cost_micro_usd": 0}
    step = on_summary(state, reused)
    assert step.keep == [] and state.reused == 1
    assert json.loads(step.progress["text"])["reused_chunks"] == 1  # type: ignore[index]
    # The same document for another user has another key (with the same document hash).
    other = prepare(
        {**request(document(300)), "user_id": "bob"}, {"pro": LONG}, WorkerSettings(), now_ms=NOW
    )
    assert isinstance(other, LongJob) and other.reuse_key != out.reuse_key
    assert other.reuse_key.split("/")[1] == out.reuse_key.split("/")[1]


def test_done_bills_the_final_reduce_as_the_rest_of_the_total() -> None:
    from gateway.http.sse import usage_by_phase

    body: Any = {
        "usage": {"input_tokens": 1_000, "output_tokens": 300, "attempts": 5},
        "cost": {"micro_usd": 2_500, "usd": 0.0025},
    }
    phases = {
        "map": {"input_tokens": 700, "output_tokens": 200, "cost_micro_usd": 1_700},
        "collapse": {"input_tokens": 200, "output_tokens": 50, "cost_micro_usd": 450},
    }
    assert usage_by_phase(body, phases)["reduce"] == {
        "input_tokens": 100,
        "output_tokens": 50,
        "cost_micro_usd": 350,
    }


def test_a_finished_documents_stored_state_drops_its_summaries_and_ignores_what_comes() -> None:
    out, state = planned(90)
    for i in range(out.plan.chunks):
        on_summary(state, summary(0, i))
    assert state.final_emitted
    stored = DocState.decode(state.stored())
    assert stored.summaries == {} and stored.job == b""
    assert len(state.stored()) < 1_000
    assert on_summary(stored, summary(0, 0)) == on_summary(stored, summary(1, 0))
    assert not on_summary(stored, summary(0, 0)).changed
    assert on_cancel(stored, "client") == ([], None)
