"""The product text speaks of the product, never of how it was built.

README, the documentation, the code, the configuration, the benchmarks, the notebooks
and the tools must not name work items (issue numbers, rounds of work), the sessions or
machines the work was done on, or files outside the repository: a user cannot act on
any of it, and it goes stale. History belongs in CHANGELOG.md, which is not scanned.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
SCANNED = (
    "README.md",
    "CONTRIBUTING.md",
    "NOTICE",
    "mkdocs.yml",
    "pyproject.toml",
    ".ci",
    "bench",
    "conf",
    "data/01_raw/README.md",
    "docs",
    "notebooks",
    "src",
    "tools",
)
TEXT_SUFFIXES = {"", ".md", ".py", ".yml", ".yaml", ".toml", ".ipynb", ".txt", ".cfg"}
SKIPPED_PARTS = {"__pycache__", ".ipynb_checkpoints", "images"}
# Each pattern names one kind of reference to how the project was made.
FORBIDDEN = {
    "issue number": re.compile(r"\bissues? ?#?\d+\b|(?<![\w/])#\d+\b", re.IGNORECASE),
    "round of work": re.compile(
        r"\bround \d+\b|\brounds? of work\b|\bthis round\b", re.IGNORECASE
    ),
    "path outside the repository": re.compile(
        r"\.\./shared\b|\bshared/tools\b|/work/", re.IGNORECASE
    ),
    "work session": re.compile(
        r"\b(?:this|that|another|other|earlier|previous|later|next|each|one|a)"
        r" sessions?\b|\bsessions? \d+\b|\bsessions?'",
        re.IGNORECASE,
    ),
    "machines lent or not": re.compile(
        r"\b(?:was|were|is|are|been) (?:not )?lent\b|\bno GPU (?:was|is|has been)\b"
        r"|\bwhere this was built\b|\bno (?:GPU|machine) (?:was )?available\b",
        re.IGNORECASE,
    ),
    "the people who built it": re.compile(
        r"\blead engineer\b|\bhelper (?:engineer|session)\b|\bthe brief\b",
        re.IGNORECASE,
    ),
}


def references(text: str) -> list[tuple[str, str]]:
    """(kind, matched text) of every forbidden reference in ``text``."""
    return [
        (kind, match.group(0))
        for kind, pattern in FORBIDDEN.items()
        for match in pattern.finditer(text)
    ]


def scanned_files() -> list[Path]:
    """The text files of :data:`SCANNED` that are in the repository."""
    files = []
    for name in SCANNED:
        path = PROJECT / name
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        files += [
            candidate
            for candidate in candidates
            if candidate.is_file()
            and candidate.suffix in TEXT_SUFFIXES
            and not any(
                part in SKIPPED_PARTS or part.endswith(".egg-info")
                for part in candidate.relative_to(PROJECT).parts
            )
        ]
    return files


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ("Target (issue 19): 400 images per second", "issue number"),
        ("see Issue #3 for the plan", "issue number"),
        ("fixed in #42", "issue number"),
        ("measured in round 2 of the work", "round of work"),
        ("python ../shared/tools/outcome.py", "path outside the repository"),
        ("copied from /work/main/data", "path outside the repository"),
        ("wall time with 6 other sessions running", "work session"),
        ("session 2 measured 1,349 img/s", "work session"),
        ("before this session's memory changes", "work session"),
        ("no GPU figure: no GPU was lent", "machines lent or not"),
        ("none can be downloaded where this was built", "machines lent or not"),
        ("as the lead engineer asked", "the people who built it"),
    ],
)
def test_each_kind_of_reference_is_found(line: str, kind: str) -> None:
    assert kind in {found for found, _ in references(line)}


@pytest.mark.parametrize(
    "line",
    [
        "label_issues.csv lists the suspect images (find_label_issues)",
        'with KedroSession.create(env="smoke") as session:',
        '@pytest.fixture(scope="session")',
        "Keras 3.15's loop fails there (keras-team/keras#19246)",
        "pixels would be rounded to 8 significant bits",
        "a shared file system (/mnt/shared/...) every worker mounts",
        "mean_colour (#rrggbb)",
        "medians of 3 alternating rounds",
    ],
)
def test_product_vocabulary_is_not_a_reference(line: str) -> None:
    assert references(line) == []


def test_the_scan_covers_the_product_text() -> None:
    scanned = {path.relative_to(PROJECT).as_posix() for path in scanned_files()}
    for expected in (
        "README.md",
        "docs/index.md",
        "conf/base/parameters.yml",
        "src/irv2_pipeline/parameters.py",
        "bench/ingestion.py",
    ):
        assert expected in scanned


def test_no_product_text_speaks_of_how_it_was_built() -> None:
    found = [
        f"{path.relative_to(PROJECT)}:{number}: {kind}: {text!r}"
        for path in scanned_files()
        for number, line in enumerate(
            path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1
        )
        for kind, text in references(line)
    ]
    assert not found, "\n".join(found)
