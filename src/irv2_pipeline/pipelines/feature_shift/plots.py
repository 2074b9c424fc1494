"""The plot of BN shift against depth, with IRv2's blocks marked."""

from __future__ import annotations

import matplotlib
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first


def shift_by_depth_plot(
    profile: pd.DataFrame, blocks: pd.DataFrame, threshold: float, title_note: str
) -> plt.Figure:
    """Shift of every BN layer against its depth, blocks shaded and their means drawn.

    The y axis is linear up to 0.01 and logarithmic above (``symlog``): shifts span
    orders of magnitude and may be exactly zero.

    Args:
        profile: ``bn_shift_profile``.
        blocks: The per-block table of ``shift.block_shift``.
        threshold: ``feature_shift.plan.shift_threshold``, drawn as a dashed line.
        title_note: Appended to the title (for example the random-weights warning).
    """
    figure, axis = plt.subplots(figsize=(11, 4.2))
    for index, block in enumerate(blocks.itertuples()):
        left, right = block.first_depth - 0.5, block.last_depth + 0.5
        if index % 2 == 0:
            axis.axvspan(left, right, color="0.93", zorder=0)
        axis.hlines(block.shift, left, right, colors="tab:red", linewidth=2, zorder=3)
        axis.text(
            (left + right) / 2,
            1.01,
            block.block,
            transform=axis.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    axis.scatter(
        profile["depth"],
        profile["shift"],
        s=9,
        color="tab:blue",
        zorder=2,
        label="BN layer",
    )
    axis.plot([], [], color="tab:red", linewidth=2, label="block mean")
    axis.axhline(
        threshold,
        color="0.3",
        linestyle="--",
        linewidth=1,
        label=f"shift_threshold {threshold:g}",
    )
    axis.set_yscale("symlog", linthresh=0.01)
    axis.set_xlim(-1, int(profile["depth"].max()) + 1)
    axis.set_xlabel("depth (BatchNormalization layers, input to output)")
    axis.set_ylabel("symmetric KL (channel median), source vs your images")
    axis.set_title(f"BN input shift by depth{title_note}", pad=18)
    axis.legend(loc="best", fontsize=8)
    figure.tight_layout()
    return figure
