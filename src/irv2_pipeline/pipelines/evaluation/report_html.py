"""The HTML report's content: the verdict, the findings by outcome, the Markdown report.

``report_html`` is the Markdown report with its findings section replaced by a verdict
(:func:`verdict.summary`) and three sections: the rules that raised a finding (most
severe first, each with its evidence and its fix), the rules that raised none, and the
rules that did not run because this run gave them too little to judge, each with why. ``HTMLReportDataset`` renders it to one offline page.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from .diagnosis import SEVERITIES
from .report import FINDINGS_HEADING, finding_item
from .verdict import rules_judged, summary, worst_severity

DIDNT_PASS_HEADING = "## Didn't pass"
PASSED_HEADING = "## Passed"
NOT_RUN_HEADING = "## Not run"


def verdict_block(
    findings: Sequence[Mapping[str, Any]],
    not_judged: Sequence[Mapping[str, str]],
    fail_on: str,
) -> str:
    """The verdict as one line of raw HTML, classed by the worst severity for colour."""
    outcome = worst_severity(findings) or "passed"
    line = html.escape(summary(findings, not_judged, fail_on))
    return f'<p class="verdict {outcome}">{line}</p>'


def didnt_pass_section(findings: Sequence[Mapping[str, Any]]) -> str:
    """The findings, most severe first (the diagnosis's order within a severity)."""
    if not findings:
        return "No rule raised a finding."
    ordered = sorted(
        findings, key=lambda finding: SEVERITIES.index(finding["severity"])
    )
    return "\n".join(
        finding_item(number, finding) for number, finding in enumerate(ordered, 1)
    )


def passed_section(
    findings: Sequence[Mapping[str, Any]], not_judged: Sequence[Mapping[str, str]]
) -> str:
    """The rules that judged this run and raised no finding, in the diagnosis's order."""
    raised = {finding["rule"] for finding in findings}
    passed = [rule for rule in rules_judged(findings, not_judged) if rule not in raised]
    if not passed:
        return "Every rule that judged this run raised a finding."
    names = ", ".join(f"`{rule}`" for rule in passed)
    return f"{len(passed)} rules raised no finding: {names}."


def not_run_section(not_judged: Sequence[Mapping[str, str]]) -> str:
    """The rules this run gave too little to judge, each with why."""
    if not not_judged:
        return "None: every rule of the diagnosis judged this run."
    return "\n".join(f"- `{rule['rule']}`: {rule['reason']}" for rule in not_judged)


def split_findings_out(report: str) -> tuple[str, str]:
    """The Markdown report before its findings section, and after it.

    Raises:
        ValueError: The report has no findings section.
    """
    head, found, tail = report.partition(f"\n\n{FINDINGS_HEADING}\n\n")
    if not found:
        raise ValueError(
            f"evaluation_report has no {FINDINGS_HEADING!r} section: write it with "
            "this version's `kedro run --pipeline evaluation`"
        )
    _, _, after = tail.partition("\n\n## ")
    return head, f"## {after}" if after else ""


def render_html_report(
    report: str,
    findings: Sequence[Mapping[str, Any]],
    not_judged: Sequence[Mapping[str, str]],
    fail_on: str,
) -> str:
    """The Markdown of ``report_html``: verdict, findings by outcome, then the rest.

    Args:
        report: ``evaluation_report``, the Markdown report.
        findings: ``diagnosis``.
        not_judged: ``diagnosis_not_judged``.
        fail_on: ``evaluation.fail_on``, which the verdict says the effect of.

    Returns:
        Markdown, the verdict a raw HTML paragraph in it.
    """
    head, rest = split_findings_out(report)
    title, _, introduction = head.partition("\n\n")
    sections = [
        title,
        verdict_block(findings, not_judged, fail_on),
        introduction,
        DIDNT_PASS_HEADING,
        didnt_pass_section(findings),
        PASSED_HEADING,
        passed_section(findings, not_judged),
        NOT_RUN_HEADING,
        not_run_section(not_judged),
        rest,
    ]
    return "\n\n".join(section for section in sections if section)
