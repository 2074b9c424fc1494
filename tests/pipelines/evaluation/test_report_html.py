"""report_html: the verdict, the findings by outcome, the report; one offline page.

Built from a small Markdown report made of the report's own parts, a few planted
findings and one generated PNG, so these take seconds. The browser checks open the
page in headless Chromium with every connection sent to a recording proxy, and skip
when there is no ``chromium`` on the PATH.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from irv2_pipeline.datasets import HTMLReportDataset
from irv2_pipeline.pipelines.evaluation.nodes import write_html_report
from irv2_pipeline.pipelines.evaluation.report import (
    FINDINGS_HEADING,
    findings_section,
    image,
    markdown_table,
)
from irv2_pipeline.pipelines.evaluation.report_html import render_html_report
from irv2_pipeline.pipelines.evaluation.verdict import RULES
from tests.offline_html import open_offline, resource_urls

# The plot's colour, which nothing else on the page has: seen in a screenshot, the
# inlined image was drawn.
PLOT_GREEN = (0, 200, 0)
# In the diagnosis's order (PRIORITY): a low finding before a high one.
PLANTED = (
    ("label_conflicts", "low"),
    ("underfitting", "high"),
    ("miscalibration", "medium"),
    ("small_test_set", "low"),
)
# Rules the run gave too little to judge, as ``diagnosis_not_judged.json`` holds them.
NOT_JUDGED = [
    {"rule": "domain_gap", "reason": "model.weights is null: no source's statistics"},
    {"rule": "weak_segment", "reason": "no bin holds at least 5 of the 16 test images"},
]
JUDGED = [rule for rule in RULES if rule not in {"domain_gap", "weak_segment"}]


def finding(rule: str, severity: str) -> dict:
    """A finding as ``diagnosis.json`` holds it, its texts naming its rule."""
    return {
        "rule": rule,
        "cause": f"The {rule} cause.",
        "severity": severity,
        "suggestion": f"Change what {rule} says.",
        "parameters": [f"evaluation.diagnosis.{rule}"],
        "evidence": [f"{rule}: figure 0.42"],
    }


def markdown_report(findings: list[dict], not_judged: list[dict] = NOT_JUDGED) -> str:
    """A Markdown report in ``render_report``'s shape: intro, findings, metrics, plot."""
    metrics = pd.DataFrame({"metric": ["accuracy"], "value": [0.8125]})
    sections = [
        "# Evaluation report",
        "Backbone weights: `imagenet`; input size 299 px; 16 test images.",
        FINDINGS_HEADING,
        findings_section(findings, not_judged),
        "## Test metrics",
        markdown_table(metrics),
        "### Plots",
        image("Confusion matrix", "confusion_matrix.png"),
    ]
    return "\n\n".join(sections) + "\n"


@pytest.fixture
def findings() -> list[dict]:
    return [finding(rule, severity) for rule, severity in PLANTED]


@pytest.fixture
def page(tmp_path, findings) -> Path:
    """``report.html`` as the pipeline writes it, its plot next to it."""
    plot = np.full((80, 120, 3), PLOT_GREEN, dtype=np.uint8)
    Image.fromarray(plot).save(tmp_path / "confusion_matrix.png")
    dataset = HTMLReportDataset(filepath=str(tmp_path / "report.html"))
    dataset.save(
        write_html_report(
            markdown_report(findings), findings, NOT_JUDGED, {"fail_on": "none"}
        )
    )
    return tmp_path / "report.html"


def section(markdown: str, heading: str) -> str:
    """The text under a ``## `` heading, up to the next one."""
    return markdown.split(f"\n\n{heading}\n\n", 1)[1].split("\n\n## ", 1)[0]


def test_the_verdict_comes_first_and_is_the_worst_severity(findings):
    markdown = render_html_report(
        markdown_report(findings), findings, NOT_JUDGED, "none"
    )
    title, verdict, introduction = markdown.split("\n\n")[:3]
    assert title == "# Evaluation report"
    assert verdict == (
        '<p class="verdict high">Didn&#x27;t pass: 4 of the '
        f"{len(JUDGED)} rules that judged this run raised a finding (1 high, 1 "
        "medium, 2 low). At evaluation.fail_on = none the run does not fail on them. "
        "2 more had too little to judge (Not run).</p>"
    )
    assert introduction.startswith("Backbone weights: `imagenet`")


def test_the_verdict_says_when_fail_on_fails_the_run(findings):
    markdown = render_html_report(
        markdown_report(findings), findings, NOT_JUDGED, "medium"
    )
    assert (
        "2 at or above evaluation.fail_on = medium: the run fails once its reports "
        "are written." in markdown
    )


