#!/usr/bin/env python3
"""Release the current schemas as a history version, with a fixture record of each type.

Copies ``schemas/*.avsc`` to ``schemas/history/vN/`` and writes ``tests/fixtures/history/vN/
<Record>.bin`` (the record encoded with that version) plus ``<Record>.json`` (the values
written). The codec test decodes every fixture of every version with the current codec, so a
schema change that breaks old records fails the tests.

    .venv/bin/python scripts/gen_schema_fixtures.py            # next version, if schemas changed
    .venv/bin/python scripts/gen_schema_fixtures.py --version v1 --replace   # rewrite one
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.core.codec import Codec  # noqa: E402
from tests.avro_data import record_names, sample, to_json  # noqa: E402

SCHEMAS = ROOT / "schemas"
HISTORY = SCHEMAS / "history"
FIXTURES = ROOT / "tests" / "fixtures" / "history"


def versions() -> list[str]:
    """History versions, oldest first (v1, v2, ... v10)."""
    found = [p.name for p in HISTORY.glob("v*") if p.is_dir() and p.name[1:].isdigit()]
    return sorted(found, key=lambda v: int(v[1:]))


def same_schemas(a: Path, b: Path) -> bool:
    files_a = {p.name: p.read_text() for p in a.glob("*.avsc")}
    files_b = {p.name: p.read_text() for p in b.glob("*.avsc")}
    return files_a == files_b


def write_version(version: str) -> None:
    target = HISTORY / version
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("*.avsc"):
        old.unlink()
    for avsc in sorted(SCHEMAS.glob("*.avsc")):
        shutil.copyfile(avsc, target / avsc.name)
    # Encode with the released copy itself, so the fixture names exactly that writer schema.
    codec = Codec(target)
    out = FIXTURES / version
    out.mkdir(parents=True, exist_ok=True)
    for name in record_names(target):
        record = sample(name, target)
        (out / f"{name}.bin").write_bytes(codec.encode(name, record))
        (out / f"{name}.json").write_text(to_json(record) + "\n")
        print(f"  {version}/{name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", help="version to write, e.g. v3 (default: the next one)")
    parser.add_argument("--replace", action="store_true", help="overwrite an existing version")
    args = parser.parse_args()
    known = versions()
    if args.version is None and known and same_schemas(SCHEMAS, HISTORY / known[-1]):
        print(f"schemas/ is unchanged since {known[-1]}; nothing to release")
        return 0
    version = args.version or f"v{int(known[-1][1:]) + 1 if known else 1}"
    if version in known and not args.replace:
        print(f"{version} exists; pass --replace to rewrite it", file=sys.stderr)
        return 1
    print(f"writing schemas/history/{version} and tests/fixtures/history/{version}:")
    write_version(version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
