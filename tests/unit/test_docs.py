"""Code and docs cite docs/architecture.md by section name: every cited section exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ARCHITECTURE = REPO / "docs" / "architecture.md"
THIS = Path(__file__).resolve()
# `docs/architecture.md, "Section"`, possibly broken over a comment or docstring line.
CITATION = re.compile(r'docs/architecture\.md,[\s#]*"([^"]+)"')
SOURCES = ("pipeline", "gateway", "tests", "bench", "docs", "deploy")


def headings() -> list[str]:
    return [
        line.lstrip("#").strip()
        for line in ARCHITECTURE.read_text().splitlines()
        if line.startswith("#")
    ]


def citations() -> list[tuple[Path, str]]:
    found: list[tuple[Path, str]] = []
    for top in SOURCES:
        for path in (REPO / top).rglob("*"):
            if path.suffix not in {".py", ".md", ".yml", ".toml"} or path == THIS:
                continue
            text = path.read_text(errors="replace")
            found += [
                (path, " ".join(m.group(1).replace("#", " ").split()))
                for m in CITATION.finditer(text)
            ]
    return found


def test_code_cites_architecture_sections() -> None:
    assert len(citations()) >= 10


def test_every_cited_architecture_section_exists() -> None:
    names = headings()
    missing = [
        f"{path.relative_to(REPO)}: {section!r}"
        for path, section in citations()
        if not any(name.startswith(section) for name in names)
    ]
    assert not missing, missing


def test_no_file_cites_a_document_outside_the_repository() -> None:
    offenders = [
        str(path.relative_to(REPO))
        for top in (*SOURCES, "README.md")
        for path in ([REPO / top] if top.endswith(".md") else (REPO / top).rglob("*.py"))
        if path != THIS and "DESIGN.md" in path.read_text(errors="replace")
    ]
    assert not offenders, offenders
