"""Fréchet distance, MMD² and the permutation test on known distributions."""

from __future__ import annotations

import numpy as np
import pytest

from irv2_pipeline.pipelines.feature_shift.twosample import (
    compare,
    frechet_distance,
    mmd2_unbiased,
    rbf_kernel,
)


def test_frechet_distance_of_two_gaussians_with_known_answer():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) * 2.0 + np.array([1.0, 0.0, 0.0])
    # |mu|^2 + sum over dims of (1 + 4 - 2 * sqrt(1 * 4)) = 1 + 3 * 1
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.03)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_mmd2_matches_the_textbook_unbiased_estimator():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(9, 2))
    kernel = rbf_kernel(points)
    first, second = kernel[:4, :4], kernel[4:, 4:]
    expected = (
        (first.sum() - 4) / (4 * 3)
        + (second.sum() - 5) / (5 * 4)
        - 2 * kernel[:4, 4:].mean()
    )
    membership = np.r_[np.ones(4), np.zeros(5)]
    assert float(mmd2_unbiased(kernel, membership)) == pytest.approx(expected)


def test_same_distribution_is_not_flagged_and_a_shift_is():
    rng = np.random.default_rng(2)
    reference = rng.normal(size=(40, 16))
    same = rng.normal(size=(40, 16))
    shifted = rng.normal(size=(40, 16)) + 0.8
    kwargs = {"max_components": 8, "permutations": 300, "seed": 0}
    assert compare(reference, same, **kwargs).p_value > 0.05
    moved = compare(reference, shifted, **kwargs)
    assert moved.p_value < 0.01
    assert moved.mmd2 > compare(reference, same, **kwargs).mmd2


def test_permutation_test_is_reproducible_with_its_seed():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(15, 4)), rng.normal(size=(15, 4)) + 0.3
    first = compare(a, b, max_components=4, permutations=200, seed=9)
    assert compare(a, b, max_components=4, permutations=200, seed=9) == first
