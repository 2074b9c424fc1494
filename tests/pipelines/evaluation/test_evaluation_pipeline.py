"""The pipeline as Kedro runs it: its catalog, the saved files, the report."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from kedro.io import DataCatalog
from kedro.runner import SequentialRunner
from kedro_datasets.tensorflow import TensorFlowModelDataset
from kedro_viz.models.flowchart.node_metadata import DataNodeMetadata
from kedro_viz.models.flowchart.nodes import GraphNode
from sklearn import metrics as skm

from irv2_pipeline.datasets import MarkdownReportDataset
from irv2_pipeline.pipelines.evaluation import create_pipeline, verdict
from tests.conftest import project_parameters
from tests.offline_html import resource_urls

from .conftest import (
    CLASSES,
    PROJECT_ROOT,
    colour_classifier,
    load_parameters,
    pipeline_parameters,
    upstream_outputs,
    write_colour_images,
)

CATALOG = PROJECT_ROOT / "conf" / "base" / "catalog_evaluation.yml"


def catalog_config(root: Path) -> dict:
    """``catalog_evaluation.yml`` with every file moved under ``root``."""
    config = yaml.safe_load(CATALOG.read_text())
    for entry in config.values():
        entry["filepath"] = str(root / entry["filepath"])
    return config


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Path:
    """Runs the pipeline once with this project's catalog; returns the run's root."""
    root = tmp_path_factory.mktemp("evaluation_run")
    folder, manifest = write_colour_images(root / "images")
    catalog = DataCatalog.from_config(catalog_config(root))
    model_file = TensorFlowModelDataset(
        filepath=str(root / "data/06_models/finetuned_model.keras")
    )
    model_file.save(colour_classifier())
    catalog["finetuned_model"] = model_file  # reloaded in Keras safe mode
    catalog["image_manifest"] = manifest
    catalog["raw_images"] = folder
    for name, data in {**upstream_outputs(manifest), **pipeline_parameters()}.items():
        catalog[name] = data
    SequentialRunner().run(create_pipeline(), catalog)
    return root


def test_the_run_writes_every_output(evaluated):
    config = yaml.safe_load(CATALOG.read_text())
    for name, entry in config.items():
        assert (evaluated / entry["filepath"]).is_file(), name


def test_saved_metrics_equal_those_recomputed_from_the_saved_predictions(evaluated):
    predictions = pd.read_csv(evaluated / "data/07_model_output/test_predictions.csv")
    metrics = json.loads(
        (evaluated / "data/08_reporting/evaluation_metrics.json").read_text()
    )
    assert metrics["n_test"] == len(predictions) == 6
    assert metrics["accuracy"] == skm.accuracy_score(
        predictions["label"], predictions["predicted"]
    )
    assert metrics["balanced_accuracy"] == skm.balanced_accuracy_score(
        predictions["label"], predictions["predicted"]
    )
    assert metrics["macro_f1"] == skm.f1_score(
        predictions["label"], predictions["predicted"], average="macro"
    )
    probabilities = predictions[[f"prob_{name}" for name in CLASSES]].to_numpy()
    truth = predictions["label"].map(CLASSES.index)
    assert metrics["log_loss"] == pytest.approx(
        skm.log_loss(truth, probabilities, labels=[0, 1, 2]), rel=1e-12
    )
    low, high = metrics["accuracy_ci95"]
    assert low <= metrics["accuracy"] <= high


def test_label_issues_cover_exactly_the_training_images(evaluated):
    estimate = json.loads(
        (evaluated / "data/08_reporting/label_noise_estimate.json").read_text()
    )
    # Two training images per class, each its own group: two folds.
    assert estimate["estimated"] is True
    assert estimate["n_images"] == 6 and estimate["folds"] == 2
    assert [row["training_images"] for row in estimate["classes"]] == [2, 2, 2]
    issues = pd.read_csv(evaluated / "data/07_model_output/label_issues.csv")
    assert set(issues["path"]) <= {f"{c}/{c}_{i}.png" for c in CLASSES for i in (0, 1)}


def test_the_report_links_plots_that_exist_next_to_it(evaluated):
    report_path = evaluated / "data/08_reporting/evaluation_report.md"
    report = report_path.read_text()
    for heading in (
        "## Findings",
        "## What each fix was worth on your data",
        "## Test metrics",
        "## Training",
        "## Fine-tuning plan",
        "## Source-to-target shift per block",
        "## Shift between the splits",
        "## Transferability of frozen features",
        "## Training labels",
        "## Dataset",
        "## Where the model looks",
    ):
        assert heading in report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    report_params = pipeline_parameters()["params:evaluation"]["report"]
    own = list(report_params["plots"].values())
    assert links == own + list(report_params["upstream_plots"].values())
    for link in own:
        assert (report_path.parent / link).is_file(), link
    assert "| accuracy | 0.8333 | [" in report
    assert "[counterfactual_report.md](counterfactual_report.md)" in report
    assert report.rstrip().endswith("A later run replaces them with its own.")
    assert "## Where the time went" in report
    assert "[node_timings.md](node_timings.md)" in report
    assert "**small_test_set** (low)" in report


def test_the_report_previews_as_html_with_its_plots_inlined(evaluated):
    dataset = MarkdownReportDataset(
        filepath=str(evaluated / "data/08_reporting/evaluation_report.md")
    )
    html = dataset.preview()
    assert "<h2>Findings</h2>" in html
    assert "<table>" in html
    # Every plot of evaluation's own is inlined (the upstream ones are links).
    own_plots = project_parameters("base")["evaluation"]["report"]["plots"]
    assert html.count('src="data:image/png;base64,') == len(own_plots) == 6


def test_the_html_report_holds_the_reports_plots_and_tables_inline(evaluated):
    page = (evaluated / "data/08_reporting/report.html").read_text()
    markdown = (evaluated / "data/08_reporting/evaluation_report.md").read_text()
    findings = json.loads((evaluated / "data/08_reporting/diagnosis.json").read_text())
    # Its verdict is "Didn't pass" at the finding's severity. A handful of test
    # images: their ECE passes max_ece, but no more than a calibrated model's does on
    # as few, so miscalibration stays silent.
    assert [finding["rule"] for finding in findings] == ["small_test_set"]
    reports = evaluated / "data/08_reporting"
    metrics = json.loads((reports / "evaluation_metrics.json").read_text())
    assert metrics["ece"] > 0.1 and metrics["ece_p_value"] >= 0.05
    not_judged = json.loads((reports / "diagnosis_not_judged.json").read_text())
    outcome = verdict.worst_severity(findings)
    line = html.escape(verdict.summary(findings, not_judged, "none"))
    assert f'<p class="verdict {outcome}">{line}</p>' in page
    # A handful of test images: too few for the KS test, a class or a slice.
    assert [rule["rule"] for rule in not_judged] == [
        "image_property_drift",
        "class_imbalance",
        "weak_segment",
    ]
    for rule in not_judged:
        assert f"<code>{rule['rule']}</code>: {html.escape(rule['reason'])}" in page
        assert f"- `{rule['rule']}`: {rule['reason']}" in markdown
    assert "<h2>Findings</h2>" not in page
    for heading in re.findall(r"^## (.+)$", markdown, re.M)[1:]:
        assert f"<h2>{heading}</h2>" in page, heading
    assert page.count("<table>") == markdown.count("\n|---")
    # The tiny run writes evaluation's own plots only: all six inlined.
    assert page.count('src="data:image/png;base64,') == 6
    assert not [url for url in resource_urls(page) if re.match(r"https?:", url)]


def test_kedro_viz_previews_metrics_plots_and_the_report(evaluated):
    catalog = DataCatalog.from_config(catalog_config(evaluated))
    expected = {
        "test_predictions": "TablePreview",
        "classification_report": "TablePreview",
        "evaluation_metrics": "JSONPreview",
        "diagnosis": "JSONPreview",
        "confusion_matrix_plot": "ImagePreview",
        "reliability_diagram_plot": "ImagePreview",
        "confidently_wrong_plot": "ImagePreview",
        "validation_curves_plot": "ImagePreview",
        "occlusion_flips": "TablePreview",
        "grad_cam_plot": "ImagePreview",
        "label_issues": "TablePreview",
        "label_noise_estimate": "JSONPreview",
        "label_issues_plot": "ImagePreview",
        "evaluation_report": "HTMLPreview",
        "report_html": "HTMLPreview",
    }
    for name, preview_type in expected.items():
        node = GraphNode.create_data_node(
            dataset_id=name,
            dataset_name=name,
            layer="reporting",
            tags=set(),
            dataset=catalog.get(name),
            modular_pipelines=set(),
        )
        metadata = DataNodeMetadata(data_node=node)
        assert metadata.preview_type == preview_type, name
        assert metadata.preview, name


def plot_files(catalog_file: Path) -> set[Path]:
    """The files of a catalog's MatplotlibDatasets."""
    config = yaml.safe_load(catalog_file.read_text()) or {}
    return {
        Path(entry["filepath"])
        for entry in config.values()
        if entry.get("type") == "irv2_pipeline.datasets.AtomicMatplotlibDataset"
    }


def test_report_plot_names_match_the_catalogs():
    config = yaml.safe_load(CATALOG.read_text())
    report_folder = Path(config["evaluation_report"]["filepath"]).parent
    report = load_parameters("parameters_evaluation")["evaluation"]["report"]
    own = {report_folder / name for name in report["plots"].values()}
    assert own == plot_files(CATALOG)
    upstream = {report_folder / name for name in report["upstream_plots"].values()}
    others = set().union(
        *(
            plot_files(path)
            for path in (PROJECT_ROOT / "conf" / "base").glob("catalog*.yml")
            if path != CATALOG
        )
    )
    assert upstream <= others


def nested_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= nested_keys(value, f"{prefix}{key}.")
    return keys


def test_the_smoke_configuration_has_every_parameter_the_pipeline_reads():
    parameters = project_parameters("smoke")
    for name in sorted(create_pipeline().inputs()):
        if not name.startswith("params:"):
            continue
        value = parameters
        for key in name.removeprefix("params:").split("."):
            assert key in value, name
            value = value[key]
