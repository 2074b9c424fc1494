"""How far is an image from what the model was trained on? A Mahalanobis OOD score.

The score of an image is its Mahalanobis distance, in the classifier's pooled-feature
space, to the nearest class mean of the training images, under one covariance shared
by the classes (Lee et al., 2018). The covariance is the Ledoit-Wolf shrunk estimate
of the within-class scatter: features have more dimensions than a small training set
has images, and the plain sample covariance would not be invertible. The threshold is
the ``1 - false_alarm_rate`` quantile of the validation images' scores, so about that
share of in-distribution images is flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MahalanobisScorer:
    """Class means and the whitened shared covariance of the training features.

    ``whitening`` is a matrix ``W`` with ``W Wᵀ`` the precision (the inverse of the
    shrunk covariance): the squared distance
    of ``x`` to a mean ``m`` is ``|(x - m) W|²``, so scoring ``n`` images costs one
    ``(n, features) x (features, features)`` product for every class together.
    """

    means: np.ndarray  # (classes, features)
    shrinkage: float
    whitening: np.ndarray  # (features, features)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """The distance of each row to its nearest class mean.

        Args:
            features: ``(n, features)``.

        Returns:
            ``(n,)`` Mahalanobis distances (not squared).
        """
        features = np.asarray(features, dtype=np.float64)
        whitened = features @ self.whitening
        best = np.full(len(features), np.inf)
        for mean in self.means @ self.whitening:
            gap = whitened - mean
            best = np.minimum(best, np.einsum("ij,ij->i", gap, gap))
        return np.sqrt(best)


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray) -> MahalanobisScorer:
    """Fits class means and a Ledoit-Wolf shared covariance.

    Args:
        features: ``(n, features)`` training features.
        labels: ``(n,)`` class of each row (any hashable values).

    Returns:
        The scorer.

    Raises:
        ValueError: Fewer than two training rows.
    """
    from sklearn.covariance import LedoitWolf  # noqa: PLC0415 - slow import

    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if len(features) < 2:
        raise ValueError(f"{len(features)} training features: need at least 2")
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(axis=0) for c in classes])
    centred = features - means[np.searchsorted(classes, labels)]
    # The shrunk covariance only: sklearn's precision_ is a pseudo-inverse by eigen
    # decomposition, seconds at 1,536 features; the whitening below gives it too.
    estimate = LedoitWolf(assume_centered=True, store_precision=False).fit(centred)
    whitening = _whitening(estimate.covariance_)
    return MahalanobisScorer(
        means=means,
        shrinkage=float(estimate.shrinkage_),
        whitening=whitening,
    )


def _whitening(covariance: np.ndarray) -> np.ndarray:
    """``W`` with ``W Wᵀ`` the inverse of ``covariance``.

    From the Cholesky factor ``L`` (``covariance = L Lᵀ``), ``W = L⁻ᵀ``. A covariance
    that is not positive definite (no shrinkage and fewer images than features)
    takes the pseudo-inverse's, by eigen decomposition, as sklearn's ``precision_``
    is computed.
    """
    from scipy.linalg import solve_triangular  # noqa: PLC0415 - slow import

    try:
        lower = np.linalg.cholesky(covariance)
    except np.linalg.LinAlgError:
        values, vectors = np.linalg.eigh(covariance)
        cutoff = values.max() * len(values) * np.finfo(np.float64).eps
        kept = values > cutoff
        return vectors[:, kept] / np.sqrt(values[kept])
    return solve_triangular(lower, np.eye(len(lower)), lower=True).T


def calibrate_threshold(val_scores: np.ndarray, false_alarm_rate: float) -> float:
    """The score above which an image is flagged: a quantile of the validation scores.

    Args:
        val_scores: Scores of in-distribution images the scorer was not fitted on.
        false_alarm_rate: The share of such images to flag, in ``(0, 1)``.

    Returns:
        The ``1 - false_alarm_rate`` quantile (linear interpolation).

    Raises:
        ValueError: No validation scores, or a rate outside ``(0, 1)``.
    """
    if not 0.0 < false_alarm_rate < 1.0:
        raise ValueError(
            f"inference.false_alarm_rate = {false_alarm_rate} must be in (0, 1)"
        )
    if len(val_scores) == 0:
        raise ValueError("No validation images to calibrate the OOD threshold on")
    return float(np.quantile(np.asarray(val_scores), 1.0 - false_alarm_rate))
