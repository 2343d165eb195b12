"""The accounting after a chaos run, from what the clients saw, the topics and the simulator's
own records: nothing lost, no missing or duplicated token, billing exact to the micro-USD."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.core.pricing import PriceTable

TERMINAL = {"COMPLETED", "PARTIAL", "ERROR", "FAILED", "CANCELLED", "REJECTED"}


@dataclass
class ClientStream:
    """What one client saw of one request, across every connection it made for it."""

    user: str
    request_id: str | None = None
    http_status: int | None = None
    seqs: list[int] = field(default_factory=list)
    # Seqs of the stream's other events (a resumed attempt's STARTED takes one): not gaps.
    other_seqs: list[int] = field(default_factory=list)
    text: str = ""
    done: dict[str, Any] | None = None
    resumes: int = 0
    longest_stall_s: float = 0.0
    # The POST broke before the `accepted` event: the gateway may or may not have written it.
    in_doubt: bool = False


@dataclass
class Verdict:
    """The figures of a run and whether every promise held."""

    accepted: int
    completed: int
    terminal_by_status: dict[str, int]
    lost: list[str]
    missing_tokens: int
    duplicated_tokens: int
    text_mismatches: list[str]
    billed_micro_usd: int
    served_micro_usd: int
    # Requests whose billed cost differs from what the simulator served: id, billed, served.
    billing_mismatches: list[tuple[str, int, int]]
    # For each of them, the tokens the simulator served and the result billed, so the report
    # tells unbilled input (an attempt's input nobody reported) from unbilled output (tokens a
    # cut attempt was sent that never reached `tokens`).
    billing_detail: list[dict[str, Any]]
    billed_unaccepted: list[str]
    ledger_disagreements: list[str]
    unexpected_dlq: int
    poison_in_dlq: int
    poison_injected: int
    resumed_streams: int
    longest_stall_s: float

    @property
    def billing_diff(self) -> int:
        return self.billed_micro_usd - self.served_micro_usd

    @property
    def ok(self) -> bool:
        return not (
            self.lost
            or self.missing_tokens
            or self.duplicated_tokens
            or self.text_mismatches
            or self.billing_diff
            or self.billed_unaccepted
            or self.ledger_disagreements
            or self.unexpected_dlq
            or self.poison_in_dlq != self.poison_injected
        )

    def last_line(self) -> str:
        billing = "exact" if self.billing_diff == 0 else f"off by {self.billing_diff} micro-USD"
        return (
            f"chaos: {self.accepted} accepted, {self.completed} completed, {len(self.lost)} lost, "
            f"{self.duplicated_tokens} duplicated tokens, billing {billing}"
        )

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "billing_diff": self.billing_diff, "ok": self.ok}


def served_by_request(
    sim_requests: Mapping[str, Any], results: Mapping[str, Any], prices: PriceTable
) -> dict[str, int]:
    """What the simulator served per request, priced as the worker prices it: every attempt's
    prompt and output tokens summed, then priced once (pipeline/core/results.py)."""
    out: dict[str, int] = {}
    for request_id, record in sim_requests.items():
        streams = record.get("streams", [])
        if not streams:
            continue
        model = results.get(request_id, {}).get("model") or streams[0].get("model", "")
        out[request_id] = prices.micro_usd(
            model,
            sum(int(s.get("input_tokens", 0)) for s in streams),
            sum(int(s.get("tokens", 0)) for s in streams),
        )
    return out


def token_faults(stream: ClientStream, written: set[int] | None = None) -> tuple[int, int]:
    """Missing and duplicated token seqs of one stream. Missing: the DELTA seqs ``written`` to
    `tokens` for the request that the client never received; without them, the gaps in 1..the
    last seq seen (a seq another event took is not a gap)."""
    if not stream.seqs and not written:
        return 0, 0
    counts = Counter(stream.seqs)
    duplicated = sum(n - 1 for n in counts.values())
    if written is not None:
        return len(written - set(counts)), duplicated
    missing = len(set(range(1, max(counts) + 1)) - set(counts) - set(stream.other_seqs))
    return missing, duplicated


def delta_seqs(token_events: Iterable[dict[str, Any]]) -> dict[str, set[int]]:
    """The seqs every DELTA on `tokens` covers, per request (a coalesced DELTA covers
    ``first_seq``..``seq``; ``first_seq`` 0 means just ``seq``)."""
    out: dict[str, set[int]] = defaultdict(set)
    for event in token_events:
        if event.get("kind") == "DELTA":
            seq = int(event["seq"])
            out[str(event["request_id"])].update(range(int(event.get("first_seq") or seq), seq + 1))
    return dict(out)


def evaluate(
    streams: Iterable[ClientStream],
    produced: Iterable[str],
    results: Mapping[str, dict[str, Any]],
    sim_requests: Mapping[str, Any],
    prices: PriceTable,
    dlq: Iterable[dict[str, Any]],
    poison: set[tuple[int, int]],
    usage_by_gateway: Mapping[str, Mapping[str, int]],
    maybe: set[str] | None = None,
    written: Mapping[str, set[int]] | None = None,
) -> Verdict:
    """Every check of the run; see :class:`Verdict` for what each figure means. ``maybe``:
    records produced straight whose write was not acknowledged (they may have landed)."""
    streams = list(streams)
    accepted_streams = [s for s in streams if s.request_id is not None]
    accepted = {s.request_id for s in accepted_streams if s.request_id} | set(produced)
    lost = sorted(i for i in accepted if results.get(i, {}).get("status") not in TERMINAL)
    by_status = Counter(str(r.get("status")) for i, r in results.items() if i in accepted)
    missing = duplicated = 0
    mismatched: list[str] = []
    for s in accepted_streams:
        seen = written.get(str(s.request_id), set()) if written is not None else None
        m, d = token_faults(s, seen if s.done is not None else None)
        missing, duplicated = missing + m, duplicated + d
        done = s.done or {}
        if (
            done.get("status") == "COMPLETED"
            and (done.get("summary") or "").strip() != s.text.strip()
        ):
            mismatched.append(str(s.request_id))
    in_doubt = sum(1 for s in streams if s.in_doubt)
    unseen = sorted(i for i in results if i not in accepted and i not in (maybe or set()))
    billed_unaccepted = unseen if len(unseen) > in_doubt else []
    ledgers = _ledger_disagreements(results, usage_by_gateway)
    served = served_by_request(sim_requests, results, prices)
    billed = {i: int(r["usage"]["cost_micro_usd"]) for i, r in results.items()}
    mismatches = sorted(
        (i, billed.get(i, 0), served.get(i, 0))
        for i in set(served) | set(billed)
        if billed.get(i, 0) != served.get(i, 0)
    )
    detail = [_unbilled(i, sim_requests.get(i, {}), results.get(i, {})) for i, _, _ in mismatches]
    dlq = list(dlq)
    from_poison = [
        d
        for d in dlq
        if (int(d.get("origin_partition", -1)), int(d.get("origin_offset", -1))) in poison
    ]
    return Verdict(
        accepted=len(accepted),
        completed=by_status.get("COMPLETED", 0),
        terminal_by_status=dict(sorted(by_status.items())),
        lost=lost,
        missing_tokens=missing,
        duplicated_tokens=duplicated,
        text_mismatches=mismatched,
        billed_micro_usd=sum(billed.values()),
        served_micro_usd=sum(served.values()),
        billing_mismatches=mismatches,
        billing_detail=detail,
        billed_unaccepted=billed_unaccepted,
        ledger_disagreements=ledgers,
        unexpected_dlq=len(dlq) - len(from_poison),
        poison_in_dlq=len({(d["origin_partition"], d["origin_offset"]) for d in from_poison}),
        poison_injected=len(poison),
        resumed_streams=sum(1 for s in accepted_streams if s.resumes),
        longest_stall_s=round(max((s.longest_stall_s for s in streams), default=0.0), 3),
    )


def _unbilled(
    request_id: str, served: Mapping[str, Any], result: Mapping[str, Any]
) -> dict[str, Any]:
    streams = served.get("streams", [])
    usage = result.get("usage") or {}
    input_served = sum(int(s.get("input_tokens", 0)) for s in streams)
    output_served = sum(int(s.get("tokens", 0)) for s in streams)
    return {
        "request_id": request_id,
        "attempts": [(s.get("ended"), s.get("input_tokens"), s.get("tokens")) for s in streams],
        "unbilled_input_tokens": input_served - int(usage.get("input_tokens", 0)),
        "unbilled_output_tokens": output_served - int(usage.get("output_tokens", 0)),
    }


def _ledger_disagreements(
    results: Mapping[str, dict[str, Any]], usage_by_gateway: Mapping[str, Mapping[str, int]]
) -> list[str]:
    """Users whose cost differs between the gateways' quota ledgers, or from ``results``."""
    from_results: dict[str, int] = defaultdict(int)
    for r in results.values():
        from_results[str(r["user_id"])] += int(r["usage"]["cost_micro_usd"])
    out: list[str] = []
    for gateway, usage in usage_by_gateway.items():
        for user, cost in sorted(usage.items()):
            if cost != from_results.get(user, 0):
                out.append(
                    f"{gateway}: {user} ledger {cost} != results {from_results.get(user, 0)}"
                )
    return out
