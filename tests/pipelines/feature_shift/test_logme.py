"""LogME against a direct evaluation of the Bayesian evidence, and its ranking."""

from __future__ import annotations

import numpy as np
import pytest

from irv2_pipeline.pipelines.feature_shift.logme import (
    log_evidence,
    logme,
    maximize_evidence,
)


def direct_log_evidence(
    features: np.ndarray, target: np.ndarray, alpha: float, beta: float
) -> float:
    """log N(target; 0, F F^T / alpha + I / beta), straight from the definition."""
    n = len(target)
    covariance = features @ features.T / alpha + np.eye(n) / beta
    _, log_det = np.linalg.slogdet(covariance)
    quadratic = target @ np.linalg.solve(covariance, target)
    return float(-0.5 * (n * np.log(2 * np.pi) + log_det + quadratic))


def blobs(seed: int, n_per_class: int = 15, dims: int = 8, gap: float = 3.0):
    """Three Gaussian blobs, well apart along random directions."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dims)) * gap
    labels = np.repeat(np.arange(3), n_per_class)
    features = centres[labels] + rng.normal(size=(len(labels), dims))
    return features, labels


@pytest.mark.parametrize(("n", "dims"), [(30, 6), (12, 40)])
def test_evidence_matches_the_gaussian_marginal_likelihood(n, dims):
    rng = np.random.default_rng(n + dims)
    features = rng.normal(size=(n, dims))
    target = (rng.random(n) > 0.5).astype(float)
    for alpha, beta in [(0.3, 2.0), (5.0, 0.7)]:
        assert log_evidence(features, target, alpha, beta) == pytest.approx(
            direct_log_evidence(features, target, alpha, beta), rel=1e-9
        )


def test_fitted_alpha_and_beta_maximize_the_direct_evidence():
    features, labels = blobs(seed=8, n_per_class=15, dims=8)
    target = (labels == 1).astype(float)
    fitted = maximize_evidence(features, target)
    best = direct_log_evidence(features, target, fitted.alpha, fitted.beta)
    assert fitted.log_evidence == pytest.approx(best, rel=1e-9)
    for scale_alpha, scale_beta in [(0.8, 1), (1.25, 1), (1, 0.8), (1, 1.25)]:
        nearby = direct_log_evidence(
            features, target, fitted.alpha * scale_alpha, fitted.beta * scale_beta
        )
        assert nearby < best


def test_more_dimensions_than_images_reaches_the_noise_free_supremum():
    # With 64 dimensions for 18 images any target is fitted exactly: the evidence
    # grows with beta towards a finite limit, which the fit must approach.
    features, labels = blobs(seed=64, n_per_class=6, dims=64)
    target = (labels == 1).astype(float)
    fitted = maximize_evidence(features, target)
    assert np.isfinite(fitted.log_evidence)
    assert fitted.log_evidence == pytest.approx(
        direct_log_evidence(features, target, fitted.alpha, fitted.beta), rel=1e-9
    )
    for scale_alpha in (0.8, 1.25):
        assert (
            direct_log_evidence(
                features, target, fitted.alpha * scale_alpha, fitted.beta
            )
            < fitted.log_evidence
        )
    assert direct_log_evidence(
        features, target, fitted.alpha, fitted.beta / 100
    ) == pytest.approx(fitted.log_evidence, rel=1e-6)


def test_logme_is_the_mean_per_image_evidence_over_classes():
    features, labels = blobs(seed=3)
    expected = np.mean(
        [
            maximize_evidence(features, (labels == k).astype(float)).log_evidence
            / len(labels)
            for k in range(3)
        ]
    )
    assert logme(features, labels) == pytest.approx(expected)


def test_separable_features_score_above_shuffled_labels():
    features, labels = blobs(seed=11)
    shuffled = np.random.default_rng(0).permutation(labels)
    assert logme(features, labels) > logme(features, shuffled) + 0.1


def test_logme_does_not_depend_on_the_scale_of_the_features():
    features, labels = blobs(seed=5)
    assert logme(features * 1000.0, labels) == pytest.approx(
        logme(features, labels), abs=1e-6
    )


def test_a_single_class_is_refused():
    with pytest.raises(ValueError, match="two classes"):
        logme(np.ones((4, 3)), np.zeros(4, dtype=int))
