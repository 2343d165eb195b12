"""Distinct, deterministic documents, so a stream that carries another request's text is caught."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

from pipeline.llm.extractive import count_tokens

SUBJECTS = [
    "The harbour authority",
    "A regional bakery",
    "The river council",
    "Our mountain observatory",
    "The city library",
    "A small robotics lab",
    "The northern rail line",
    "A coastal vineyard",
    "The public archive",
    "An orchestra in residence",
    "The water utility",
    "A cycling club",
]
VERBS = [
    "reported",
    "measured",
    "announced",
    "expanded",
    "reviewed",
    "repaired",
    "doubled",
    "tested",
    "postponed",
    "published",
    "financed",
    "redesigned",
]
OBJECTS = [
    "its winter schedule",
    "the flood barriers",
    "a new telescope mirror",
    "the sourdough recipe",
    "twelve thousand records",
    "the signalling system",
    "a volunteer programme",
    "the grape harvest",
    "the annual budget",
    "an open rehearsal",
    "the pumping stations",
    "the mountain routes",
]
DETAILS = [
    "after a long consultation",
    "despite heavy rain",
    "with help from students",
    "ahead of the summer season",
    "following an audit",
    "at a lower cost than planned",
    "for the third year running",
    "to the surprise of residents",
]


def document(seed: int, sentences: int = 24) -> str:
    """A plain-prose document of ``sentences`` sentences, unique per seed, already normalised."""
    rng = random.Random(seed)
    out = []
    for i in range(sentences):
        sentence = (
            f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
            f"{rng.choice(DETAILS)}, item {seed}-{i} noted {rng.randint(2, 999)} cases."
        )
        out.append(sentence)
    return " ".join(out)


def stdlib_document(min_tokens: int) -> str:
    """Real text: whole stdlib modules (docstrings, comments, code) up to ``min_tokens``; the
    top-level modules first, then the packages' (their tests left out), for the largest."""
    root = Path(sysconfig.get_paths()["stdlib"])
    top = sorted(root.glob("*.py"))
    nested = sorted(p for p in root.rglob("*.py") if p.parent != root and "test" not in p.parts)
    parts: list[str] = []
    tokens = 0
    for path in (p for p in (*top, *nested) if p.stat().st_size > 4_000):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        tokens += count_tokens(text)
        if tokens > min_tokens:
            break
    return "\n\n".join(parts)