def test_didnt_pass_lists_the_findings_most_severe_first_with_evidence_and_fix(
    findings,
):
    markdown = render_html_report(
        markdown_report(findings), findings, NOT_JUDGED, "none"
    )
    failed = section(markdown, "## Didn't pass")
    assert re.findall(r"^\d+\. \*\*(\w+)\*\* \((\w+)\)", failed, re.M) == [
        ("underfitting", "high"),
        ("miscalibration", "medium"),
        ("label_conflicts", "low"),
        ("small_test_set", "low"),
    ]
    for rule, _ in PLANTED:
        assert f"   - {rule}: figure 0.42" in failed
        assert f"   - *What to change:* Change what {rule} says." in failed


def test_passed_lists_the_other_rules_that_judged_and_not_run_says_why(findings):
    markdown = render_html_report(
        markdown_report(findings), findings, NOT_JUDGED, "none"
    )
    passed = section(markdown, "## Passed")
    others = [rule for rule in JUDGED if rule not in dict(PLANTED)]
    assert passed.startswith(f"{len(others)} rules raised no finding: `")
    assert re.findall(r"`(\w+)`", passed) == others
    assert section(markdown, "## Not run").splitlines() == [
        f"- `{rule['rule']}`: {rule['reason']}" for rule in NOT_JUDGED
    ]


def test_not_run_says_none_when_every_rule_judged(findings):
    markdown = render_html_report(markdown_report(findings, []), findings, [], "none")
    assert section(markdown, "## Not run") == (
        "None: every rule of the diagnosis judged this run."
    )
    others = [rule for rule in RULES if rule not in dict(PLANTED)]
    assert re.findall(r"`(\w+)`", section(markdown, "## Passed")) == others


def test_the_markdown_reports_own_findings_give_way_and_the_rest_follows(findings):
    markdown = render_html_report(
        markdown_report(findings), findings, NOT_JUDGED, "none"
    )
    assert FINDINGS_HEADING not in markdown
    assert markdown.count("The underfitting cause.") == 1
    assert markdown.count(NOT_JUDGED[0]["reason"]) == 1
    headings = re.findall(r"^#+ .*$", markdown, re.M)
    assert headings == [
        "# Evaluation report",
        "## Didn't pass",
        "## Passed",
        "## Not run",
        "## Test metrics",
        "### Plots",
    ]
    assert "| accuracy | 0.8125 |" in markdown


def test_a_run_without_findings_passed():
    markdown = render_html_report(markdown_report([]), [], NOT_JUDGED, "low")
    assert (
        f'<p class="verdict passed">Passed: none of the {len(JUDGED)} rules that '
        "judged this run raised a finding. 2 more had too little to judge (Not "
        "run).</p>"
    ) in markdown
    assert section(markdown, "## Didn't pass") == "No rule raised a finding."
    assert re.findall(r"`(\w+)`", section(markdown, "## Passed")) == JUDGED


def test_a_report_without_its_findings_section_is_refused():
    with pytest.raises(ValueError, match="evaluation_report has no '## Findings'"):
        render_html_report("# Evaluation report\n\nNothing else.\n", [], [], "none")


def test_the_page_is_one_file_with_its_plot_inline_and_no_remote_resource(page):
    assert sorted(path.name for path in page.parent.iterdir()) == [
        "confusion_matrix.png",
        "report.html",
    ]
    html = page.read_text()
    urls = resource_urls(html)
    assert len(urls) == 1 and urls[0].startswith("data:image/png;base64,")
    assert not [url for url in urls if re.match(r"https?:", url, re.I)]
    assert '<p class="verdict high">Didn&#x27;t pass' in html
    assert "<h2>Didn't pass</h2>" in html


def test_chromium_renders_the_page_offline(page, tmp_path):
    shown, requests = open_offline(page, ["--dump-dom"], tmp_path / "profile")
    assert requests == []
    (verdict,) = re.findall(r'<p class="verdict high">([^<]*)</p>', shown.stdout)
    assert verdict.startswith("Didn't pass: 4 of the")
    assert "<h2>Passed</h2>" in shown.stdout


def test_chromium_draws_the_verdict_and_the_inlined_plot(page, tmp_path):
    shot = tmp_path / "report.png"
    _, requests = open_offline(page, [f"--screenshot={shot}"], tmp_path / "profile")
    assert requests == []
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.min() < 80, "no dark text drawn"
    plot = np.all(np.abs(pixels - PLOT_GREEN) <= 8, axis=-1)
    assert plot.sum() >= 120 * 80, "the inlined plot was not drawn"


def test_the_offline_check_sees_a_page_that_fetches(tmp_path):
    fetching = tmp_path / "fetching.html"
    fetching.write_text(
        '<!DOCTYPE html><html><head><link rel="stylesheet" '
        'href="https://fonts.offline-check.example/font.css"></head>'
        '<body><img src="http://offline-check.example/pixel.png"></body></html>'
    )
    _, requests = open_offline(fetching, ["--dump-dom"], tmp_path / "profile")
    assert "GET http://offline-check.example/pixel.png HTTP/1.1" in requests
    assert "CONNECT fonts.offline-check.example:443 HTTP/1.1" in requests
