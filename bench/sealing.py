"""CPU per seal and open of sealed text (pipeline/core/sealing.py), for docs/architecture.md,
"Forgetting": ``python -m bench.sealing``."""

from __future__ import annotations

import functools
import random
import string
import time
from collections.abc import Callable

from pipeline.core import events, sealing
from pipeline.core.codec import codec
from pipeline.core.sealing import Keyring


def prose(size: int, seed: int = 1) -> str:
    """``size`` characters of words drawn at random from a 3,000-word vocabulary: it
    compresses about as well as English prose (a repeated sentence would flatter zlib)."""
    rng = random.Random(seed)
    vocabulary = [
        "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(3000)
    ]
    words: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(vocabulary)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:size]


SIZES = {
    "delta, 1 token (4 B)": "word",
    "delta, coalesced (64 B)": prose(64),
    "summary (1 KiB)": prose(1024),
    "document (20 KiB)": prose(20_480),
    "document (500 KiB)": prose(512_000),
}


def per_op_us(op: Callable[[], object], budget_s: float = 0.5) -> float:
    """CPU microseconds per call of ``op`` over about ``budget_s`` of CPU."""
    runs = 1
    while True:
        start = time.process_time()
        for _ in range(runs):
            op()
        spent = time.process_time() - start
        if spent >= budget_s:
            return spent / runs * 1e6
        runs *= 2 if spent < budget_s / 10 else 1 + int(budget_s / max(spent, 1e-9))


def main() -> None:
    ring = Keyring()
    ring.add("ann", "0123456789abcdef", sealing.new_key())
    print(f"{'text':<26} {'seal µs':>9} {'open µs':>9} {'plain B':>9} {'sealed B':>9}")
    for name, text in SIZES.items():
        sealed = ring.seal(text, "0123456789abcdef")
        seal = per_op_us(functools.partial(ring.seal, text, "0123456789abcdef"))
        opened = per_op_us(functools.partial(ring.open, sealed))
        print(f"{name:<26} {seal:>9.1f} {opened:>9.1f} {len(text.encode()):>9} {len(sealed):>9}")
    plain = per_op_us(lambda: ring.open("a plain string from another system"))
    print(f"{'plain passthrough':<26} {'':>9} {plain:>9.2f}")
    # For scale: what a DELTA record's encode and decode cost anyway.
    event = events.delta("01JDQ0000000000000000000000", first_seq=1, pieces=["word"], attempt=1)
    encoded = codec().encode("TokenEvent", event)
    encode = per_op_us(lambda: codec().encode("TokenEvent", event))
    decode = per_op_us(lambda: codec().decode_as(encoded, "TokenEvent"))
    print(f"{'DELTA record encode/decode':<26} {encode:>9.1f} {decode:>9.1f}")


if __name__ == "__main__":
    main()
