"""The evaluation report: one Markdown file that reads without Kedro."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from irv2_pipeline.sources import planned_source

from .diagnosis import stages_of

METRIC_LABELS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro F1",
    "top_k_accuracy": "top-{k} accuracy",
    "ece": "expected calibration error",
    "mean_confidence": "mean confidence",
    "log_loss": "log loss",
}


# The HTML report (report_html) puts its own findings sections in place of this one.
FINDINGS_HEADING = "## Findings"
COUNTERFACTUALS_HEADING = "## What each fix was worth on your data"
# The measurement is a pipeline of its own (it trains every variant again), so the
# default DAG never waits for it; this section says where its result is.
COUNTERFACTUALS_POINTER = (
    "The findings say which causes are present, not what each one cost. "
    "`kedro run --pipeline counterfactuals` measures that: it trains the textbook "
    "recipes and ours with one thing changed at a time, on these splits, and "
    "compares each with ours on the same test images (paired differences, 95% "
    "intervals, which differences are within noise), in "
    "[counterfactual_report.md](counterfactual_report.md) next to this report."
)

TIMINGS_HEADING = "## Where the time went"
# The run's node timings are complete only once its last node has ended, after this
# report: the hook that records them writes them to a page of their own.
TIMINGS_POINTER = (
    "Each node's wall time, CPU time and memory are written when the `kedro run` "
    "ends, after this report: the longest nodes in "
    "[node_timings.md](node_timings.md) next to this report, every node in "
    "`node_timings.csv`. A later run replaces them with its own."
)


def cell(value: Any) -> str:
    """One table cell: numbers with 4 significant digits, pipes escaped."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (no index)."""
    if frame.empty:
        return "_(empty)_"
    lines = [
        "| " + " | ".join(cell(column) for column in frame.columns) + " |",
        "|" + "---|" * len(frame.columns),
    ]
    lines += [
        "| " + " | ".join(cell(value) for value in row) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join(lines)


def metrics_table(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """The headline metrics with their 95% bootstrap intervals where there are some."""
    rows = []
    for key, label in METRIC_LABELS.items():
        if key not in metrics:
            continue
        interval = metrics.get(f"{key}_ci95")
        rows.append(
            {
                "metric": label.format(k=metrics.get("top_k")),
                "value": metrics[key],
                "95% interval": f"[{interval[0]:.3f}, {interval[1]:.3f}]"
                if interval
                else "",
            }
        )
    return pd.DataFrame(rows)


def stage_summary(history: pd.DataFrame) -> pd.DataFrame:
    """One row per stage: epochs run, last training accuracy, best validation figures."""
    rows = []
    for stage, epochs in stages_of(history):
        best = (
            epochs.loc[epochs["val_loss"].idxmin()]
            if epochs["val_loss"].notna().any()
            else None
        )
        row = {
            "stage": stage,
            "epochs": len(epochs),
            "last train accuracy": epochs["accuracy"].iloc[-1],
            "best val loss": best["val_loss"] if best is not None else math.nan,
            "val accuracy there": best["val_accuracy"]
            if best is not None
            else math.nan,
        }
        if "learning_rate" in epochs.columns:
            row["learning rate (max)"] = epochs["learning_rate"].max()
        rows.append(row)
    return pd.DataFrame(rows)


def finding_item(number: int, finding: Mapping[str, Any]) -> str:
    """One finding as a numbered Markdown list item: its evidence, then its fix."""
    lines = [f"{number}. **{finding['rule']}** ({finding['severity']}): "]
    lines[0] += finding["cause"]
    lines += [f"   - {line}" for line in finding["evidence"]]
    lines.append(f"   - *What to change:* {finding['suggestion']}")
    if finding["parameters"]:
        names = ", ".join(f"`{name}`" for name in finding["parameters"])
        lines.append(f"   - *Parameters:* {names}")
    return "\n".join(lines)


def findings_section(
    findings: Sequence[Mapping[str, Any]],
    not_judged: Sequence[Mapping[str, str]] = (),
) -> str:
    """The diagnosis in its order (the cause that explains the others first), then
    the rules that had too little to judge, with why."""
    lines = (
        [finding_item(number, finding) for number, finding in enumerate(findings, 1)]
        if findings
        else ["No rule found a problem in this run."]
    )
    if not_judged:
        lines += ["", "Not judged in this run (too little to go on, which is no pass):"]
        lines += [""] + [f"- `{rule['rule']}`: {rule['reason']}" for rule in not_judged]
    return "\n".join(lines)


def dataset_section(summary: Mapping[str, Any]) -> str:
    """Counts per class and split, rejections, duplicates and warnings."""
    counts = pd.DataFrame(summary.get("counts", {})).T.rename_axis("class")
    lines = [
        f"{summary.get('n_images', '?')} images used, "
        f"{summary.get('n_rejected', '?')} files rejected; "
        f"{summary.get('duplicate_groups', '?')} duplicate groups "
        f"({summary.get('images_in_duplicate_groups', '?')} images), "
        f"{summary.get('label_conflict_groups', '?')} with conflicting labels.",
        "",
        markdown_table(counts.reset_index()),
    ]
    rejected = summary.get("rejected_by_reason") or {}
    if rejected:
        lines += ["", "Rejected files by reason:", ""]
        lines += [f"- {reason}: {count}" for reason, count in rejected.items()]
    warnings = summary.get("warnings") or []
    if warnings:
        lines += ["", "Warnings:", ""] + [f"- {warning}" for warning in warnings]
    return "\n".join(lines)


def plan_section(plan: Mapping[str, Any], stages_trained: pd.DataFrame) -> str:
    """The stages that were planned, the reasons given, and the stages trained."""
    lines = [f"**Warning:** {warning}" for warning in plan.get("warnings") or []]
    lines += [""] if lines else []
    lines += [
        "Planned by feature_shift:",
        "",
        markdown_table(pd.DataFrame(plan.get("stages", []))),
    ]
    rationale = plan.get("rationale") or []
    if rationale:
        lines += ["", "Why:", ""] + [f"- {reason}" for reason in rationale]
    lines += [
        "",
        "Trained by finetune (its parameters may override the plan):",
        "",
        markdown_table(stages_trained),
    ]
    return "\n".join(lines)


def occlusion_section(occlusion_flips: pd.DataFrame) -> str:
    """The occlusion test per class, and what it can and cannot show."""
    if occlusion_flips.empty:
        return "_(no test images)_"
    first = occlusion_flips.iloc[0]
    return "\n\n".join(
        [
            f"Every test image predicted again with a border band masked "
            f"({first['border_px']} px), then a centre square of the same area "
            f"({first['centre_px']} px), then that square at "
            f"{first['random_patches']} random places: how many predictions change, "
            "per true class. A model that reads the object changes its mind when the "
            "centre goes; one that keys on something at the edges (a mark, a frame) "
            "when the border goes. The random places say how much hiding that many "
            "pixels changes anywhere (`random_flip_rate_*`: least, median, most); "
            "`border_p_value` is the share of them that change at least as many "
            "predictions as the border, the border counted in "
            "((1 + #) / (1 + places)). This shows what the model *uses*, on these "
            "images; it "
            "cannot say why a cue is there, nor find one in the centre. The Grad-CAM "
            "heatmaps (Plots) show where the evidence for the predicted class lies.",
            markdown_table(occlusion_flips),
        ]
    )


def label_issues_section(
    estimate: Mapping[str, Any], issues: pd.DataFrame, shown: int = 10
) -> str:
    """Confident learning's noise estimates per class and the most suspect images."""
    lines = [
        f"{estimate['statement'][0].upper()}{estimate['statement'][1:]}.",
        "",
        f"Method: {estimate['method']}; {estimate['features']}; "
        f"{estimate['folds']} folds, C = {estimate['c']:g}, seed {estimate['seed']}.",
    ]
    if not estimate.get("estimated"):
        return "\n".join(lines)
    per_class = pd.DataFrame(estimate["classes"]).rename(
        columns={
            "training_images": "training images",
            "noise_rate": "noise rate",
            "mislabelled_share": "mislabelled share",
            "flagged": "flagged under this label",
        }
    )
    lines += [
        "",
        "Estimated noise per class: the noise rate is the share of the class's "
        "images filed under another label, the mislabelled share the share of the "
        "images labelled with it that belong to another class.",
        "",
        markdown_table(per_class),
    ]
    if len(issues):
        lines += [
            "",
            f"Most suspect training images ({min(shown, len(issues))} of "
            f"{len(issues)}; all in label_issues.csv):",
            "",
            markdown_table(issues.head(shown)),
        ]
    return "\n".join(lines)


def image(title: str, file_name: str) -> str:
    """A Markdown image linked relative to the report."""
    return f"![{title}]({file_name})"


def render_report(
    *,
    metrics: Mapping[str, Any],
    classification_report: pd.DataFrame,
    findings: Sequence[Mapping[str, Any]],
    not_judged: Sequence[Mapping[str, str]],
    training_history: pd.DataFrame,
    shift_by_block: pd.DataFrame,
    split_shift: pd.DataFrame,
    transferability: pd.DataFrame,
    source_ranking: pd.DataFrame,
    finetune_plan: Mapping[str, Any],
    finetune_stages: pd.DataFrame,
    dataset_summary: Mapping[str, Any],
    occlusion_flips: pd.DataFrame,
    label_noise: Mapping[str, Any],
    label_issues: pd.DataFrame,
    model: Mapping[str, Any],
    plots: Mapping[str, str],
    upstream_plots: Mapping[str, str],
) -> str:
    """Puts every part of the evaluation into one Markdown document.

    Args:
        metrics: ``evaluation_metrics``.
        classification_report: Per-class precision, recall, F1 and support.
        findings: ``diagnosis``.
        not_judged: ``diagnosis_not_judged``: the rules that could not judge.
        training_history: One row per epoch of every stage.
        shift_by_block: Mean and maximum BN shift per IRv2 block.
        split_shift: The split-shift table of ``feature_shift``.
        transferability: The transferability table of ``feature_shift``.
        source_ranking: The candidate sources, best first (``feature_shift``).
        finetune_plan: The plan ``feature_shift`` made, with its rationale and the
            source it chose.
        finetune_stages: The stages ``finetune`` trained, one row each.
        dataset_summary: ``dataset_summary`` from ingestion.
        occlusion_flips: The occlusion test per class.
        label_noise: ``label_noise_estimate``, confident learning's estimates.
        label_issues: The training images flagged as probably mislabelled.
        model: The ``model`` parameters (``image_size``).
        plots: Plot title to file name, relative to the report.
        upstream_plots: The same for the plots of the pipelines before.

    Returns:
        The report as Markdown.
    """
    source = planned_source(finetune_plan)
    weights = source.weights
    classes = metrics.get("classes", [])
    sections = [
        "# Evaluation report",
        f"Backbone: source `{source.name}`, weights "
        f"`{'null (random init)' if weights is None else weights}`, preprocessing "
        f"`{source.preprocessing}`, grayscale `{source.grayscale}`; "
        f"input size {model.get('image_size')} px; "
        f"{metrics['n_test']} test images in {len(classes)} classes "
        f"({', '.join(classes)}).",
        FINDINGS_HEADING,
        findings_section(findings, not_judged),
        COUNTERFACTUALS_HEADING,
        COUNTERFACTUALS_POINTER,
        "## Test metrics",
        "Intervals are 95% percentile-bootstrap intervals over the test images.",
        markdown_table(metrics_table(metrics)),
    ]
    if "tta" in metrics:
        sections += [
            "Test-time augmentation (average with the horizontally flipped image), "
            "reported separately:",
            markdown_table(metrics_table(metrics["tta"])),
        ]
    sections += [
        "### Per class",
        markdown_table(classification_report),
        "### Plots",
        "\n\n".join(image(title, file_name) for title, file_name in plots.items()),
        "### Plots of the earlier pipelines",
        "\n\n".join(
            image(title, file_name) for title, file_name in upstream_plots.items()
        ),
        "## Where the model looks",
        occlusion_section(occlusion_flips),
        "## Training",
        markdown_table(stage_summary(training_history)),
        "## Fine-tuning plan",
        plan_section(finetune_plan, finetune_stages),
        "## Source-to-target shift per block",
        (
            "_The backbone started from random weights: these figures compare with "
            "random-init statistics, not a source's, and mean nothing._\n\n"
            if weights is None
            else ""
        )
        + "Symmetric KL divergence between the stored BatchNorm statistics of the "
        "weights' source (ImageNet, or a local file's) and this data's: per BN layer "
        "the median over its channels, per block the mean over its layers. 1.0 is a "
        "mean moved by 1.4 standard deviations in half the channels.\n\n"
        + markdown_table(shift_by_block),
        "## Shift between the splits",
        markdown_table(split_shift),
        "## Transferability of frozen features",
        markdown_table(transferability),
        "## Candidate sources",
        f"{finetune_plan['source_reason']}\n\n{markdown_table(source_ranking)}",
        "## Training labels",
        label_issues_section(label_noise, label_issues),
        "## Dataset",
        dataset_section(dataset_summary),
        TIMINGS_HEADING,
        TIMINGS_POINTER,
    ]
    return "\n\n".join(sections) + "\n"
