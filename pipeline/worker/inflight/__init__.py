"""The inference stage's durable in-flight work: the `inflight` table's entries and their state
machine (``entries``), and the work that keeps them and resumes them after a rebalance
(``work``)."""

from __future__ import annotations

from pipeline.worker.inflight.entries import Entry, EntryState
from pipeline.worker.inflight.table import InflightEntries
from pipeline.worker.inflight.work import InflightWork

__all__ = ["Entry", "EntryState", "InflightEntries", "InflightWork"]
