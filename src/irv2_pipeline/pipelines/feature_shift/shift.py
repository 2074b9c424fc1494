"""How far the target images are from ImageNet, per BatchNormalization layer.

Each BN layer stores the per-channel mean and variance of its input over ImageNet.
The target images' own per-channel moments, against the stored ones, give per channel
two Gaussians; their symmetric KL divergence, averaged over channels, is the layer's
shift. Both Gaussians get the layer's ``epsilon`` added to their variance: that is the
variance BN divides by, and it keeps near-dead channels from dominating.
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
    "mean_part",
    "variance_part",
    "variance_ratio",
    "weights_pretrained",
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
) -> pd.DataFrame:
    """One row per BN layer: its place in IRv2 and its shift, averaged over channels.

    ``variance_ratio`` is the geometric mean over channels of target over stored
    variance (1 = same spread; 10 = the target spreads 10x wider).
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
        rows.append(
            {
                "layer": bn.name,
                "unit": bn.unit,
                "block": group_of(bn.unit),
                "depth": bn.depth,
                "channels": bn.channels,
                "shift": float(measured.shift.mean()),
                "mean_part": float(measured.mean_part.mean()),
                "variance_part": float(measured.variance_part.mean()),
                "variance_ratio": float(np.exp(np.log(measured.variance_ratio).mean())),
                "weights_pretrained": weights_pretrained,
            }
        )
    return pd.DataFrame(rows, columns=PROFILE_COLUMNS)


def block_shift(profile: pd.DataFrame) -> pd.DataFrame:
    """Per IRv2 block (stem, block35, ... conv_7b), in network order.

    Columns: ``block``, ``layers``, ``first_depth``, ``last_depth``, ``shift`` (mean
    over the block's BN layers), ``median_shift``, ``max_shift``, ``max_layer``,
    ``mean_part``, ``variance_part``.
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
