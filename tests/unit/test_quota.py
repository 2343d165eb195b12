"""The quota verdict function (pipeline/quota/state.py QuotaState), without Kafka."""

from __future__ import annotations

import copy
import itertools
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.admission.quota import quota_refusal
from gateway.http.errors import BudgetExceeded, RateLimited
from pipeline.core.codec import codec
from pipeline.core.tiers import Tier
from pipeline.quota.state import (
    QuotaEvent,
    QuotaState,
    Verdict,
    evaluate,
    month_start_ms,
    next_month_start_ms,
)

W = 60_000
T0 = int(datetime(2025, 3, 10, 12, 0, tzinfo=UTC).timestamp() * 1000)
_ids = itertools.count()


def tier(rpm: int = 3, tpm: int = 1_000, budget_usd: float = 1.0, name: str = "t") -> Tier:
    return Tier(
        name=name,
        rpm=rpm,
        tpm=tpm,
        max_input_tokens=1_000,
        max_output_tokens=100,
        weight=1,
        monthly_budget_usd=budget_usd,
        max_queue_wait_s=30.0,
        on_input_too_large="reject",
    )


TIERS = {"t": tier()}


def ev(kind: str, at: int, request_id: str, user: str = "u", **figures: int) -> QuotaEvent:
    return QuotaEvent(
        event_id=f"e{next(_ids)}",
        user_id=user,
        kind=kind,  # type: ignore[arg-type]
        request_id=request_id,
        at=at,
        tier="t",
        **figures,  # type: ignore[arg-type]
    )


def reserve(
    state: QuotaState, at: int, request_id: str, tokens: int = 100, user: str = "u"
) -> Verdict:
    verdict = state.apply(ev("RESERVE", at, request_id, user, tokens=tokens))
    assert verdict is not None
    return verdict


def test_requests_per_minute_and_retry_after() -> None:
    state = QuotaState(TIERS)
    assert [reserve(state, T0 + i * 1000, f"r{i}").granted for i in range(3)] == [True] * 3
    refused = reserve(state, T0 + 10_000, "r3")
    assert refused == Verdict(False, "rate_limit", 50.0, 0, 700)
    # The oldest grant leaves the window exactly 60 s after it was made.
    assert not reserve(state, T0 + W - 1, "r4").granted
    assert reserve(state, T0 + W, "r5").granted


def test_tokens_per_minute_counts_reservations_and_says_when_they_free() -> None:
    state = QuotaState(TIERS)
    assert reserve(state, T0, "a", tokens=600).granted
    assert reserve(state, T0 + 5_000, "b", tokens=300).granted
    refused = reserve(state, T0 + 6_000, "c", tokens=200)
    assert refused.reason == "token_limit"
    assert refused.retry_after_s == 54.0  # "a" leaves the window at T0 + 60 s
    assert refused.remaining_tokens == 100
    # Freeing 100 is not enough while "a" (600) is there; after it leaves, 200 fit.
    assert reserve(state, T0 + W, "c", tokens=200).granted


def test_retry_after_waits_for_both_limits() -> None:
    state = QuotaState({"t": tier(rpm=2, tpm=1_000)})
    reserve(state, T0, "a", tokens=100)
    reserve(state, T0 + 20_000, "b", tokens=800)
    refused = reserve(state, T0 + 30_000, "c", tokens=500)
    assert refused.reason == "rate_limit"
    # One request frees at T0+60 s, but 500 tokens only when "b" leaves at T0+80 s.
    assert refused.retry_after_s == 50.0


def test_settle_replaces_the_reservation_by_the_real_figure() -> None:
    state = QuotaState(TIERS)
    reserve(state, T0, "a", tokens=900)
    assert not reserve(state, T0 + 1_000, "b", tokens=200).granted
    state.apply(ev("SETTLE", T0 + 2_000, "a", tokens=250, cost_micro_usd=40))
    assert reserve(state, T0 + 3_000, "b", tokens=700).granted
    usage = state.usage("u", "t", T0 + 3_000)
    assert (usage.requests, usage.tokens, usage.cost_micro_usd) == (2, 250, 40)
    assert usage.window_tokens == 950
    assert usage.window_requests == 2


def test_release_gives_back_the_request_and_its_tokens() -> None:
    state = QuotaState({"t": tier(rpm=1)})
    reserve(state, T0, "a", tokens=900)
    state.apply(ev("RELEASE", T0 + 1, "a", requests=0))
    assert reserve(state, T0 + 2, "b", tokens=900).granted
    assert state.usage("u", None, T0 + 2).requests == 1
    # A release after the settle changes nothing: the request ran.
    state.apply(ev("SETTLE", T0 + 3, "b", tokens=10))
    state.apply(ev("RELEASE", T0 + 4, "b", requests=0))
    assert state.usage("u", None, T0 + 4).window_tokens == 10
    assert not reserve(state, T0 + 5, "c", tokens=1).granted


