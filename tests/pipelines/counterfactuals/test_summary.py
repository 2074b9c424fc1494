"""The comparison of variants on constructed predictions: figures, verdicts, chart."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from irv2_pipeline.pipelines.counterfactuals.nodes import (
    CounterfactualError,
    plot_counterfactuals,
    summarise_counterfactuals,
    write_counterfactual_report,
)
from irv2_pipeline.pipelines.evaluation.metrics import prediction_table
from tests.conftest import planned_source

CLASSES = ["a", "b"]
N = 60
LABELS = ["a", "b"] * (N // 2)
PARAMS = {
    "reference": "ours",
    "report_chart": "counterfactual_chart.png",
    "variants": {
        "ours": {"kind": "reference", "factor": "our recipe"},
        "perfect": {"factor": "every image right"},
        "one_off": {"factor": "one more image wrong"},
    },
}
EVALUATION = {"bootstrap": {"resamples": 400, "seed": 42}}


def table(right: np.ndarray) -> pd.DataFrame:
    """Predictions that get the images marked in ``right`` right, the others wrong."""
    truth = np.array([CLASSES.index(label) for label in LABELS])
    predicted = np.where(right, truth, 1 - truth)
    probabilities = np.eye(2)[predicted] * 0.8 + 0.1
    paths = [f"{label}/{i}.png" for i, label in enumerate(LABELS)]
    return prediction_table(paths, LABELS, CLASSES, probabilities)


def stages(seconds: float) -> pd.DataFrame:
    return pd.DataFrame({"epochs_trained": [1, 2], "seconds": [seconds, 1.0]})


@pytest.fixture
def summary() -> pd.DataFrame:
    ours = np.arange(N) % 3 != 0  # two thirds right
    one_off = ours.copy()
    one_off[1] = False
    return summarise_counterfactuals(
        PARAMS,
        EVALUATION,
        **{
            "ours.test_predictions": table(ours),
            "ours.finetune_stages": stages(10.0),
            "perfect.test_predictions": table(np.ones(N, bool)),
            "perfect.finetune_stages": stages(5.0),
            "one_off.test_predictions": table(one_off),
            "one_off.finetune_stages": stages(7.0),
        },
    )


def test_the_reference_differs_from_itself_by_exactly_zero(summary):
    ours = summary.iloc[0]
    assert ours["variant"] == "ours"
    assert ours["accuracy"] == pytest.approx(2 / 3)
    assert (ours["accuracy_difference"], ours["accuracy_difference_low"]) == (0.0, 0.0)
    assert ours["accuracy_difference_high"] == 0.0 and ours["within_noise"]
    assert ours["accuracy_low"] < ours["accuracy"] < ours["accuracy_high"]
    assert ours["training_seconds"] == 11.0 and ours["epochs_trained"] == 3


def test_a_clear_gain_is_not_noise_one_image_is(summary):
    rows = summary.set_index("variant")
    assert rows.loc["perfect", "accuracy_difference"] == pytest.approx(1 / 3)
    assert rows.loc["perfect", "accuracy_difference_low"] > 0
    assert not rows.loc["perfect", "within_noise"]
    assert rows.loc["one_off", "accuracy_difference"] == pytest.approx(-1 / N)
    assert rows.loc["one_off", "within_noise"]
    assert rows.loc["perfect", "factor"] == "every image right"


def test_the_report_says_which_differences_are_noise(summary):
    report = write_counterfactual_report(summary, PARAMS, {"source": planned_source()})
    assert report.startswith("## What each fix was worth on your data")
    assert "![Paired differences](counterfactual_chart.png)" in report
    assert "**one_off** (one more image wrong)" in report
    line = next(x for x in report.splitlines() if x.startswith("- **one_off**"))
    assert "within noise" in line
    line = next(x for x in report.splitlines() if x.startswith("- **perfect**"))
    assert "better than `ours`" in line
    assert "random weights" in report


def test_the_chart_has_a_bar_per_variant_with_its_interval(summary):
    figure = plot_counterfactuals(summary)
    accuracy_axis = figure.axes[0]
    widths = sorted(round(bar.get_width(), 6) for bar in accuracy_axis.patches)
    assert widths == sorted([round(1 / 3, 6), round(-1 / N, 6)])
    labels = [tick.get_text() for tick in accuracy_axis.get_yticklabels()]
    assert labels == ["one_off", "perfect"]


def test_variants_scored_on_other_images_are_refused():
    moved = table(np.ones(N, bool))
    moved.loc[0, "path"] = "elsewhere.png"
    with pytest.raises(CounterfactualError, match="other test images"):
        summarise_counterfactuals(
            PARAMS,
            EVALUATION,
            **{
                "ours.test_predictions": table(np.ones(N, bool)),
                "ours.finetune_stages": stages(1.0),
                "perfect.test_predictions": moved,
                "perfect.finetune_stages": stages(1.0),
            },
        )
