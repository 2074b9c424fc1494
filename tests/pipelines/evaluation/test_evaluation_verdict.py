"""The machine-readable verdict: JUnit XML of the diagnosis and evaluation.fail_on."""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest
from kedro.io import DataCatalog
from kedro.runner import SequentialRunner

from irv2_pipeline.parameters import parameter_problems
from irv2_pipeline.pipelines.evaluation import create_pipeline, diagnosis, verdict
from irv2_pipeline.pipelines.evaluation.label_issues import ISSUE_COLUMNS
from irv2_pipeline.pipelines.evaluation.nodes import enforce_fail_on
from tests.conftest import project_parameters

from .conftest import pipeline_parameters
from .test_evaluation_diagnosis import diagnosis_inputs  # noqa: F401 - a fixture
from .test_evaluation_pipeline import catalog_config


def planted(severity: str = "high") -> list[dict]:
    """A diagnosis with one ``leakage`` finding of ``severity`` and a low caveat."""
    leak = diagnosis.Finding(
        rule="leakage",
        cause="Copies of training images sit in the held-out splits.",
        severity=severity,
        suggestion="Set ingestion.duplicates.max_hamming to at least 4.",
        parameters=["ingestion.duplicates.max_hamming"],
        evidence=["3 of 10 test images are exact copies of training images"],
    )
    caveat = diagnosis.Finding(
        rule="small_test_set",
        cause="The test set is too small.",
        severity="low",
        suggestion="Add test images.",
        parameters=[],
        evidence=["10 test images: accuracy 0.5, 95% interval [0.2, 0.8]"],
    )
    return diagnosis.in_priority([caveat, leak])


def not_judged() -> list[dict]:
    """``domain_gap`` with too little to judge, as ``diagnosis_not_judged`` holds it."""
    return diagnosis.not_judged(
        [diagnosis.domain_gap(pd.DataFrame(), [], None, {"max_block_shift": 1.0})]
    )


def test_the_junit_xml_has_one_testcase_per_rule_and_fails_the_raised_ones():
    root = ET.fromstring(verdict.junit_xml(planted(), []))
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert [case.get("name") for case in cases] == list(verdict.RULES)
    assert suite.get("tests") == str(len(verdict.RULES))
    assert suite.get("failures") == "2"
    failed = {case.get("name"): case.find("failure") for case in cases}
    assert {name for name, failure in failed.items() if failure is not None} == {
        "leakage",
        "small_test_set",
    }
    leak = failed["leakage"]
    assert leak.get("type") == "high"
    assert leak.get("message").startswith("high: Copies of training images")
    assert "3 of 10 test images are exact copies" in leak.text
    assert "What to change: Set ingestion.duplicates.max_hamming" in leak.text


def test_the_junit_xml_of_a_clean_run_passes_every_rule():
    root = ET.fromstring(verdict.junit_xml([], []))
    assert root.find("testsuite").get("failures") == "0"
    assert root.find("testsuite").get("skipped") == "0"
    assert all(len(case) == 0 for case in root.iter("testcase"))


def test_the_junit_xml_skips_a_rule_that_could_not_judge_with_why():
    root = ET.fromstring(verdict.junit_xml(planted(), not_judged()))
    suite = root.find("testsuite")
    assert suite.get("skipped") == "1"
    assert suite.get("failures") == "2"
    skipped = {
        case.get("name"): case.find("skipped").get("message")
        for case in suite
        if case.find("skipped") is not None
    }
    assert list(skipped) == ["domain_gap"]
    assert skipped["domain_gap"].startswith("model.weights is null")


def test_every_rule_of_the_priority_is_a_testcase_once():
    assert len(set(verdict.RULES)) == len(verdict.RULES) == len(diagnosis.RANK)


@pytest.mark.parametrize(
    ("severity", "fail_on", "fails"),
    [
        ("high", "high", True),
        ("high", "none", False),
        ("medium", "high", False),
        ("medium", "medium", True),
        ("medium", "low", True),
    ],
)
def test_fail_on_fails_at_or_above_its_severity(severity, fail_on, fails):
    findings = planted(severity)
    if fails:
        with pytest.raises(verdict.DiagnosisVerdictError) as raised:
            verdict.enforce_fail_on(findings, fail_on)
        assert f"leakage ({severity}): Copies of training images" in str(raised.value)
        assert f"evaluation.fail_on = {fail_on}" in str(raised.value)
    else:
        verdict.enforce_fail_on(findings, fail_on)


