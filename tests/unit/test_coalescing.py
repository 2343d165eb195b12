"""Coalesced DELTA records end to end on the pure parts: any split of a summary into seqs, any
coalescing of those seqs into records, redeliveries and old one-seq records mixed in, any
Last-Event-ID; the client gets exactly the summary after its resume point."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from bench.sse import SSEParser
from gateway.http.sse import StreamProgress
from gateway.streams.hub import StreamHub
from pipeline.core import events
from pipeline.core.codec import SCHEMA_DIR, Codec, codec
from pipeline.core.records import TERMINAL_KINDS, TokenEvent
from pipeline.worker.jobs import resume_state
from pipeline.worker.postprocess import assemble

RID = "01JABCDEFGHJKMNPQRSTVWXYZ0"
# The last released TokenEvent before ranges: it writes one seq per DELTA.
OLD = Codec(SCHEMA_DIR / "history" / "v2")


def records_of(pieces: list[str], sizes: list[int], old: list[bool]) -> list[TokenEvent]:
    """STARTED (seq 1), the pieces (seqs 2..) coalesced by ``sizes``, then DONE."""
    meta = events.StreamMeta.of({"request_id": RID, "user_id": "u"})
    out = [events.started(meta, seq=1, attempt=1, trace={})]
    seq, i, k = 2, 0, 0
    while i < len(pieces):
        size = max(1, min(sizes[k % len(sizes)], len(pieces) - i))
        if old[k % len(old)]:
            size = 1  # a writer of the old schema: one seq per record
        delta = events.delta(RID, first_seq=seq, pieces=pieces[i : i + size], attempt=1)
        if old[k % len(old)]:
            encoded = OLD.encode("TokenEvent", {**delta, "first_seq": 0, "cuts": []})
            delta = codec().decode_as(encoded, "TokenEvent")  # type: ignore[assignment]
        out.append(delta)
        seq, i, k = seq + size, i + size, k + 1
    out.append(events.terminal(meta, "DONE", seq=seq, attempt=1, usage=None))
    return out


def client_view(records: list[TokenEvent], after_seq: int) -> list[dict[str, Any]]:
    """The ``token`` events a client resuming after ``after_seq`` gets through the hub."""
    hub = StreamHub()
    hub.register(RID)
    for record in records:
        hub.dispatch_token(dict(record))
    sub = hub.subscribe(RID, after_seq)
    assert sub is not None
    sub.close("test")  # every item is in its backlog already; get() then ends
    progress = StreamProgress(after_seq)
    sent = []
    while (item := asyncio.run(sub.get())) is not None:
        out = progress.take(item)
        if out is not None:
            (event,) = SSEParser().feed(out)
            assert event.event == "token"
            data = json.loads(event.data)
            assert event.id == str(data["seq"])
            sent.append(data)
    return sent


summaries = st.lists(st.text(min_size=0, max_size=4), min_size=1, max_size=30)


@settings(max_examples=300, deadline=None)
@given(
    pieces=summaries,
    sizes=st.lists(st.integers(1, 8), min_size=1, max_size=10),
    old=st.lists(st.booleans(), min_size=1, max_size=5),
    redelivered=st.lists(st.integers(0, 40), max_size=5),
    resume=st.integers(0, 40),
)
def test_any_chunking_and_any_resume_point_give_the_exact_rest_of_the_summary(
    pieces: list[str], sizes: list[int], old: list[bool], redelivered: list[int], resume: int
) -> None:
    records = records_of(pieces, sizes, old)
    last = records[-1]["seq"]
    after = min(resume, last - 1)
    # Redelivered records arrive again right after themselves (a producer retry).
    delivered = []
    for i, record in enumerate(records):
        delivered.append(record)
        if i in redelivered:
            delivered.append(record)
    summary = "".join(pieces)
    texts = ["", *pieces]  # seq 1 is STARTED; seq s holds pieces[s - 2]
    sent = client_view(delivered, after)
    assert "".join(t["text"] for t in sent) == "".join(texts[after:])
    covered = [s for t in sent for s in range(t["first_seq"], t["seq"] + 1)]
    assert covered == list(range(max(after + 1, 2), last))  # no gap, no duplicate
    assembly = assemble(delivered)
    assert (assembly.text, assembly.complete, assembly.last_seq) == (summary, True, last)
    state = resume_state([r for r in delivered if r["kind"] not in TERMINAL_KINDS])
    assert state is not None and state.text == summary and state.last_seq == last - 1


@settings(max_examples=100, deadline=None)
@given(pieces=summaries, sizes=st.lists(st.integers(1, 8), min_size=1, max_size=10))
def test_a_missing_range_record_makes_the_assembly_incomplete(
    pieces: list[str], sizes: list[int]
) -> None:
    records = records_of(pieces, sizes, [False])
    for lost in range(1, len(records) - 1):
        assembly = assemble(records[:lost] + records[lost + 1 :])
        assert not assembly.complete
