"""Admission (gateway/admission/controller.py) without Kafka: the ledger is the real verdict."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.admission.backpressure import QueueWaitEstimator
from gateway.admission.controller import (
    INFLIGHT_EXPIRY_S,
    Admission,
    Admitted,
    Degradation,
    prompt_overhead_tokens,
)
from gateway.admission.quota import KeyHeld, QuotaUnavailable
from gateway.http.errors import BudgetExceeded, Overloaded, RateLimited
from pipeline.core.tiers import Tier
from pipeline.quota.state import QuotaEvent, QuotaState, Verdict

FREE = Tier("free", 3, 1_000, 8_000, 300, 1, 1.0, 30.0, "reject")
TIERS = {"free": FREE}
T0_MS = 1_741_600_000_000


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class StateLedger:
    """QuotaState fed directly, as one partition of the `quota` log would feed it."""

    def __init__(self) -> None:
        self.state = QuotaState(TIERS)
        self.ids = itertools.count()
        self.at = T0_MS
        self.reserved: list[tuple[str, int]] = []
        self.released: list[str] = []
        self.fail_release = False

    def _event(self, kind: str, user: str, tier: str, request_id: str, **kw: int) -> QuotaEvent:
        self.at += 1
        return QuotaEvent(
            event_id=f"e{next(self.ids)}",
            user_id=user,
            kind=kind,  # type: ignore[arg-type]
            request_id=request_id,
            at=self.at,
            tier=tier,
            **kw,  # type: ignore[arg-type]
        )

    async def reserve(
        self,
        user_id: str,
        tier: str,
        request_id: str,
        tokens: int,
        *,
        idempotency_key: str | None = None,
        body_sha256: str | None = None,
    ) -> Verdict:
        self.reserved.append((request_id, tokens))
        event = self._event("RESERVE", user_id, tier, request_id, tokens=tokens)
        event = dataclasses.replace(event, idempotency_key=idempotency_key, body_sha256=body_sha256)
        verdict = self.state.apply(event)
        assert verdict is not None
        return verdict

    async def release(self, user_id: str, tier: str, request_id: str) -> None:
        if self.fail_release:
            raise QuotaUnavailable("broker gone")
        self.released.append(request_id)
        self.state.apply(self._event("RELEASE", user_id, tier, request_id, requests=0))

    def settle(self, user_id: str, request_id: str, tokens: int, cost: int) -> None:
        event = self._event(
            "SETTLE", user_id, "free", request_id, tokens=tokens, cost_micro_usd=cost
        )
        self.state.apply(event)


def admission(
    *,
    queued: int = 0,
    degradation: Degradation | None = None,
    max_inflight: int = 100,
    sampled: bool = True,
    clock: Clock | None = None,
) -> tuple[Admission, StateLedger, QueueWaitEstimator]:
    clock = clock or Clock()
    estimator = QueueWaitEstimator(
        min_rate_per_s=1.0,
        degrade_policy="degrade" if degradation else None,
        degrade_ratio=0.5,
    )
    if sampled:
        # `queued` requests ahead at one completion a second: a wait of `queued` seconds.
        estimator.update({"preprocess": queued}, 1.0, clock.now)
    ledger = StateLedger()
    adm = Admission(
        TIERS,
        estimator,
        ledger,
        max_inflight=max_inflight,
        degradation=degradation,
        clock=clock,
    )
    return adm, ledger, estimator


_rid = itertools.count()


async def admit(
    adm: Admission, user: str = "u", tokens: int = 100, model: str | None = None
) -> Admitted:
    return await adm.admit(
        user,
        "free",
        f"r{next(_rid)}",
        input_tokens=tokens - 50,
        max_output_tokens=50,
        model=model,
    )


async def test_admitted_requests_reserve_input_plus_output_and_carry_the_queue_figures() -> None:
    adm, ledger, _ = admission(queued=4)
    admitted = await admit(adm, tokens=300)
    assert ledger.reserved == [(admitted.request_id, 300)]
    assert admitted.reserved_tokens == 300
    assert admitted.queue_position == 5  # four ahead
    assert admitted.estimated_wait_s == pytest.approx(4.0)
    assert admitted.degraded is None and admitted.max_output_tokens == 50


async def test_a_key_the_ledger_holds_for_another_request_is_answered_as_key_held() -> None:
    adm, _, _ = admission()

    async def keyed(request_id: str, body: str) -> Admitted:
        return await adm.admit(
            "u",
            "free",
            request_id,
            input_tokens=50,
            max_output_tokens=50,
            model=None,
            idempotency_key="k1",
            body_sha256=body,
        )

    await keyed("first", "h1")
    with pytest.raises(KeyHeld) as caught:
        await keyed("second", "h2")
    assert (caught.value.request_id, caught.value.body_sha256) == ("first", "h1")
    assert adm.inflight == 1  # the duplicate holds no slot


async def test_requests_per_minute_are_refused_by_the_ledger_with_retry_after() -> None:
    adm, _, _ = admission()
    for _ in range(3):
        await admit(adm)
    with pytest.raises(RateLimited) as caught:
        await admit(adm)
    assert caught.value.status == 429
    assert caught.value.retry_after_s is not None and caught.value.retry_after_s > 0
    await admit(adm, user="someone-else")  # limits are per user


async def test_tokens_per_minute_count_reservations_until_settled() -> None:
    adm, ledger, _ = admission()
    first = await admit(adm, tokens=900)
    with pytest.raises(RateLimited) as caught:
        await admit(adm, tokens=200)  # 900 reserved of 1000/min
    assert caught.value.extra == {"limit": "token_limit"}
    ledger.settle("u", first.request_id, tokens=100, cost=1)  # it really used 100
    await admit(adm, tokens=200)


async def test_a_request_above_the_tiers_minute_is_never_admitted_nor_reserved() -> None:
    adm, ledger, _ = admission()
    with pytest.raises(RateLimited) as caught:
        await admit(adm, tokens=5_000)
    assert not caught.value.retriable
    assert ledger.reserved == []


async def test_a_spent_budget_is_its_own_429() -> None:
    adm, ledger, _ = admission()
    first = await admit(adm)
    ledger.settle("u", first.request_id, tokens=100, cost=FREE.monthly_budget_micro_usd)
    with pytest.raises(BudgetExceeded) as caught:
        await admit(adm)
    assert (caught.value.status, caught.value.code) == (429, "budget_exceeded")
    assert caught.value.retry_after_s is not None and caught.value.retry_after_s > 0


async def test_a_long_queue_sheds_with_503_before_anything_is_reserved() -> None:
    adm, ledger, _ = admission(queued=45)  # 45 s estimated; the tier allows 30 s
    with pytest.raises(Overloaded) as caught:
        await admit(adm)
    assert caught.value.status == 503
    assert caught.value.retry_after_s == pytest.approx(15.0)  # the excess over the limit
    assert ledger.reserved == []


async def test_without_lag_figures_admission_fails_open() -> None:
    adm, ledger, _ = admission(sampled=False)
    await admit(adm)
    assert len(ledger.reserved) == 1


async def test_above_the_lower_threshold_the_request_is_degraded() -> None:
    cheaper = Degradation(model="cheap-model", output_ratio=0.5)
    adm, ledger, _ = admission(queued=20, degradation=cheaper)  # 20 s: above 0.5 x 30 s
    admitted = await admit(adm, tokens=100, model="big-model")
    assert admitted.model == "cheap-model"
    assert admitted.max_output_tokens == 25
    assert admitted.degraded == "model:cheap-model,max_output_tokens:25"
    assert ledger.reserved[-1] == (admitted.request_id, 75)  # the shorter output is reserved
    calm, _, _ = admission(queued=5, degradation=cheaper)
    plain = await admit(calm, model="big-model")
    assert (plain.model, plain.degraded) == ("big-model", None)


async def test_no_degradation_configured_means_admit_up_to_the_limit() -> None:
    adm, _, _ = admission(queued=20)
    admitted = await admit(adm, model="big-model")
    assert (admitted.model, admitted.degraded) == ("big-model", None)


@given(
    st.one_of(st.none(), st.sampled_from(["a", "b"])),
    st.one_of(st.none(), st.floats(0.01, 0.99)),
    st.one_of(st.none(), st.sampled_from(["a", "b"])),
    st.integers(1, 10_000),
)
def test_degradation_never_grows_a_request(
    to_model: str | None, ratio: float | None, model: str | None, max_output: int
) -> None:
    out_model, out_max, label = Degradation(to_model, ratio).apply(FREE, model, max_output)
    assert 1 <= out_max <= max_output
    assert out_model == (to_model or model)
    # The label names exactly what changed.
    assert ("model:" in label) == (to_model is not None and to_model != model)
    assert ("max_output_tokens:" in label) == (out_max < max_output)


def test_degradation_skips_a_model_the_tier_does_not_list() -> None:
    listed = Tier("free", 3, 1_000, 8_000, 300, 1, 1.0, 30.0, "reject", ("small", "medium"))
    degrade = Degradation("tiny", 0.5)
    assert degrade.apply(listed, "medium", 100) == ("medium", 50, "max_output_tokens:50")
    assert Degradation("tiny").apply(listed, "medium", 100) == ("medium", 100, "")
    assert Degradation("small").apply(listed, "medium", 100) == ("small", 100, "model:small")


async def test_in_flight_bound_frees_on_result_or_after_expiry() -> None:
    clock = Clock()
    adm, _, estimator = admission(max_inflight=2, clock=clock)
    first = await admit(adm, user="a")
    adm.accepted(first)
    adm.accepted(await admit(adm, user="b"))
    assert estimator.queue_position() == 3  # both count before the next lag sample
    with pytest.raises(Overloaded):
        await admit(adm, user="c")
    adm.finished(first.request_id)
    adm.accepted(await admit(adm, user="c"))
    clock.now += INFLIGHT_EXPIRY_S + 1
    assert adm.inflight == 0


async def test_release_gives_the_reservation_back_and_survives_a_dead_ledger() -> None:
    adm, ledger, _ = admission()
    admitted = await admit(adm, tokens=900)
    await adm.release(admitted)
    assert ledger.released == [admitted.request_id]
    held = await admit(adm, tokens=900)  # the 900 tokens are free again
    ledger.fail_release = True
    await adm.release(held)  # logged, not raised: the reservation expires with its window


def test_the_reservation_covers_the_prompt_around_the_document() -> None:
    # The system prompt and the default instructions are billed input tokens too.
    assert prompt_overhead_tokens(None, 300) > 20
    longer = prompt_overhead_tokens("Summarize in three bullet points for an executive.", 300)
    assert longer > prompt_overhead_tokens("Short.", 300)


PRO = Tier("pro", 1_000, 100_000, 8_000, 300, 4, 100.0, 30.0, "truncate")
FREE_WIDE = Tier("free", 1_000, 100_000, 8_000, 300, 1, 100.0, 30.0, "reject")


def fair_admission(*, max_inflight: int = 1_000, share: float = 1.0) -> Admission:
    """No queue at the last sample, one completion a second, tiers of weight 1 and 4."""
    estimator = QueueWaitEstimator(min_rate_per_s=1.0)
    estimator.update({"preprocess": 0}, 1.0, 100.0)
    ledger = StateLedger()
    ledger.state = QuotaState({"free": FREE_WIDE, "pro": PRO})
    return Admission(
        {"free": FREE_WIDE, "pro": PRO},
        estimator,
        ledger,
        max_inflight=max_inflight,
        user_inflight_share=share,
        clock=Clock(),
    )


async def accept(adm: Admission, user: str, tier: str = "free") -> Admitted:
    admitted = await adm.admit(
        user, tier, f"r{next(_rid)}", input_tokens=50, max_output_tokens=50, model=None
    )
    adm.accepted(admitted)
    return admitted


async def test_a_user_is_shed_on_its_own_queue_and_another_on_the_queue_ahead_of_it() -> None:
    adm = fair_admission()
    heavy: list[Admitted] = []
    with pytest.raises(Overloaded):
        while True:  # the heavy user fills the queue up to its tier's 30 s
            heavy.append(await accept(adm, "heavy"))
    assert len(heavy) == 31  # waits of 0 .. 30 s are within the limit
    light = await accept(adm, "light")
    # Equal weights: one heavy request starts before the light one, the rest after it.
    assert light.estimated_wait_s == pytest.approx(1.0)
    assert light.queue_position == 2
    with pytest.raises(Overloaded):
        await accept(adm, "heavy")  # still shed on its own queue


async def test_the_queue_ahead_follows_the_tier_weights() -> None:
    adm = fair_admission()
    for _ in range(20):
        await accept(adm, "heavy", "pro")  # weight 4
    light = await accept(adm, "light", "free")  # weight 1: four pro starts per free start
    assert light.estimated_wait_s == pytest.approx(4.0)
    assert adm.behind("light", 1) == pytest.approx(20 - 2 * 4)  # its second request


async def test_a_burst_that_ended_since_the_last_sample_sheds_nobody_else() -> None:
    adm = fair_admission()
    estimator = adm.estimator
    burst = [await accept(adm, "heavy") for _ in range(31)]
    # The sample still shows the burst queued (and smoothed), then it is cancelled.
    estimator.update({"preprocess": 31}, 0.5, 105.0)
    assert estimator.estimate_s() > 30
    for admitted in burst:
        adm.finished(admitted.request_id)
    assert estimator.queued_now() == 0
    light = await accept(adm, "light")
    assert light.estimated_wait_s == pytest.approx(0.0)


async def test_one_user_may_hold_only_its_share_of_the_in_flight_bound() -> None:
    adm = fair_admission(max_inflight=8, share=0.25)
    assert adm.max_user_inflight == 2
    first = await accept(adm, "heavy")
    await accept(adm, "heavy")
    with pytest.raises(RateLimited) as refused:
        await accept(adm, "heavy")
    assert refused.value.extra == {"limit": "inflight"}
    assert refused.value.retriable and refused.value.retry_after_s == 1.0
    await accept(adm, "other")  # others are not held by it
    adm.finished(first.request_id)
    await accept(adm, "heavy")  # a result frees the slot


async def test_a_request_counts_for_its_user_from_admission_until_released() -> None:
    adm = fair_admission(max_inflight=8, share=0.25)
    admitted = await adm.admit(
        "heavy", "free", f"r{next(_rid)}", input_tokens=50, max_output_tokens=50, model=None
    )
    # Not yet in the log (the produce is under way): it counts, so a burst sees itself.
    await accept(adm, "heavy")
    with pytest.raises(RateLimited):
        await accept(adm, "heavy")
    await adm.release(admitted)  # the produce failed
    await accept(adm, "heavy")
    assert adm.inflight == 2


@given(st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from(["free", "pro"])), max_size=40))
async def test_the_wait_ahead_of_a_new_user_never_exceeds_the_whole_queue(
    arrivals: list[tuple[str, str]],
) -> None:
    adm = fair_admission()
    for user, tier in arrivals:
        with contextlib.suppress(Overloaded):
            await accept(adm, user, tier)
    whole = adm.estimator.estimate_s()
    newcomer = await accept(adm, "newcomer")
    assert 0.0 <= newcomer.estimated_wait_s <= round(whole, 3)