def test_unsettled_reservation_counts_until_the_window_passes() -> None:
    state = QuotaState({"t": tier(rpm=10)})
    reserve(state, T0, "a", tokens=1_000)
    assert reserve(state, T0 + W - 1, "b", tokens=1).reason == "token_limit"
    assert reserve(state, T0 + W, "b", tokens=1_000).granted


def test_budget_refusal_has_its_own_reason_and_waits_for_next_month() -> None:
    state = QuotaState({"t": tier(rpm=100, budget_usd=0.001)})  # 1000 micro-USD
    reserve(state, T0, "a")
    state.apply(ev("SETTLE", T0 + 1, "a", tokens=50, cost_micro_usd=999))
    assert reserve(state, T0 + 2, "b").granted  # 999 < 1000: still allowed
    state.apply(ev("SETTLE", T0 + 3, "b", tokens=50, cost_micro_usd=1))
    refused = reserve(state, T0 + 4, "c")
    assert refused.reason == "budget"
    assert refused.retry_after_s == (next_month_start_ms(T0) - (T0 + 4)) / 1000
    usage = state.usage("u", "t", T0 + 5)
    assert (usage.budget_micro_usd, usage.cost_micro_usd, usage.remaining_micro_usd) == (
        1000,
        1000,
        0,
    )
    error = quota_refusal(refused)
    assert isinstance(error, BudgetExceeded)
    assert error.status == 429


def test_each_month_starts_empty() -> None:
    state = QuotaState({"t": tier(rpm=1, budget_usd=0.0)})
    end = next_month_start_ms(T0)
    assert reserve(state, end - 1_000, "a").reason == "budget"
    fresh = QuotaState({"t": tier(rpm=1, budget_usd=1.0)})
    reserve(fresh, end - 1_000, "a")
    fresh.apply(ev("SETTLE", end - 500, "a", tokens=5, cost_micro_usd=7))
    assert not reserve(fresh, end - 1, "b").granted
    # First record of the new month: the window and the month's cost start over.
    assert reserve(fresh, end, "c").granted
    assert fresh.usage("u", "t", end).cost_micro_usd == 0
    assert fresh.usage("u", "t", end).requests == 1


def test_usage_after_the_month_ended_without_records_is_zero() -> None:
    state = QuotaState(TIERS)
    reserve(state, T0, "a")
    later = next_month_start_ms(T0) + 5
    usage = state.usage("u", "t", later)
    assert usage.requests == 0
    assert usage.period_start_ms == month_start_ms(later)


def test_time_never_goes_backwards_within_a_partition() -> None:
    state = QuotaState({"t": tier(rpm=1)})
    reserve(state, T0 + 30_000, "a")
    # A record stamped earlier is evaluated at the partition's latest time.
    refused = reserve(state, T0, "b")
    assert refused.retry_after_s == 60.0


def test_settle_without_reservation_counts_tokens_and_cost() -> None:
    state = QuotaState(TIERS)
    state.apply(ev("SETTLE", T0, "external", tokens=900, cost_micro_usd=5))
    assert reserve(state, T0 + 1, "a", tokens=200).reason == "token_limit"
    assert reserve(state, T0 + 2, "a", tokens=100).granted
    # A second SETTLE of the same request replaces the first.
    state.apply(ev("SETTLE", T0 + 3, "external", tokens=100, cost_micro_usd=6))
    usage = state.usage("u", "t", T0 + 3)
    assert (usage.tokens, usage.cost_micro_usd, usage.requests) == (100, 6, 1)
    assert usage.window_requests == 1


def test_same_request_reserved_twice_is_one_reservation() -> None:
    state = QuotaState({"t": tier(rpm=1)})
    assert reserve(state, T0, "a").granted
    assert reserve(state, T0 + 1, "a").granted
    assert state.usage("u", "t", T0 + 1).requests == 1


def test_users_are_independent_and_unknown_tiers_are_refused() -> None:
    state = QuotaState({"t": tier(rpm=1)})
    assert reserve(state, T0, "a", user="x").granted
    assert reserve(state, T0, "b", user="y").granted
    unknown = state.apply(
        QuotaEvent(event_id="z", user_id="x", kind="RESERVE", request_id="c", at=T0, tier="gold")
    )
    assert unknown is not None and unknown.reason == "rate_limit"