def test_fail_on_low_counts_the_low_caveat_too():
    assert [f["rule"] for f in verdict.at_or_above(planted("medium"), "low")] == [
        "leakage",
        "small_test_set",
    ]


def test_the_worst_severity_is_that_of_the_most_severe_finding():
    assert verdict.worst_severity([]) is None
    low_then_medium = [{"severity": "low"}, {"severity": "medium"}]
    assert verdict.worst_severity(low_then_medium) == "medium"


def test_the_node_reads_fail_on_from_the_evaluation_parameters(evaluation_params):
    assert evaluation_params["fail_on"] == "none"  # conf/base never fails a run
    enforce_fail_on(planted(), "report", "<html>", "<testsuites/>", evaluation_params)
    with pytest.raises(verdict.DiagnosisVerdictError):
        enforce_fail_on(
            planted(),
            "report",
            "<html>",
            "<testsuites/>",
            {**evaluation_params, "fail_on": "high"},
        )


def test_an_unknown_fail_on_is_a_parameter_problem_before_the_run():
    params = copy.deepcopy(project_parameters())
    assert parameter_problems(params) == []
    params["evaluation"]["fail_on"] = "severe"
    (problem,) = parameter_problems(params)
    assert problem.key == "evaluation.fail_on"
    assert "must be 'none', 'low', 'medium' or 'high'" in problem.text
    with pytest.raises(ValueError, match="use one of none, high, medium, low"):
        verdict.at_or_above(planted(), "severe")


def run_the_verdict(root: Path, inputs: dict, upstream: dict, params: dict) -> None:
    """Runs the pipeline from ``diagnose_run`` on, its reports saved under ``root``."""
    config = catalog_config(root)
    catalog = DataCatalog.from_config(
        {name: config[name] for name in ("diagnosis", "diagnosis_not_judged")}
        | {name: config[name] for name in ("diagnosis_junit",)}
        | {name: config[name] for name in ("evaluation_report", "report_html")}
    )
    memory = {
        **{k: v for k, v in inputs.items() if k not in ("model", "plan_rules")},
        "transferability": upstream["transferability"],
        "source_ranking": upstream["source_ranking"],
        "finetune_plan": upstream["finetune_plan"],
        "label_issues": pd.DataFrame(columns=ISSUE_COLUMNS),
        "params:model": params["params:model"],
        "params:feature_shift.plan_rules": inputs["plan_rules"],
    }
    for name, data in memory.items():
        catalog[name if name != "evaluation" else "params:evaluation"] = data
    SequentialRunner().run(create_pipeline().from_nodes("diagnose_run"), catalog)


@pytest.mark.parametrize("fail_on", ["none", "low"])
def test_a_run_fails_on_fail_on_only_after_writing_every_report(
    tmp_path, request, upstream, fail_on
):
    inputs = request.getfixturevalue("diagnosis_inputs")
    params = pipeline_parameters()
    evaluation = {**inputs["evaluation"], "fail_on": fail_on}
    inputs = {**inputs, "evaluation": evaluation}
    if fail_on == "none":
        run_the_verdict(tmp_path, inputs, upstream, params)
    else:
        # The healthy run's one finding is the low small_test_set caveat.
        with pytest.raises(verdict.DiagnosisVerdictError, match="small_test_set"):
            run_the_verdict(tmp_path, inputs, upstream, params)
    reports = tmp_path / "data/08_reporting"
    findings = json.loads((reports / "diagnosis.json").read_text())
    assert [f["rule"] for f in findings] == ["small_test_set"]
    assert "small_test_set" in (reports / "evaluation_report.md").read_text()
    assert "small_test_set" in (reports / "report.html").read_text()
    suite = ET.parse(reports / "diagnosis_junit.xml").getroot().find("testsuite")
    failed = [case.get("name") for case in suite if case.find("failure") is not None]
    assert failed == ["small_test_set"]
    not_judged = json.loads((reports / "diagnosis_not_judged.json").read_text())
    skipped = [case.get("name") for case in suite if case.find("skipped") is not None]
    assert skipped == [rule["rule"] for rule in not_judged]


def test_the_verdict_is_the_pipelines_last_node():
    nodes = create_pipeline().nodes
    assert nodes[-1].name == "enforce_fail_on"
    assert "diagnosis_junit" in create_pipeline().all_outputs()
