"""The training-curves figure: loss, accuracy and learning rate over all stages."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from matplotlib.ticker import MaxNLocator  # noqa: E402


def training_curves_figure(training_history: pd.DataFrame) -> plt.Figure:
    """Loss, accuracy (train and validation) and learning rate per epoch.

    Epochs are counted across stages; a dashed line marks where each stage begins,
    labelled with the stage's name.

    Args:
        training_history: One row per epoch (``stage``, ``loss``, ``accuracy``,
            ``val_loss``, ``val_accuracy``, ``learning_rate``), in training order.
    """
    history = training_history.reset_index(drop=True)
    epochs = np.arange(1, len(history) + 1)
    figure, axes = plt.subplots(
        3, 1, figsize=(7.5, 7.5), sharex=True, height_ratios=(3, 3, 2)
    )
    for axis, metric in zip(axes[:2], ("loss", "accuracy"), strict=True):
        axis.plot(epochs, history[metric], marker="o", label=f"train {metric}")
        axis.plot(epochs, history[f"val_{metric}"], marker="o", label=f"val {metric}")
        axis.set_ylabel(metric)
        axis.legend(loc="best")
        axis.grid(alpha=0.3)
    axes[2].plot(epochs, history["learning_rate"], marker=".", color="tab:gray")
    axes[2].set_ylabel("learning rate")
    if (history["learning_rate"] > 0).all():
        axes[2].set_yscale("log")
    axes[2].set_xlabel("epoch (all stages)")
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    starts = history.index[history["stage"] != history["stage"].shift()]
    for start in starts:
        for axis in axes:
            axis.axvline(start + 0.5, color="black", linestyle="--", linewidth=0.8)
        axes[0].annotate(
            str(history.loc[start, "stage"]),
            xy=(start + 0.6, 1.0),
            xycoords=("data", "axes fraction"),
            va="top",
            fontsize=8,
        )
    axes[0].set_title("Training curves (dashed: a stage begins)")
    figure.tight_layout()
    return figure