def test_refusal_maps_to_rate_limited_with_retry_after() -> None:
    error = quota_refusal(Verdict(False, "token_limit", 12.5))
    assert isinstance(error, RateLimited)
    assert error.retry_after_s == 12.5
    assert error.extra == {"limit": "token_limit"}
    assert quota_refusal(Verdict(True)) is None


def test_unknown_kind_is_ignored() -> None:
    state = QuotaState({"t": tier(rpm=1)})
    state.apply(ev("UNKNOWN", T0, "x", tokens=10_000))
    assert reserve(state, T0 + 1, "a").granted


def test_event_round_trips_through_the_codec() -> None:
    event = ev("SETTLE", T0, "r", tokens=5, input_tokens=3, output_tokens=2, cost_micro_usd=9)
    record = codec().decode_as(codec().encode("QuotaEvent", event.to_record()), "QuotaEvent")
    assert QuotaEvent.from_record(record) == event
    assert QuotaEvent.from_record(record, at=T0 + 7).at == T0 + 7


# -- properties ---------------------------------------------------------------------------------

operations = st.lists(
    st.tuples(
        st.sampled_from(["RESERVE", "RESERVE", "RESERVE", "SETTLE", "RELEASE"]),
        st.integers(0, 20_000),  # ms since the previous record
        st.integers(0, 400),  # tokens
        st.integers(0, 7),  # request number (settle/release refer back to one)
    ),
    max_size=80,
)


def _events(ops: list[tuple[str, int, int, int]]) -> list[QuotaEvent]:
    at, out = T0, []
    for i, (kind, gap, tokens, ref) in enumerate(ops):
        at += gap
        request_id = f"r{i}" if kind == "RESERVE" else f"r{ref}"
        out.append(ev(kind, at, request_id, tokens=tokens, requests=0 if kind == "RELEASE" else 1))
    return out


@settings(max_examples=200, deadline=None)
@given(operations)
def test_no_window_ever_holds_more_than_the_limits(ops: list[tuple[str, int, int, int]]) -> None:
    """When a RESERVE is granted, the grants of the last 60 s not released are within rpm."""
    events = _events(ops)
    verdicts = evaluate(events, TIERS)
    assert verdicts == evaluate(events, TIERS)  # deterministic
    for i, grant in enumerate(events):
        if grant.kind != "RESERVE" or not verdicts[grant.event_id].granted:
            continue
        released = {e.request_id for e in events[:i] if e.kind == "RELEASE"}
        in_window = {
            e.request_id
            for e in events[: i + 1]
            if e.kind == "RESERVE"
            and verdicts[e.event_id].granted
            and grant.at - W < e.at <= grant.at
            and (e.request_id not in released or e.request_id == grant.request_id)
        }
        assert len(in_window) <= 3


@settings(max_examples=200, deadline=None)
@given(operations, st.integers(1, 400))
def test_retry_after_is_exact(ops: list[tuple[str, int, int, int]], tokens: int) -> None:
    """A refused RESERVE fits exactly retry_after later, and not 1 ms before."""
    state = QuotaState(TIERS)
    events = _events(ops)
    for event in events:
        state.apply(event)
    at = events[-1].at if events else T0
    probe = ev("RESERVE", at, "probe", tokens=tokens)
    verdict = _peek(state, probe)
    if verdict.granted or verdict.reason == "budget":
        return
    assert verdict.retry_after_s is not None and verdict.retry_after_s > 0
    later = at + round(verdict.retry_after_s * 1000)
    assert _peek(state, ev("RESERVE", later, "probe", tokens=tokens)).granted
    assert not _peek(state, ev("RESERVE", later - 1, "probe", tokens=tokens)).granted


def _peek(state: QuotaState, event: QuotaEvent) -> Verdict:
    """The verdict ``event`` would get, leaving ``state`` as it was."""
    verdict = copy.deepcopy(state).apply(event)
    assert verdict is not None
    return verdict


