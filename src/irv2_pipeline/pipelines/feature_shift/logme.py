"""LogME: how well frozen features can predict the labels, with no training.

You, Liu, Wang and Long, "LogME: Practical Assessment of Pre-trained Models for
Transfer Learning", ICML 2021. For each class ``k`` the one-vs-rest target ``y_k`` is
modelled as ``y = F w + noise`` with a Gaussian prior ``w ~ N(0, I / alpha)`` and noise
``N(0, I / beta)``. The log evidence ``log p(y | F)`` is maximized over ``alpha`` and
``beta`` by MacKay's fixed-point updates, computed in the features' SVD basis; LogME is
the maximized evidence per image, averaged over the classes. Higher is better; values
compare feature sets on the same images and labels, not across datasets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_ITERATIONS = 100
TOLERANCE = 1e-7


@dataclass(frozen=True)
class Evidence:
    """The maximized evidence of one target and where it is reached."""

    alpha: float
    beta: float
    log_evidence: float  # log p(y | F, alpha, beta), not divided by the image count


@dataclass(frozen=True)
class _Spectrum:
    """The SVD of the features, reused for every class."""

    left: np.ndarray  # (n, r) left singular vectors
    sigma2: np.ndarray  # (r,) squared singular values
    n: int
    dims: int


def _spectrum(features: np.ndarray) -> _Spectrum:
    features = np.asarray(features, np.float64)
    left, singular, _ = np.linalg.svd(features, full_matrices=False)
    return _Spectrum(left, singular**2, features.shape[0], features.shape[1])


def _evidence_at(
    spectrum: _Spectrum, target: np.ndarray, alpha: float, beta: float
) -> tuple[float, float, float, float, float]:
    """The log evidence at ``alpha``, ``beta``; also gamma, n - gamma, |m|^2, residual.

    gamma is the effective number of parameters. ``n - gamma`` is summed from its own
    small terms: computed by subtraction it rounds to zero where the features (nearly)
    interpolate the target, as they do with more dimensions than images.
    """
    projected = spectrum.left.T @ target
    # The part of the target outside the features' span, as the norm of the residual
    # vector: as |y|^2 - |U^T y|^2 it is rounding noise of |y|^2 where the span holds
    # the target, and beta (up to 1e9 there) multiplies it into the evidence.
    outside = float(((target - spectrum.left @ projected) ** 2).sum())
    precision = alpha + beta * spectrum.sigma2
    weight_norm2 = float(
        ((beta * np.sqrt(spectrum.sigma2) * projected / precision) ** 2).sum()
    )
    residual2 = float(((alpha * projected / precision) ** 2).sum()) + outside
    gamma = float((beta * spectrum.sigma2 / precision).sum())
    unused = float((alpha / precision).sum()) + (spectrum.n - len(spectrum.sigma2))
    # log|A| over all `dims` eigenvalues of alpha I + beta F^T F: the directions the
    # features do not span contribute log(alpha) each.
    log_det = float(np.log(precision).sum()) + (
        spectrum.dims - len(spectrum.sigma2)
    ) * np.log(alpha)
    log_evidence = (
        spectrum.dims / 2 * np.log(alpha)
        + spectrum.n / 2 * np.log(beta)
        - log_det / 2
        - beta / 2 * residual2
        - alpha / 2 * weight_norm2
        - spectrum.n / 2 * np.log(2 * np.pi)
    )
    return float(log_evidence), gamma, unused, weight_norm2, residual2


def log_evidence(
    features: np.ndarray, target: np.ndarray, alpha: float, beta: float
) -> float:
    """``log p(target | features, alpha, beta)`` of the Bayesian linear model."""
    target = np.asarray(target, np.float64)
    return _evidence_at(_spectrum(features), target, alpha, beta)[0]


def maximize_evidence(features: np.ndarray, target: np.ndarray) -> Evidence:
    """Maximizes the evidence of one target over ``alpha`` and ``beta``."""
    return _maximize(_spectrum(features), np.asarray(target, np.float64))


def _maximize(spectrum: _Spectrum, target: np.ndarray) -> Evidence:
    alpha, beta = 1.0, 1.0
    for _ in range(MAX_ITERATIONS):
        _, gamma, unused, weight_norm2, residual2 = _evidence_at(
            spectrum, target, alpha, beta
        )
        new_alpha = gamma / max(weight_norm2, 1e-300)
        new_beta = unused / max(residual2, 1e-300)
        ratio_change = abs(new_alpha / new_beta - alpha / beta) / (alpha / beta)
        alpha, beta = new_alpha, new_beta
        if ratio_change < TOLERANCE:
            break
    return Evidence(alpha, beta, _evidence_at(spectrum, target, alpha, beta)[0])


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME of features for integer class labels (higher: more transferable).

    Args:
        features: ``(images, dims)``.
        labels: ``(images,)`` class indices.

    Returns:
        The maximized log evidence per image, averaged over the classes present.

    Raises:
        ValueError: Fewer than two images or two classes.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(labels) < 2 or len(classes) < 2:
        raise ValueError(
            f"LogME needs at least two images of two classes; got {len(labels)} "
            f"images of {len(classes)} classes"
        )
    spectrum = _spectrum(features)
    return float(
        np.mean(
            [
                _maximize(spectrum, (labels == k).astype(np.float64)).log_evidence
                / spectrum.n
                for k in classes
            ]
        )
    )
