"""Settling a result into the ledger (gateway/admission/settle.py), without Kafka."""

from __future__ import annotations

from typing import Any

from gateway.admission.settle import settle_result


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def settle(
        self,
        user_id: str,
        tier: str,
        request_id: str,
        actual_tokens: int,
        cost_micro_usd: int,
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> None:
        self.calls.append(
            (user_id, tier, request_id, actual_tokens, cost_micro_usd, input_tokens, output_tokens)
        )


def result(**fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "request_id": "r1",
        "user_id": "u",
        "tier": "pro",
        "usage": {"input_tokens": 120, "output_tokens": 30, "attempts": 2, "cost_micro_usd": 270},
    }
    record.update(fields)
    return record


async def test_a_result_settles_its_real_tokens_and_cost() -> None:
    ledger = Recorder()
    assert await settle_result(ledger, result())
    assert ledger.calls == [("u", "pro", "r1", 150, 270, 120, 30)]


async def test_a_cancelled_request_settles_what_it_used_and_a_rejected_one_nothing() -> None:
    ledger = Recorder()
    await settle_result(ledger, result(request_id="c", usage={"input_tokens": 5}))
    await settle_result(ledger, result(request_id="x", usage=None))
    assert ledger.calls == [("u", "pro", "c", 5, 0, 5, 0), ("u", "pro", "x", 0, 0, 0, 0)]


async def test_a_result_without_a_user_or_of_a_replay_bills_nobody() -> None:
    ledger = Recorder()
    assert not await settle_result(ledger, result(user_id=""))
    assert not await settle_result(ledger, result(replay_of="r0", source="replay"))
    assert ledger.calls == []
