"""The diagnosis as a machine-readable verdict: JUnit XML and ``evaluation.fail_on``.

CI systems read JUnit XML: one test case per diagnosis rule, failed when the rule
raised a finding (its severity as the failure's type, its cause as the message, the
evidence and suggestion as the text), passed otherwise. ``evaluation.fail_on`` turns
findings into a failed run: at ``high``, a high finding fails it; at ``low``, any.
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


def junit_xml(findings: Sequence[Mapping[str, Any]]) -> str:
    """The findings as a JUnit XML report, one test case per rule of :data:`RULES`.

    Args:
        findings: ``diagnosis``: dicts with ``rule``, ``severity``, ``cause``,
            ``evidence``, ``suggestion``.

    Returns:
        The XML document, declaration included.
    """
    raised = {finding["rule"]: finding for finding in findings}
    unknown = sorted(set(raised) - set(RULES))
    rules = RULES + tuple(unknown)
    suite = ET.Element(
        "testsuite",
        name="diagnosis",
        tests=str(len(rules)),
        failures=str(len(raised)),
        errors="0",
        skipped="0",
    )
    for rule in rules:
        case = ET.SubElement(suite, "testcase", classname="diagnosis", name=rule)
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
            "diagnosis.json and evaluation_report.md):\n"
            + "\n".join(
                f"  - {f['rule']} ({f['severity']}): {f['cause']}" for f in failing
            )
        )
