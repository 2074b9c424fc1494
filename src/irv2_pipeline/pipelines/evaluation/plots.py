"""Figures of the evaluation: confusion matrices, reliability, mistakes, curves.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot, so that no
global figure state is kept between nodes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import confusion_matrix

from .diagnosis import stages_of


def confusion_matrix_figure(
    y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]
) -> Figure:
    """The confusion matrix as counts and as row-normalised fractions (recall)."""
    counts = confusion_matrix(y_true, y_pred, labels=np.arange(len(classes)))
    row_totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(
        counts, row_totals, out=np.zeros(counts.shape), where=row_totals > 0
    )
    side = max(3.5, 0.55 * len(classes) + 2.0)
    figure = Figure(figsize=(2 * side, side), layout="constrained")
    panels = figure.subplots(1, 2)
    for axis, values, title, fmt in (
        (panels[0], counts, "counts", "d"),
        (panels[1], fractions, "row-normalised (recall)", ".2f"),
    ):
        image = axis.imshow(values, cmap="Blues", vmin=0)
        figure.colorbar(image, ax=axis, shrink=0.8)
        top = values.max() if values.size else 0
        for (row, col), value in np.ndenumerate(values):
            axis.text(
                col,
                row,
                format(value, fmt),
                ha="center",
                va="center",
                color="white" if top and value > top / 2 else "black",
                fontsize=8,
            )
        axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        axis.set_yticks(range(len(classes)), classes)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_title(title)
    figure.suptitle("Confusion matrix (test split)")
    return figure


def reliability_figure(bins: pd.DataFrame, ece: float) -> Figure:
    """Accuracy against confidence per bin, with the diagonal of perfect calibration.

    Args:
        bins: ``metrics.calibration_bins`` output.
        ece: The expected calibration error, for the title.
    """
    figure = Figure(figsize=(5, 6), layout="constrained")
    top, bottom = figure.subplots(
        2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    width = bins["upper"] - bins["lower"]
    centres = bins["lower"] + width / 2
    filled = bins["count"] > 0
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.bar(
        centres[filled],
        bins["accuracy"][filled],
        width=width[filled],
        edgecolor="black",
        alpha=0.7,
        label="accuracy",
    )
    top.plot(
        centres[filled], bins["confidence"][filled], "o", color="C3", label="confidence"
    )
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"Reliability diagram (ECE = {ece:.3f})")
    top.legend(loc="upper left")
    bottom.bar(centres, bins["count"], width=width, edgecolor="black", color="grey")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("images")
    return figure


def image_grid_figure(
    images: Sequence[np.ndarray],
    titles: Sequence[str],
    columns: int,
    heading: str,
    empty: str,
    *,
    heatmaps: Sequence[np.ndarray] = (),
) -> Figure:
    """A grid of RGB images with a title each; ``empty`` is said when there are none.

    ``heatmaps`` (values in ``[0, 1]``, one per image, at its size), when given, are
    drawn over the images, half transparent.
    """
    if not images:
        figure = Figure(figsize=(5, 1.5), layout="constrained")
        axis = figure.subplots()
        axis.axis("off")
        axis.text(0.5, 0.5, empty, ha="center", va="center")
        return figure
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    # At least 6 inches wide, so the heading fits above a single image.
    figure = Figure(
        figsize=(max(6.0, 2.2 * columns), 2.4 * rows + 0.5), layout="constrained"
    )
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for axis in axes:
        axis.axis("off")
    for index, (axis, pixels, title) in enumerate(
        zip(axes, images, titles, strict=False)
    ):
        axis.imshow(pixels)
        if len(heatmaps):
            axis.imshow(heatmaps[index], cmap="jet", alpha=0.45, vmin=0, vmax=1)
        axis.set_title(title, fontsize=8)
    figure.suptitle(heading)
    return figure


def validation_curves_figure(history: pd.DataFrame) -> Figure:
    """Loss and accuracy per epoch across all stages, stage boundaries marked."""
    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_axis, accuracy_axis = figure.subplots(1, 2)
    offset = 0
    for index, (stage, rows) in enumerate(stages_of(history)):
        steps = offset + np.arange(1, len(rows) + 1)
        colour = f"C{index % 10}"
        for axis, metric in ((loss_axis, "loss"), (accuracy_axis, "accuracy")):
            axis.plot(steps, rows[f"val_{metric}"], "-o", color=colour, label=stage)
            axis.plot(steps, rows[metric], "--x", color=colour, alpha=0.6)
            if offset:
                axis.axvline(offset + 0.5, color="grey", linewidth=0.8)
        offset += len(rows)
    for axis, metric in ((loss_axis, "loss"), (accuracy_axis, "accuracy")):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("epoch (all stages)")
        axis.set_ylabel(metric)
        axis.set_title(f"{metric}: validation (solid, o), training (dashed, x)")
    accuracy_axis.legend(title="stage")
    return figure
