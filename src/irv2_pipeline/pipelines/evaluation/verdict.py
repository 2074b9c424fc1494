"""The diagnosis as a verdict: JUnit XML, ``evaluation.fail_on`` and a summary line.

CI systems read JUnit XML: one test case per diagnosis rule, failed when the rule
raised a finding (its severity as the failure's type, its cause as the message, the
evidence and suggestion as the text), skipped when the run gave it too little to
judge (why as the message), passed otherwise. ``evaluation.fail_on`` turns
findings into a failed run: at ``high``, a high finding fails it; at ``low``, any.
The HTML report opens with :func:`summary`, the same verdict in words.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any

from .diagnosis import PRIORITY, SEVERITIES

# Every rule of the diagnosis, in priority order: one test case each.
RULES = tuple(rule for peers in PRIORITY for rule in peers)
# evaluation.fail_on's values, from never failing to failing on any finding.
FAIL_ON = ("none", "high", "medium", "low")


class DiagnosisVerdictError(RuntimeError):
    """The diagnosis raised a finding at or above ``evaluation.fail_on``."""


def all_rules(findings: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """:data:`RULES`, then the rules of findings it lacks (sorted), which fail too."""
    unknown = sorted({finding["rule"] for finding in findings} - set(RULES))
    return RULES + tuple(unknown)


def rules_judged(
    findings: Sequence[Mapping[str, Any]], not_judged: Sequence[Mapping[str, str]]
) -> tuple[str, ...]:
    """:func:`all_rules` but those that had too little to judge this run."""
    skipped = {rule["rule"] for rule in not_judged}
    return tuple(rule for rule in all_rules(findings) if rule not in skipped)


def junit_xml(
    findings: Sequence[Mapping[str, Any]], not_judged: Sequence[Mapping[str, str]]
) -> str:
    """The diagnosis as a JUnit XML report, one test case per rule of :data:`RULES`.

    Args:
        findings: ``diagnosis``: dicts with ``rule``, ``severity``, ``cause``,
            ``evidence``, ``suggestion``.
        not_judged: ``diagnosis_not_judged``: dicts with ``rule`` and ``reason``.

    Returns:
        The XML document, declaration included.
    """
    raised = {finding["rule"]: finding for finding in findings}
    skipped = {rule["rule"]: rule["reason"] for rule in not_judged}
    rules = all_rules(findings)
    suite = ET.Element(
        "testsuite",
        name="diagnosis",
        tests=str(len(rules)),
        failures=str(len(raised)),
        errors="0",
        skipped=str(len(skipped)),
    )
    for rule in rules:
        case = ET.SubElement(suite, "testcase", classname="diagnosis", name=rule)
        if rule in skipped:
            ET.SubElement(case, "skipped", message=skipped[rule])
        finding = raised.get(rule)
        if finding is None:
            continue
        failure = ET.SubElement(
            case,
            "failure",
            type=finding["severity"],
            message=f"{finding['severity']}: {finding['cause']}",
        )
        failure.text = "\n".join(
            [*finding["evidence"], f"What to change: {finding['suggestion']}"]
        )
    root = ET.Element("testsuites", name="irv2_pipeline evaluation")
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def at_or_above(
    findings: Sequence[Mapping[str, Any]], fail_on: str
) -> list[Mapping[str, Any]]:
    """The findings whose severity is at or above ``fail_on`` (none for ``none``).

    Raises:
        ValueError: ``fail_on`` is not one of :data:`FAIL_ON`.
    """
    if fail_on not in FAIL_ON:
        raise ValueError(
            f"evaluation.fail_on = {fail_on!r}: use one of {', '.join(FAIL_ON)}"
        )
    if fail_on == "none":
        return []
    failing = SEVERITIES[: SEVERITIES.index(fail_on) + 1]
    return [finding for finding in findings if finding["severity"] in failing]


def enforce_fail_on(findings: Sequence[Mapping[str, Any]], fail_on: str) -> None:
    """Raises when a finding is at or above ``fail_on``.

    Raises:
        DiagnosisVerdictError: Naming each such finding, its severity and cause.
    """
    failing = at_or_above(findings, fail_on)
    if failing:
        raise DiagnosisVerdictError(
            f"The diagnosis raised {len(failing)} finding(s) at or above "
            f"evaluation.fail_on = {fail_on} (the reports are written; see "
            "diagnosis.json, evaluation_report.md and report.html):\n"
            + "\n".join(
                f"  - {f['rule']} ({f['severity']}): {f['cause']}" for f in failing
            )
        )


def worst_severity(findings: Sequence[Mapping[str, Any]]) -> str | None:
    """The most severe severity among ``findings``; ``None`` when there is none."""
    return next(
        (severity for severity in SEVERITIES if at_or_above(findings, severity)), None
    )


def summary(
    findings: Sequence[Mapping[str, Any]],
    not_judged: Sequence[Mapping[str, str]],
    fail_on: str,
) -> str:
    """The verdict in one or two sentences: passed or not, and what ``fail_on`` does.

    Args:
        findings: ``diagnosis``.
        not_judged: ``diagnosis_not_judged``.
        fail_on: ``evaluation.fail_on``.

    Returns:
        "Passed: ..." when no rule raised a finding, else "Didn't pass: ..." with
        the findings per severity and whether ``fail_on`` fails the run on them;
        either way how many rules had too little to judge.
    """
    judged = len(rules_judged(findings, not_judged))
    unjudged = (
        f" {len(not_judged)} more had too little to judge (Not run)."
        if not_judged
        else ""
    )
    if not findings:
        return (
            f"Passed: none of the {judged} rules that judged this run raised a "
            f"finding.{unjudged}"
        )
    counts = ", ".join(
        f"{count} {severity}"
        for severity in SEVERITIES
        if (count := sum(f["severity"] == severity for f in findings))
    )
    raised = len({finding["rule"] for finding in findings})
    failing = at_or_above(findings, fail_on)
    consequence = (
        f"{len(failing)} at or above evaluation.fail_on = {fail_on}: the run fails "
        "once its reports are written."
        if failing
        else f"At evaluation.fail_on = {fail_on} the run does not fail on them."
    )
    return (
        f"Didn't pass: {raised} of the {judged} rules that judged this run raised "
        f"a finding ({counts}). {consequence}{unjudged}"
    )
