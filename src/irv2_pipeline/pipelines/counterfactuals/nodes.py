"""Nodes of the `counterfactuals` pipeline: each variant's settings, and the summary.

Each variant trains with ``finetune``'s own node (``train_classifier``) and is scored
with ``evaluation``'s (``predict_test_split``); the nodes here only say what a variant
changes (``configure_variant``) and compare the variants on the same test images.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from irv2_pipeline.pipelines.evaluation.metrics import (
    accuracy,
    bootstrap_interval,
    classes_of,
    label_indices,
    macro_f1,
    paired_bootstrap_difference,
)
from irv2_pipeline.pipelines.evaluation.report import markdown_table
from irv2_pipeline.sources import planned_source

from .variants import (
    our_stages,
    variant_finetune,
    variant_plan_rules,
    variant_stages,
)

METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "macro_f1": macro_f1,
}
SUMMARY_COLUMNS = [
    "variant",
    "kind",
    "factor",
    "n_test",
    "accuracy",
    "accuracy_low",
    "accuracy_high",
    "macro_f1",
    "macro_f1_low",
    "macro_f1_high",
    "accuracy_difference",
    "accuracy_difference_low",
    "accuracy_difference_high",
    "macro_f1_difference",
    "macro_f1_difference_low",
    "macro_f1_difference_high",
    "within_noise",
    "epochs_trained",
    "training_seconds",
]
PREDICTIONS_SUFFIX = ".test_predictions"
STAGES_SUFFIX = ".finetune_stages"


class CounterfactualError(ValueError):
    """Variant outputs that cannot be compared; the message says why."""


def configure_variant(
    *,
    variant: dict[str, Any],
    finetune: dict[str, Any],
    finetune_plan: dict[str, Any],
    augmented_manifest: pd.DataFrame,
    plan_rules: dict[str, Any],
    variant_name: str,
) -> tuple[dict[str, Any], dict[str, Any], pd.DataFrame, dict[str, Any]]:
    """What ``train_classifier`` gets for one variant: our inputs, the variant's changes.

    Args:
        variant: ``counterfactuals.variants.<variant_name>``.
        finetune: The ``finetune`` parameters (our recipe).
        finetune_plan: Our plan (``feature_shift``).
        augmented_manifest: Our augmented copies.
        plan_rules: ``feature_shift.plan_rules``.
        variant_name: The variant's name (its namespace and folders).

    Returns:
        The variant's ``finetune`` parameters (checkpoints in their own folder), its
        plan (``stages``, ``rationale``, our ``source``), its augmented copies (none with
        ``augmented_copies: false``) and its learning-rate limits.
    """
    params = variant_finetune(variant_name, variant, finetune)
    stages = variant_stages(variant_name, variant, our_stages(finetune, finetune_plan))
    copies = (
        augmented_manifest
        if variant.get("augmented_copies", True)
        else augmented_manifest.iloc[0:0]
    )
    # Every variant fine-tunes from the source our plan chose: a variant changes
    # one factor of the recipe, not the backbone.
    plan = {
        "stages": stages,
        "rationale": [f"counterfactual variant {variant_name}: {variant['factor']}"],
        "source": planned_source(finetune_plan).as_dict(),
    }
    return params, plan, copies, variant_plan_rules(variant, plan_rules)


def configure_variant_named(name: str) -> Callable[..., Any]:
    """:func:`configure_variant` for one variant (its name bound)."""
    configured = functools.partial(configure_variant, variant_name=name)
    return functools.update_wrapper(configured, configure_variant)


def summarise_counterfactuals(
    counterfactuals: dict[str, Any],
    evaluation: dict[str, Any],
    **variant_outputs: pd.DataFrame,
) -> pd.DataFrame:
    """Per variant: test accuracy and macro F1 with 95% intervals, and the paired
    difference from the reference (ours) with its interval.

    Args:
        counterfactuals: The ``counterfactuals`` parameters (``reference``,
            ``variants``).
        evaluation: The ``evaluation`` parameters (``bootstrap``: resamples, seed).
        **variant_outputs: ``<variant>.test_predictions`` and
            ``<variant>.finetune_stages`` of every variant.

    Returns:
        ``counterfactual_summary``: one row per variant, the reference first.

    Raises:
        CounterfactualError: Variants scored on different test images, or outputs
            missing for a variant.
    """
    predictions = _by_variant(variant_outputs, PREDICTIONS_SUFFIX)
    stages = _by_variant(variant_outputs, STAGES_SUFFIX)
    if set(predictions) != set(stages):
        raise CounterfactualError(
            f"Variants with predictions {sorted(predictions)} and with training "
            f"records {sorted(stages)} differ"
        )
    reference = counterfactuals["reference"]
    if reference not in predictions:
        raise CounterfactualError(f"No predictions of the reference {reference!r}")
    truth, classes = _truth(predictions[reference])
    predicted = {
        name: _predicted(table, predictions[reference], classes, name)
        for name, table in predictions.items()
    }
    resamples = int(evaluation["bootstrap"]["resamples"])
    seed = int(evaluation["bootstrap"]["seed"])
    variants = counterfactuals["variants"]
    rows = []
    for name in [reference, *sorted(set(predicted) - {reference})]:
        row: dict[str, Any] = {
            "variant": name,
            "kind": variants[name].get("kind", "ablation"),
            "factor": variants[name]["factor"],
            "n_test": len(truth),
        }
        for metric_name, metric in METRICS.items():
            low, high = bootstrap_interval(
                truth, predicted[name], metric, resamples=resamples, seed=seed
            )
            row[metric_name] = metric(truth, predicted[name])
            row[f"{metric_name}_low"], row[f"{metric_name}_high"] = low, high
            difference = paired_bootstrap_difference(
                truth,
                predicted[name],
                predicted[reference],
                metric,
                resamples=resamples,
                seed=seed,
            )
            for suffix, value in zip(("", "_low", "_high"), difference, strict=True):
                row[f"{metric_name}_difference{suffix}"] = value
        row["within_noise"] = bool(
            row["accuracy_difference_low"] <= 0 <= row["accuracy_difference_high"]
        )
        records = stages[name]
        row["epochs_trained"] = int(records["epochs_trained"].sum())
        row["training_seconds"] = float(records["seconds"].sum())
        rows.append(row)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def plot_counterfactuals(counterfactual_summary: pd.DataFrame) -> Figure:
    """Bars of each variant's paired difference from the reference, with intervals.

    Args:
        counterfactual_summary: From :func:`summarise_counterfactuals`.

    Returns:
        Two panels (accuracy, macro F1); grey bars are within noise (their interval
        holds 0).
    """
    others = counterfactual_summary.iloc[1:]
    reference = counterfactual_summary["variant"].iloc[0]
    figure = Figure(figsize=(11, 1.2 + 0.45 * max(len(others), 1)))
    axes = figure.subplots(1, 2, sharey=True)
    positions = np.arange(len(others))
    for axis, metric in zip(axes, METRICS, strict=True):
        values = others[f"{metric}_difference"].to_numpy(float)
        errors = np.vstack(
            [
                values - others[f"{metric}_difference_low"].to_numpy(float),
                others[f"{metric}_difference_high"].to_numpy(float) - values,
            ]
        )
        noise = (others[f"{metric}_difference_low"] <= 0) & (
            others[f"{metric}_difference_high"] >= 0
        )
        colours = [
            "lightgrey" if quiet else ("tab:green" if value > 0 else "tab:red")
            for quiet, value in zip(noise, values, strict=True)
        ]
        axis.barh(positions, values, xerr=errors, color=colours, capsize=3)
        axis.axvline(0.0, color="black", linewidth=0.8)
        axis.margins(x=0.08)
        axis.set_xlabel(f"{metric.replace('_', ' ')} minus {reference}'s")
        axis.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(positions, others["variant"].to_list())
    axes[0].invert_yaxis()
    figure.suptitle(
        f"Paired differences from {reference} on the same test images, 95% "
        "intervals (grey: within noise)"
    )
    figure.tight_layout()
    return figure


def write_counterfactual_report(
    counterfactual_summary: pd.DataFrame,
    counterfactuals: dict[str, Any],
    finetune_plan: dict[str, Any],
) -> str:
    """The section "What each fix was worth on your data", as its own Markdown file.

    Args:
        counterfactual_summary: From :func:`summarise_counterfactuals`.
        counterfactuals: The ``counterfactuals`` parameters (``report_chart``: the
            chart's file, relative to the report).
        finetune_plan: Our plan (the source every variant fine-tuned from).

    Returns:
        The Markdown text.
    """
    reference = counterfactual_summary.iloc[0]
    lines = [
        "## What each fix was worth on your data",
        "",
        f"Each variant below was trained by the same code as `{reference['variant']}` "
        "(the `finetune` pipeline's training node) on the same splits, seed, image "
        "size and epoch budget, and scored on the same "
        f"{int(reference['n_test'])} test images. A difference is the variant's "
        f"figure minus `{reference['variant']}`'s, with a 95% paired-bootstrap "
        "interval (both models scored on each resample of the test images); when "
        "the interval holds 0 the difference is within noise: these test images "
        "cannot tell the two apart.",
    ]
    source = planned_source(finetune_plan)
    if not source.pretrained:
        lines += [
            "",
            f"_The backbone started from random weights (source `{source.name}`): "
            "these figures are not transfer learning and say nothing about "
            "pretrained features._",
        ]
    lines += ["", f"![Paired differences]({counterfactuals['report_chart']})", ""]
    lines += [
        _statement(row, reference)
        for row in counterfactual_summary.iloc[1:].to_dict("records")
    ]
    lines += ["", markdown_table(_table(counterfactual_summary))]
    return "\n".join(lines) + "\n"


def _statement(row: Mapping[str, Any], reference: Mapping[str, Any]) -> str:
    difference = row["accuracy_difference"]
    interval = (
        f"{difference:+.3f} [{row['accuracy_difference_low']:+.3f}, "
        f"{row['accuracy_difference_high']:+.3f}]"
    )
    if row["within_noise"]:
        verdict = "within noise (the interval holds 0)"
    elif difference < 0:
        verdict = f"worse than `{reference['variant']}`"
    else:
        verdict = f"better than `{reference['variant']}`"
    return (
        f"- **{row['variant']}** ({row['factor']}): test accuracy "
        f"{row['accuracy']:.3f} against {reference['accuracy']:.3f}, difference "
        f"{interval}: {verdict}."
    )


def _table(summary: pd.DataFrame) -> pd.DataFrame:
    def interval(row: Mapping[str, Any], name: str) -> str:
        return f"{row[name]:.3f} [{row[f'{name}_low']:.3f}, {row[f'{name}_high']:.3f}]"

    return pd.DataFrame(
        [
            {
                "variant": row["variant"],
                "kind": row["kind"],
                "accuracy": interval(row, "accuracy"),
                "macro F1": interval(row, "macro_f1"),
                "accuracy difference": interval(row, "accuracy_difference"),
                "macro F1 difference": interval(row, "macro_f1_difference"),
                "within noise": row["within_noise"],
                "epochs": row["epochs_trained"],
                "training seconds": round(float(row["training_seconds"]), 1),
            }
            for row in summary.to_dict("records")
        ]
    )


def _by_variant(
    outputs: Mapping[str, pd.DataFrame], suffix: str
) -> dict[str, pd.DataFrame]:
    return {
        name.removesuffix(suffix): table
        for name, table in outputs.items()
        if name.endswith(suffix)
    }


def _truth(reference: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    classes = classes_of(reference)
    return label_indices(reference["label"], classes), classes


def _predicted(
    table: pd.DataFrame, reference: pd.DataFrame, classes: Sequence[str], name: str
) -> np.ndarray:
    if table["path"].to_list() != reference["path"].to_list():
        raise CounterfactualError(
            f"Variant {name!r} was scored on other test images than the reference "
            "(paths differ): rerun `kedro run --pipeline counterfactuals`"
        )
    if classes_of(table) != list(classes):
        raise CounterfactualError(
            f"Variant {name!r} has the classes {classes_of(table)}, the reference "
            f"{list(classes)}"
        )
    return label_indices(table["predicted"], classes)
