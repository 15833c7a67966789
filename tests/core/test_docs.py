"""The contract lives in docs/: every section the code and the tests cite exists there.

`spec §N` (or `unit-protocol.md §N`, `protocol.md §N`) cites docs/protocol.md; `http-apis.md §N` cites
docs/http-apis.md. A bare `§N` continues the document of the citation before it in the same file, or,
with none before it, the document of the file's area (the HTTP gateways cite http-apis.md).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = {"protocol": REPO / "docs" / "protocol.md", "http": REPO / "docs" / "http-apis.md"}
SOURCES = sorted(p for top in ("core", "units", "firmware_bridge", "models", "tests")
                 for p in (REPO / top).rglob("*.py") if p.resolve() != Path(__file__).resolve())
# One citation: an optional document name, then §N or §N.M; "§7.5-§7.9" cites both ends.
CITATION = re.compile(r"(?:(http-apis(?:\.md)?|unit-protocol(?:\.md)?|protocol\.md|spec)\s*)?§\s?(\d+(?:\.\d+)*)")


def sections(doc: Path) -> set[str]:
    numbers = set()
    for line in doc.read_text(encoding="utf-8").splitlines():
        match = re.match(r"#{2,4}\s+(\d+(?:\.\d+)*)\.?\s", line)
        if match:
            numbers.add(match.group(1))
    return numbers


def citations(path: Path) -> list[tuple[str, str, int]]:
    default = "http" if "firmware_bridge/http" in path.as_posix() or "/e2e/http/" in path.as_posix() else "protocol"
    current = default
    found = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for match in CITATION.finditer(line):
            name, section = match.groups()
            if name:
                current = "http" if name.startswith("http-apis") else "protocol"
            found.append((current, section, number))
    return found


def test_the_documents_are_in_the_repository_and_linked_from_the_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for doc in DOCS.values():
        assert doc.is_file(), doc
        assert f"docs/{doc.name}" in readme, f"README does not link docs/{doc.name}"


def test_section_headings_parse():
    assert {"4.3", "10.1", "15", "20"} <= sections(DOCS["protocol"])
    assert {"1.7", "2.4", "3.6", "5.5"} <= sections(DOCS["http"])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_cited_section_exists(path):
    known = {name: sections(doc) for name, doc in DOCS.items()}
    missing = [f"{path.relative_to(REPO)}:{line}: {DOCS[doc].name} §{section}"
               for doc, section, line in citations(path) if section not in known[doc]]
    assert not missing, "cited sections that the documents lack:\n" + "\n".join(missing)


def test_the_code_cites_the_documents():
    # A guard for the checker itself: if the pattern stopped matching, every file would pass.
    assert sum(len(citations(p)) for p in SOURCES) > 50
