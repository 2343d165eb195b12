"""Weighted fair queuing of inference jobs across users, with per-user and total bounds.

Self-clocked fair queuing: each user has a FIFO of jobs; the job at its head carries a virtual
finish tag ``max(V, user's last finish) + 1 / weight``, and the scheduler runs the eligible head
with the smallest tag, advancing V to it. A backlogged user of weight w therefore gets a w/W share
of the starts, and a user returning from idle starts at V: idle time earns no credit, so a flood
cannot starve anybody and a quiet user does not wait behind it.

Above the users, priority classes: a job of priority 0 (interactive HTTP, by default) starts
before any waiting job of priority 1 (work other systems put on ``requests``); within a class,
WFQ as above. A user's flow takes the class of the job at its head.

A job may belong to a group with a cap (a long document's chunk calls: at most its tier's
``map_concurrency`` at once, docs/architecture.md "Long documents"); a flow whose head's
group is at its cap waits, like a user at its own cap. Grouped jobs do not count against
``max_queued``: a document's calls waiting for their turn must not stop the agent from taking
other users' jobs (they are bounded by the document's size instead). Grouped jobs together
take at most ``GROUPED_SHARE`` of the running slots: they are long batch calls, and a slot
they hold is one an interactive request waits for.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from pipeline.core.metrics import QUEUED


class Schedulable(Protocol):
    """What the scheduler needs to know about a job."""

    @property
    def request_id(self) -> str: ...

    @property
    def user_id(self) -> str: ...

    @property
    def weight(self) -> int: ...

    @property
    def priority(self) -> int: ...


T = TypeVar("T", bound=Schedulable)

# The share of the running slots that grouped (batch) jobs may hold together.
GROUPED_SHARE = 0.5


@dataclass
class _Flow(Generic[T]):
    queue: deque[tuple[int, T]] = field(default_factory=deque)  # (arrival order, job)
    running: int = 0
    last_finish: float = 0.0
    head_start: float = 0.0
    head_finish: float = 0.0
    head_order: int = 0


class FairScheduler(Generic[T]):
    """WFQ across users: ``put`` waits while the queue is full, ``next`` while nothing may run."""

    def __init__(self, *, max_running: int, max_per_user: int, max_queued: int) -> None:
        if min(max_running, max_per_user, max_queued) < 1:
            raise ValueError("scheduler bounds must be at least 1")
        self.max_running = max_running
        self.max_per_user = max_per_user
        self.max_queued = max_queued
        self._flows: dict[str, _Flow[T]] = {}
        self._queued: dict[str, T] = {}  # request_id -> job, for remove()
        self._running = 0
        self._groups: dict[str, int] = {}  # group -> jobs of it running
        self._grouped_queued = 0  # queued jobs that belong to a group
        self._vtime = 0.0
        self._order = itertools.count()
        self._changed = asyncio.Event()

    @property
    def queued(self) -> int:
        return len(self._queued)

    @property
    def running(self) -> int:
        return self._running

    def running_for(self, user_id: str) -> int:
        flow = self._flows.get(user_id)
        return flow.running if flow else 0

    def is_queued(self, request_id: str) -> bool:
        return request_id in self._queued

    def resize(self, *, max_running: int, max_queued: int) -> None:
        """New bounds (the upstream's learned limit changed); running jobs are not stopped."""
        if min(max_running, max_queued) < 1:
            raise ValueError("scheduler bounds must be at least 1")
        self.max_running, self.max_queued = max_running, max_queued
        self._notify()

    async def put(self, job: T) -> None:
        """Queue ``job``; waits while the queue is full (the caller then stops consuming)."""
        while _group(job) is None and len(self._queued) - self._grouped_queued >= self.max_queued:
            await self._changed.wait()
        self.put_nowait(job)

    def put_nowait(self, job: T) -> None:
        """Queue ``job`` now, over the bound if need be (for resumed work that must not wait)."""
        if job.request_id in self._queued:
            raise ValueError(f"request {job.request_id} is already queued")
        flow = self._flows.get(job.user_id)
        if flow is None:
            flow = self._flows[job.user_id] = _Flow()
        flow.queue.append((next(self._order), job))
        self._queued[job.request_id] = job
        self._grouped_queued += _group(job) is not None
        if len(flow.queue) == 1:
            self._tag_head(flow)
        self._notify()

    async def next(self) -> T:
        """The next job to run: a free slot, the user under its cap, the smallest finish tag."""
        while (job := self.next_nowait()) is None:
            await self._changed.wait()
        return job

    def next_nowait(self) -> T | None:
        """The job ``next`` would return, or None when no job may start now."""
        if self._running >= self.max_running:
            return None
        flow = self._pick()
        return self._start(flow) if flow is not None else None

    def done(self, job: T) -> None:
        """Release the slot ``job`` held since ``next`` returned it."""
        flow = self._flows.get(job.user_id)
        if flow is None or flow.running <= 0:
            raise ValueError(f"request {job.request_id} holds no slot")
        flow.running -= 1
        self._running -= 1
        group = _group(job)
        if group is not None:
            left = self._groups.get(group[0], 0) - 1
            if left > 0:
                self._groups[group[0]] = left
            else:
                self._groups.pop(group[0], None)
        self._forget_if_idle(job.user_id, flow)
        self._notify()

    def remove(self, request_id: str) -> T | None:
        """Take a still-queued job out (cancelled or expired); None when it is not queued."""
        job = self._queued.pop(request_id, None)
        if job is None:
            return None
        self._grouped_queued -= _group(job) is not None
        flow = self._flows[job.user_id]
        was_head = flow.queue[0][1] is job
        flow.queue = deque(entry for entry in flow.queue if entry[1] is not job)
        if was_head:
            # Give the user back the virtual time its removed head had reserved.
            flow.last_finish = flow.head_start
            if flow.queue:
                self._tag_head(flow)
        self._forget_if_idle(job.user_id, flow)
        self._notify()
        return job

    def _tag_head(self, flow: _Flow[T]) -> None:
        order, head = flow.queue[0]
        flow.head_start = max(self._vtime, flow.last_finish)
        flow.head_finish = flow.head_start + 1.0 / max(1, head.weight)
        flow.last_finish = flow.head_finish
        # Ties go to the job that arrived first.
        flow.head_order = order

    def _pick(self) -> _Flow[T] | None:
        best: _Flow[T] | None = None
        grouped_full = sum(self._groups.values()) >= max(1, int(self.max_running * GROUPED_SHARE))
        for flow in self._flows.values():
            if not flow.queue or flow.running >= self.max_per_user:
                continue
            group = _group(flow.queue[0][1])
            if group is not None and (grouped_full or self._groups.get(group[0], 0) >= group[1]):
                continue
            if best is None or (
                flow.queue[0][1].priority,
                flow.head_finish,
                flow.head_order,
            ) < (best.queue[0][1].priority, best.head_finish, best.head_order):
                best = flow
        return best

    def _start(self, flow: _Flow[T]) -> T:
        _, job = flow.queue.popleft()
        del self._queued[job.request_id]
        self._grouped_queued -= _group(job) is not None
        flow.running += 1
        self._running += 1
        group = _group(job)
        if group is not None:
            self._groups[group[0]] = self._groups.get(group[0], 0) + 1
        self._vtime = max(self._vtime, flow.head_finish)
        if flow.queue:
            self._tag_head(flow)
        self._notify()
        return job

    def _forget_if_idle(self, user_id: str, flow: _Flow[T]) -> None:
        # An idle user keeps no history: coming back, it starts at the current virtual time.
        if not flow.queue and flow.running == 0:
            del self._flows[user_id]

    def _notify(self) -> None:
        QUEUED.set(len(self._queued))
        self._changed.set()
        self._changed = asyncio.Event()


def _group(job: Schedulable) -> tuple[str, int] | None:
    """The job's capped group, if it has one (jobs of other kinds have no ``group``)."""
    group: tuple[str, int] | None = getattr(job, "group", None)
    return group
