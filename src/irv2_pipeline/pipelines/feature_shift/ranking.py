"""Which candidate source to fine-tune from: the ranking table, its reason and plot.

Sources are ranked by LogME (You et al., ICML 2021) of their frozen features at the
top depth on the training images: the evidence of a linear model on those features,
made to rank pretrained models for a target without fine-tuning any of them. Random
weights rank after every pretrained source whatever their LogME (their features
describe no source). The table keeps, beside it, what else was measured of each:
the linear probe's validation accuracy and the BatchNorm shift against the source's
own statistics.
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib
import pandas as pd

from irv2_pipeline.plan_rules import shift_start
from irv2_pipeline.sources import Source

from . import shift

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

RANKING_COLUMNS = [
    "rank",
    "source",
    "chosen",
    "weights",
    "preprocessing",
    "grayscale",
    "image_size",
    "pretrained",
    "top_layer",
    "logme",
    "best_logme",
    "best_logme_layer",
    "probe_val_accuracy",
    "probe_skill",
    "mean_bn_shift",
    "peak_bn_shift",
    "shift_starts_at",
]


def rank(
    sources: list[Source],
    profiles: dict[str, pd.DataFrame],
    transferability: dict[str, pd.DataFrame],
    *,
    forced: Source | None,
    shift_threshold: float,
) -> tuple[pd.DataFrame, Source, str]:
    """The ranking table, the chosen source and why it was chosen.

    Args:
        sources: The candidates.
        profiles: Per source name, its ``bn_shift_profile``.
        transferability: Per source name, its ``transferability`` table.
        forced: The source ``model.source`` names, if any: chosen whatever its rank.
        shift_threshold: ``feature_shift.plan.shift_threshold`` (where the shift
            starts, per source).

    Returns:
        ``source_ranking`` (:data:`RANKING_COLUMNS`, best first), the chosen source
        and a sentence saying why.
    """
    rows = [
        _row(
            source, profiles[source.name], transferability[source.name], shift_threshold
        )
        for source in sources
    ]
    table = pd.DataFrame(rows)
    table["_order"] = [
        (
            not row["pretrained"],
            -_finite(row["logme"]),
            -_finite(row["probe_val_accuracy"]),
        )
        for row in rows
    ]
    table = table.sort_values("_order", kind="stable").drop(columns="_order")
    table.insert(0, "rank", range(1, len(table) + 1))
    by_name = {source.name: source for source in sources}
    chosen = forced or by_name[str(table["source"].iloc[0])]
    table["chosen"] = table["source"] == chosen.name
    table = table[RANKING_COLUMNS].reset_index(drop=True)
    return table, chosen, _reason(table, chosen, forced is not None)


def ranking_plot(ranking: pd.DataFrame, transferability: dict[str, pd.DataFrame]):
    """LogME at every measured depth, one line per source, the chosen one bold.

    Args:
        ranking: ``source_ranking``.
        transferability: Per source name, its ``transferability`` table.
    """
    figure, axis = plt.subplots(figsize=(7.5, 4.2))
    for row in ranking.itertuples():
        table = transferability[row.source]
        axis.plot(
            table["layer"],
            table["logme"],
            marker="o",
            linewidth=2.6 if row.chosen else 1.2,
            label=f"{row.rank}. {row.source}" + (" (chosen)" if row.chosen else ""),
        )
    axis.set_xlabel("depth (IRv2 unit, input to output)")
    axis.set_ylabel("LogME on your training images (higher: better)")
    axis.set_title("Candidate sources: transferability of frozen features")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _row(
    source: Source,
    profile: pd.DataFrame,
    transferability: pd.DataFrame,
    shift_threshold: float,
) -> dict[str, Any]:
    """One source's line of the table."""
    top = transferability.iloc[-1]
    best = transferability.loc[transferability["logme"].idxmax()]
    blocks = shift.block_shift(profile)
    by_block = dict(zip(blocks["block"], blocks["shift"], strict=True))
    grey = float(profile["grayscale_share"].iloc[0]) if len(profile) else 0.0
    return {
        "source": source.name,
        "weights": "null" if source.weights is None else source.weights,
        "preprocessing": source.preprocessing,
        "grayscale": source.grayscale,
        "image_size": source.image_size,
        "pretrained": source.pretrained,
        "top_layer": str(top["layer"]),
        "logme": float(top["logme"]),
        "best_logme": float(best["logme"]),
        "best_logme_layer": str(best["layer"]),
        "probe_val_accuracy": float(top["probe_val_accuracy"]),
        "probe_skill": float(top["probe_skill"]),
        "mean_bn_shift": float(blocks["shift"].mean()),
        "peak_bn_shift": float(blocks["shift"].max()),
        "shift_starts_at": shift_start(by_block, shift_threshold, grey),
    }


def _reason(table: pd.DataFrame, chosen: Source, forced: bool) -> str:
    """Why ``chosen`` was chosen, with the figures that decided it."""
    row = table[table["source"] == chosen.name].iloc[0]
    figures = (
        f"LogME {row['logme']:.3f} at {row['top_layer']}, probe accuracy "
        f"{row['probe_val_accuracy']:.3f}, mean BN shift {row['mean_bn_shift']:.3g}"
    )
    if len(table) == 1:
        return f"Source `{chosen.name}`, the only candidate ({figures})."
    if forced:
        return (
            f"Source `{chosen.name}` (ranked {int(row['rank'])} of {len(table)}), "
            f"forced by model.source ({figures})."
        )
    runner_up = table.iloc[1]
    return (
        f"Source `{chosen.name}` ranks first of {len(table)} by LogME at "
        f"{row['top_layer']}: {row['logme']:.3f} vs {runner_up['logme']:.3f} for "
        f"`{runner_up['source']}` ({figures})."
    )


def _finite(value: float) -> float:
    """NaN (no validation images) sorts last."""
    return value if math.isfinite(value) else -math.inf
