"""The chaos run's pure parts: the seeded schedule and the accounting (bench/chaos/)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from bench.chaos.checks import ClientStream, delta_seqs, evaluate, token_faults
from bench.chaos.schedule import KINDS, plan
from pipeline.core.pricing import ModelPrice, PriceTable

PRICES = PriceTable(
    {"m": ModelPrice(Decimal("1"), Decimal("5"))}, ModelPrice(Decimal(0), Decimal(0))
)


def test_a_seed_replays_the_same_schedule_of_every_fault_inside_the_load() -> None:
    faults = plan(seed=7, duration_s=300, session_timeout_s=10)
    assert faults == plan(seed=7, duration_s=300, session_timeout_s=10)
    assert faults != plan(seed=8, duration_s=300, session_timeout_s=10)
    assert sorted(f.kind for f in faults) == sorted(KINDS)
    assert [f.at_s for f in faults] == sorted(f.at_s for f in faults)
    assert all(30 <= f.at_s <= 225 for f in faults)
    stop = next(f for f in faults if f.kind == "stop-worker")
    assert stop.hold_s > 10  # beyond the session timeout: the group must move its partitions
    assert len(plan(seed=7, duration_s=300, session_timeout_s=10, rounds=2)) == 2 * len(KINDS)


def test_token_faults_count_missing_and_duplicated_seqs() -> None:
    assert token_faults(ClientStream("u", seqs=[1, 2, 3, 4])) == (0, 0)
    assert token_faults(ClientStream("u", seqs=[1, 2, 2, 3, 5])) == (1, 1)


def result(request_id: str, user: str, status: str, cost: int) -> dict[str, Any]:
    usage = {"input_tokens": 0, "output_tokens": 0, "attempts": 1, "cost_micro_usd": cost}
    return {
        "request_id": request_id,
        "user_id": user,
        "status": status,
        "model": "m",
        "usage": usage,
    }


def served(*attempts: tuple[int, int]) -> dict[str, Any]:
    return {"streams": [{"model": "m", "input_tokens": i, "tokens": o} for i, o in attempts]}


def test_a_clean_run_is_exact_and_its_last_line_says_so() -> None:
    streams = [
        ClientStream(
            "ann", "a", 200, seqs=[1, 2], text="x y", done={"status": "COMPLETED", "summary": "x y"}
        ),
        ClientStream("ann", None, 429),  # refused: never billed
    ]
    # "a": two attempts (a resume), priced once on their sums: (10+5)*1 + (2+1)*5 = 30.
    verdict = evaluate(
        streams,
        produced=["b"],
        results={"a": result("a", "ann", "COMPLETED", 30), "b": result("b", "ops", "CANCELLED", 5)},
        sim_requests={"a": served((10, 2), (5, 1)), "b": served((5, 0))},
        prices=PRICES,
        dlq=[{"origin_partition": 1, "origin_offset": 9}],
        poison={(1, 9)},
        usage_by_gateway={"g0": {"ann": 30, "ops": 5}, "g1": {"ann": 30, "ops": 5}},
    )
    assert verdict.ok, verdict
    assert verdict.last_line() == (
        "chaos: 2 accepted, 1 completed, 0 lost, 0 duplicated tokens, billing exact"
    )


def test_every_broken_promise_is_counted() -> None:
    streams = [
        ClientStream(
            "ann",
            "a",
            200,
            seqs=[1, 1, 2],
            text="x x y",
            done={"status": "COMPLETED", "summary": "x y"},
        ),
        ClientStream("ann", "lost", 200),
    ]
    verdict = evaluate(
        streams,
        produced=[],
        results={
            "a": result("a", "ann", "COMPLETED", 31),
            "ghost": result("ghost", "ann", "COMPLETED", 1),
        },
        sim_requests={"a": served((10, 2), (5, 1))},
        prices=PRICES,
        dlq=[{"origin_partition": 0, "origin_offset": 1}],
        poison=set(),
        usage_by_gateway={"g0": {"ann": 32}, "g1": {"ann": 31}},
    )
    assert not verdict.ok
    assert verdict.lost == ["lost"]
    assert verdict.duplicated_tokens == 1 and verdict.text_mismatches == ["a"]
    assert verdict.billing_diff == 2  # 31 + 1 billed, 30 served
    # Per request billed differently: served tokens against the result's (0 in, 0 out here).
    detail = {d["request_id"]: d for d in verdict.billing_detail}
    assert (detail["a"]["unbilled_input_tokens"], detail["a"]["unbilled_output_tokens"]) == (15, 3)
    assert verdict.billed_unaccepted == ["ghost"]
    assert verdict.ledger_disagreements == ["g1: ann ledger 31 != results 32"]
    assert verdict.unexpected_dlq == 1
    assert verdict.last_line().endswith("1 lost, 1 duplicated tokens, billing off by 2 micro-USD")


def test_missing_tokens_are_the_written_deltas_a_finished_client_never_received() -> None:
    written = delta_seqs(
        [
            {"request_id": "a", "kind": "STARTED", "seq": 0},
            {"request_id": "a", "kind": "DELTA", "seq": 3, "first_seq": 1},
            {"request_id": "a", "kind": "STARTED", "seq": 4},  # a resumed attempt
            {"request_id": "a", "kind": "DELTA", "seq": 5, "first_seq": 0},
            {"request_id": "a", "kind": "DELTA", "seq": 7, "first_seq": 6},
        ]
    )
    assert written == {"a": {1, 2, 3, 5, 6, 7}}
    assert token_faults(ClientStream("u", seqs=[1, 2, 3, 5, 6, 7]), written["a"]) == (0, 0)
    assert token_faults(ClientStream("u", seqs=[1, 2, 3, 3, 7]), written["a"]) == (2, 1)
