"""The seeded fault schedule: which fault, when, and how long until the restart."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Literal

FaultKind = Literal["kill-leader-broker", "kill-worker", "kill-gateway", "stop-worker", "poison"]
KINDS: tuple[FaultKind, ...] = (
    "kill-leader-broker",
    "kill-worker",
    "kill-gateway",
    "stop-worker",
    "poison",
)


@dataclass(frozen=True)
class Fault:
    """One fault: at ``at_s`` into the load, on ``target`` (an index), undone ``hold_s`` later."""

    at_s: float
    kind: FaultKind
    target: int
    hold_s: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def plan(seed: int, duration_s: float, session_timeout_s: float, rounds: int = 1) -> list[Fault]:
    """Every kind of fault ``rounds`` times, in a seeded order, one per slot between 10 % and
    75 % of the load, so the last restart settles while the load still runs.

    A stopped worker stays stopped beyond its session timeout (the group must move its
    partitions); a killed broker stays down long enough to be fenced (6 s).
    """
    rng = random.Random(seed)
    kinds = [kind for _ in range(rounds) for kind in KINDS]
    rng.shuffle(kinds)
    start, end = 0.1 * duration_s, 0.75 * duration_s
    slot = (end - start) / len(kinds)
    faults: list[Fault] = []
    for i, kind in enumerate(kinds):
        at = start + i * slot + rng.uniform(0, slot * 0.3)
        hold = {
            "kill-leader-broker": 8.0,
            "kill-worker": 2.0,
            "kill-gateway": 2.0,
            "stop-worker": session_timeout_s + 4.0,
            "poison": 0.0,
        }[kind]
        faults.append(Fault(round(at, 2), kind, rng.randrange(2), hold))
    return faults
