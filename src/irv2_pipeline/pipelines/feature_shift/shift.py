"""How far the target images are from ImageNet, per BatchNormalization layer.

Each BN layer stores the per-channel mean and variance of its input over the source
(ImageNet, or the images a local weights file was trained on). The target images' own
per-channel moments, against the stored ones, give per channel two Gaussians; their
symmetric KL divergence is the channel's shift, and the *median* over channels is the
layer's. The median, not the mean: a few channels nearly silent on the source (a
variance near ``epsilon``) reach shifts in the hundreds on any target and would set a
mean alone. Both Gaussians get the layer's ``epsilon`` added to their variance: that is
the variance BN divides by.

In a user's units: a shift of 1.0 is what a mean moved by 1.4 standard deviations
(``d**2 / 2 = 1``) in half the channels or more gives, or a variance 5.8 times (or
1/5.8 of) the source's; 0.1 is a mean moved by 0.45 SD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from irv2_pipeline.backbone import GROUPS, group_of

if TYPE_CHECKING:
    # Only a type here; moments imports Keras, which evaluation's nodes need not load.
    from .moments import BatchNormLayer

PROFILE_COLUMNS = [
    "layer",
    "unit",
    "block",
    "depth",
    "channels",
    "shift",
    "shift_low",
    "shift_high",
    "mean_part",
    "variance_part",
    "variance_ratio",
    "weights_pretrained",
    "grayscale_share",
]


@dataclass(frozen=True)
class GaussianShift:
    """The symmetric KL divergence of two per-channel Gaussians, split in two parts.

    ``shift = mean_part + variance_part`` per channel, where
    ``shift = (KL(target || stored) + KL(stored || target)) / 2``.
    """

    shift: np.ndarray
    mean_part: np.ndarray
    variance_part: np.ndarray
    variance_ratio: np.ndarray  # target variance / stored variance


def symmetric_kl(
    target_mean: np.ndarray,
    target_variance: np.ndarray,
    stored_mean: np.ndarray,
    stored_variance: np.ndarray,
    epsilon: float,
) -> GaussianShift:
    """Per channel, the symmetric KL divergence of N(target) and N(stored).

    With ``p = target_variance + epsilon``, ``q = stored_variance + epsilon`` and
    ``d = target_mean - stored_mean``, the closed form of the averaged divergence is
    ``d**2 * (1/p + 1/q) / 4`` (the mean part) plus ``(p/q + q/p - 2) / 4`` (the
    variance part).
    """
    target = np.asarray(target_variance, np.float64) + epsilon
    stored = np.asarray(stored_variance, np.float64) + epsilon
    difference = np.asarray(target_mean, np.float64) - np.asarray(
        stored_mean, np.float64
    )
    mean_part = difference**2 * (1.0 / target + 1.0 / stored) / 4.0
    variance_part = (target / stored + stored / target - 2.0) / 4.0
    return GaussianShift(
        shift=mean_part + variance_part,
        mean_part=mean_part,
        variance_part=variance_part,
        variance_ratio=target / stored,
    )


def shift_profile(
    batch_norms: list[BatchNormLayer],
    target_means: dict[str, np.ndarray],
    target_variances: dict[str, np.ndarray],
    weights_pretrained: bool,
    grayscale_share: float = 0.0,
    *,
    resampled_means: dict[str, np.ndarray] | None = None,
    resampled_variances: dict[str, np.ndarray] | None = None,
) -> pd.DataFrame:
    """One row per BN layer: its place in IRv2 and its shift, the median over channels.

    ``shift_low`` and ``shift_high`` are the 5th and 95th percentiles of the same
    shift over the bootstrap resamples of the images (``resampled_means``,
    ``resampled_variances``: per layer, ``(resamples, channels)``), NaN without them:
    how far the figure moves with which images were measured. A few unusual images
    among a few dozen can move a deep layer's shift several-fold.

    ``mean_part`` and ``variance_part`` are those of the median channel (the two
    middle channels' average for an even count), so they add up to ``shift``.
    ``variance_ratio`` is the geometric mean over channels of target over stored
    variance (1 = same spread; 10 = the target spreads 10x wider).
    ``grayscale_share`` (the same on every row) is the share of the images measured
    whose three channels are equal: the stem's shift then says that the input has no
    colour, not how far its content is (see ``plan_rules.shift_start``).
    """
    rows = []
    for bn in batch_norms:
        measured = symmetric_kl(
            target_means[bn.name],
            target_variances[bn.name],
            bn.moving_mean,
            bn.moving_variance,
            bn.epsilon,
        )
        order = np.argsort(measured.shift, kind="stable")
        middle = order[[(len(order) - 1) // 2, len(order) // 2]]
        low = high = np.nan
        if resampled_means:
            resampled = symmetric_kl(
                resampled_means[bn.name],
                resampled_variances[bn.name],
                bn.moving_mean,
                bn.moving_variance,
                bn.epsilon,
            ).shift
            # A resample that drew no image has no moments (NaN): left out.
            low, high = np.nanpercentile(np.median(resampled, axis=1), [5, 95])
        rows.append(
            {
                "layer": bn.name,
                "unit": bn.unit,
                "block": group_of(bn.unit),
                "depth": bn.depth,
                "channels": bn.channels,
                "shift": float(measured.shift[middle].mean()),
                "shift_low": float(low),
                "shift_high": float(high),
                "mean_part": float(measured.mean_part[middle].mean()),
                "variance_part": float(measured.variance_part[middle].mean()),
                "variance_ratio": float(np.exp(np.log(measured.variance_ratio).mean())),
                "weights_pretrained": weights_pretrained,
                "grayscale_share": float(grayscale_share),
            }
        )
    return pd.DataFrame(rows, columns=PROFILE_COLUMNS)


def block_shift(profile: pd.DataFrame) -> pd.DataFrame:
    """Per IRv2 block (stem, block35, ... conv_7b), in network order.

    Columns: ``block``, ``layers``, ``first_depth``, ``last_depth``, ``shift`` (mean
    over the block's BN layers of their shift, itself a median over channels),
    ``shift_low`` and ``shift_high`` (the mean over its layers of their bootstrap
    5th and 95th percentiles; NaN without resamples), ``median_shift`` (the median
    over the block's layers), ``max_shift``, ``max_layer``, ``mean_part``,
    ``variance_part``.
    """
    rows = []
    for block in GROUPS:
        layers = profile[profile["block"] == block]
        if layers.empty:
            continue
        peak = layers.loc[layers["shift"].idxmax()]
        rows.append(
            {
                "block": block,
                "layers": len(layers),
                "first_depth": int(layers["depth"].min()),
                "last_depth": int(layers["depth"].max()),
                "shift": float(layers["shift"].mean()),
                "shift_low": float(layers["shift_low"].mean()),
                "shift_high": float(layers["shift_high"].mean()),
                "median_shift": float(layers["shift"].median()),
                "max_shift": float(peak["shift"]),
                "max_layer": str(peak["layer"]),
                "mean_part": float(layers["mean_part"].mean()),
                "variance_part": float(layers["variance_part"].mean()),
            }
        )
    return pd.DataFrame(rows)


def unit_order(profile: pd.DataFrame) -> list[str]:
    """The IRv2 units in network order, as the profile's BN layers meet them."""
    return list(dict.fromkeys(profile.sort_values("depth")["unit"]))
