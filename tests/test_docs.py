"""The documentation keeps up with what it documents.

Each check reads the thing documented (the diagnosis' order, the bench scripts, the
pipelines, CI's commands) and the page that documents it, so a new rule, bench or
pipeline without its documentation fails here rather than going unnoticed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]
DOCS = PROJECT / "docs"
DIAGNOSIS = PROJECT / "src/irv2_pipeline/pipelines/evaluation/diagnosis.py"


def priority() -> list[str]:
    """``diagnosis.PRIORITY`` flattened, read from the source (no TensorFlow import)."""
    for node in ast.parse(DIAGNOSIS.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "PRIORITY":
            return [rule for peers in ast.literal_eval(node.value) for rule in peers]
    raise AssertionError("diagnosis.PRIORITY not found")


def bench_scripts() -> list[str]:
    """The benchmarks: bench/*.py that run as scripts (not the shared helpers)."""
    return sorted(
        path.stem
        for path in (PROJECT / "bench").glob("*.py")
        if "__main__" in path.read_text(encoding="utf-8")
    )


def test_the_report_page_explains_every_finding_in_the_reports_order() -> None:
    page = (DOCS / "report.md").read_text(encoding="utf-8")
    section = page.split("## The findings, in the report's order", 1)[1]
    assert re.findall(r"^### `(\w+)`$", section, flags=re.MULTILINE) == priority()


def test_every_bench_has_one_row_on_the_benchmarks_page_and_in_its_readme() -> None:
    page = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\w+) \| `python bench/", page, flags=re.MULTILINE)
    assert sorted(rows) == bench_scripts()
    readme = (PROJECT / "bench/README.md").read_text(encoding="utf-8")
    for name in bench_scripts():
        assert f"| `{name}.py` |" in readme


def test_every_pipeline_has_its_page_in_the_site() -> None:
    pipelines = sorted(
        path.name
        for path in (PROJECT / "src/irv2_pipeline/pipelines").iterdir()
        if (path / "pipeline.py").is_file()
    )
    nav = yaml.safe_load((PROJECT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]
    pages = next(
        entry["How each pipeline decides"]
        for entry in nav
        if "How each pipeline decides" in entry
    )
    assert sorted(next(iter(page)) for page in pages) == pipelines
    for name in pipelines:
        assert (DOCS / "pipelines" / f"{name}.md").is_file()


def test_the_readme_is_one_page_with_cis_test_command() -> None:
    readme = (PROJECT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    ci = (PROJECT / ".ci/run").read_text(encoding="utf-8")
    # The commands after the line that opens the "Tests" part, env settings dropped.
    ci_tests = ci.split('# --- README: "Tests" ', 1)[1].split("\n", 1)[1]
    commands = [
        re.sub(r"^(\w+=\S+ )+", "", line)
        for line in ci_tests.splitlines()
        if line and not line.startswith("#")
    ]
    assert commands[-1] == "pytest"
    assert re.search(r"^pytest(\s+#.*)?$", readme, flags=re.MULTILINE)
    contributing = (PROJECT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    ci_block = contributing.split("## CI", 1)[1].split("```bash", 1)[1].split("```")[0]
    assert ci_block.split() == " ".join(commands).split()
