"""The Mahalanobis OOD score and its threshold, on synthetic features."""

from __future__ import annotations

import numpy as np
import pytest

from irv2_pipeline.pipelines.inference.ood import calibrate_threshold, fit_mahalanobis


def clusters(rng: np.random.Generator, per_class: int, dims: int = 20):
    centres = np.array([np.zeros(dims), np.full(dims, 4.0)])
    labels = np.repeat(["a", "b"], per_class)
    features = centres[np.repeat([0, 1], per_class)] + rng.normal(
        size=(2 * per_class, dims)
    )
    return features, labels


def test_a_far_point_scores_higher():
    rng = np.random.default_rng(0)
    features, labels = clusters(rng, 200)
    scorer = fit_mahalanobis(features, labels)
    near = scorer.scores(np.stack([np.zeros(20), np.full(20, 4.0)]))
    far = scorer.scores(np.full((1, 20), 30.0))
    assert far[0] > 5 * near.max()
    # Nearest class: a point at a class mean scores about 0 (not the distance to the
    # other class).
    assert near.max() < 1.0


def test_more_dimensions_than_images_still_scores():
    rng = np.random.default_rng(1)
    features, labels = clusters(rng, 10, dims=100)
    scorer = fit_mahalanobis(features, labels)
    assert np.isfinite(scorer.scores(features)).all()
    assert 0.0 < scorer.shrinkage <= 1.0


@pytest.mark.parametrize("rate", [0.05, 0.2])
def test_threshold_flags_about_the_false_alarm_rate(rate):
    rng = np.random.default_rng(2)
    train, train_labels = clusters(rng, 500)
    val, _ = clusters(rng, 1000)
    scorer = fit_mahalanobis(train, train_labels)
    threshold = calibrate_threshold(scorer.scores(val), rate)
    # Fresh in-distribution images are flagged at about the rate.
    fresh, _ = clusters(rng, 2000)
    flagged = (scorer.scores(fresh) > threshold).mean()
    assert abs(flagged - rate) < 0.02
    assert (scorer.scores(val) > threshold).mean() == pytest.approx(rate, abs=0.002)


def test_threshold_refuses_bad_rates():
    with pytest.raises(ValueError, match="false_alarm_rate"):
        calibrate_threshold(np.ones(5), 1.0)
    with pytest.raises(ValueError, match="No validation"):
        calibrate_threshold(np.empty(0), 0.05)