def _reference(events: list[QuotaEvent], rpm: int, tpm: int) -> dict[str, bool]:
    """The rules of the module docstring, written plainly: every window recomputed from all."""
    entries: list[dict[str, int | str]] = []
    by_request: dict[str, dict[str, int | str]] = {}
    granted: dict[str, bool] = {}
    last = 0
    for e in events:
        t = last = max(e.at, last)
        live = [x for x in entries if int(x["at"]) > t - W and x["state"] != "released"]
        current = by_request.get(e.request_id)
        if e.kind == "RESERVE":
            if current is not None and current["state"] in ("reserved", "settled"):
                granted[e.event_id] = True
                continue
            requests = sum(int(x["requests"]) for x in live if x["state"] != "unreserved")
            tokens = sum(int(x["tokens"]) for x in live)
            granted[e.event_id] = requests + 1 <= rpm and tokens + e.tokens <= tpm
            if granted[e.event_id]:
                entry: dict[str, int | str] = {
                    "at": t,
                    "requests": 1,
                    "tokens": e.tokens,
                    "state": "reserved",
                }
                entries.append(entry)
                by_request[e.request_id] = entry
        elif e.kind == "SETTLE":
            if current is None:
                current = {"at": t, "requests": 0, "tokens": 0, "state": "unreserved"}
                entries.append(current)
                by_request[e.request_id] = current
            current["tokens"] = e.tokens
            if current["state"] != "unreserved":
                current["state"] = "settled"
        elif e.kind == "RELEASE" and current is not None and current["state"] == "reserved":
            current["state"] = "released"
    return granted


@settings(max_examples=200, deadline=None)
@given(operations)
def test_verdicts_match_the_plain_reference(ops: list[tuple[str, int, int, int]]) -> None:
    events = _events(ops)
    verdicts = evaluate(events, TIERS)
    assert {k: v.granted for k, v in verdicts.items()} == _reference(events, 3, 1_000)


def reserve_keyed(
    state: QuotaState, at: int, request_id: str, key: str, body: str = "b1", user: str = "u"
) -> Verdict:
    event = ev("RESERVE", at, request_id, user, tokens=100)
    verdict = state.apply(
        QuotaEvent(**{**event.to_record(), "idempotency_key": key, "body_sha256": body})
    )
    assert verdict is not None
    return verdict


def test_a_second_reserve_of_a_held_key_is_a_duplicate_naming_the_first_and_counts_nothing() -> (
    None
):
    state = QuotaState(TIERS)
    assert reserve_keyed(state, T0, "a", "k1").granted
    second = reserve_keyed(state, T0 + 1, "b", "k1", body="b2")
    assert second == Verdict(False, "duplicate", duplicate_of="a", duplicate_body="b1")
    # The duplicate took nothing: two more requests fit the tier's 3 per minute.
    assert reserve(state, T0 + 2, "c").granted
    assert reserve(state, T0 + 3, "d").granted
    # The holder retrying its own RESERVE is still granted (a writer's retry).
    assert reserve_keyed(state, T0 + 4, "a", "k1").granted


def test_a_duplicate_is_answered_even_when_the_limits_would_refuse() -> None:
    state = QuotaState({"t": tier(rpm=1)})
    assert reserve_keyed(state, T0, "a", "k1").granted
    assert reserve_keyed(state, T0 + 1, "b", "k1").reason == "duplicate"
    assert reserve_keyed(state, T0 + 2, "c", "k2").reason == "rate_limit"


def test_keys_are_per_user_and_a_released_or_refused_reserve_holds_none() -> None:
    state = QuotaState({"t": tier(rpm=2)})
    assert reserve_keyed(state, T0, "a", "k1").granted
    assert reserve_keyed(state, T0 + 1, "b", "k1", user="v").granted  # another user's key
    state.apply(ev("RELEASE", T0 + 2, "a", requests=0))
    assert reserve_keyed(state, T0 + 3, "c", "k1").granted  # "a" never ran: free again
    assert reserve_keyed(state, T0 + 4, "d", "k2").granted
    assert reserve_keyed(state, T0 + 5, "e", "k3").reason == "rate_limit"
    assert reserve_keyed(state, T0 + W + 5, "f", "k3").granted  # the refused "e" held nothing


def test_a_key_is_held_until_the_horizon_passes() -> None:
    state = QuotaState(TIERS, horizon_ms=10 * W)
    assert reserve_keyed(state, T0, "a", "k1").granted
    state.apply(ev("SETTLE", T0 + 1_000, "a", tokens=50, cost_micro_usd=1))
    assert reserve_keyed(state, T0 + 10 * W - 1, "b", "k1").duplicate_of == "a"
    assert reserve_keyed(state, T0 + 10 * W, "c", "k1").granted


def test_the_key_and_body_travel_in_the_quota_record() -> None:
    event = QuotaEvent(
        **{**ev("RESERVE", T0, "a").to_record(), "idempotency_key": "k", "body_sha256": "h"}
    )
    decoded = codec().decode_as(codec().encode("QuotaEvent", event.to_record()), "QuotaEvent")
    assert QuotaEvent.from_record(decoded) == event
