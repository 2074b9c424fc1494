"""The symmetric KL divergence of two Gaussians and the running moments."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate, stats

from irv2_pipeline.pipelines.feature_shift.moments import BatchNormLayer, RunningMoments
from irv2_pipeline.pipelines.feature_shift.shift import shift_profile, symmetric_kl


def numerical_kl(p, q) -> float:
    low, high = -60.0, 60.0
    return integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), low, high)[
        0
    ]


@pytest.mark.parametrize(
    ("target", "stored"), [((0.5, 2.0), (0.0, 1.0)), ((-3.0, 0.2), (1.0, 4.0))]
)
def test_symmetric_kl_matches_numerical_integration(target, stored):
    epsilon = 1e-3
    p = stats.norm(target[0], np.sqrt(target[1] + epsilon))
    q = stats.norm(stored[0], np.sqrt(stored[1] + epsilon))
    expected = (numerical_kl(p, q) + numerical_kl(q, p)) / 2
    measured = symmetric_kl(
        np.array([target[0]]),
        np.array([target[1]]),
        np.array([stored[0]]),
        np.array([stored[1]]),
        epsilon,
    )
    assert measured.shift[0] == pytest.approx(expected, rel=1e-6)
    assert measured.mean_part[0] + measured.variance_part[0] == pytest.approx(
        measured.shift[0]
    )


def batch_norm(unit: str, moving_variance: np.ndarray) -> BatchNormLayer:
    """A BN layer ``bn`` of ``unit`` whose stored means are 0."""
    channels = len(moving_variance)
    return BatchNormLayer(
        name="bn",
        unit=unit,
        depth=0,
        channels=channels,
        epsilon=1e-3,
        moving_mean=np.zeros(channels),
        moving_variance=moving_variance,
    )


def test_identical_gaussians_have_zero_shift_and_epsilon_tames_dead_channels():
    same = symmetric_kl(np.ones(3), np.full(3, 2.0), np.ones(3), np.full(3, 2.0), 1e-3)
    assert np.allclose(same.shift, 0.0)
    # A channel that is constant on the target images: without epsilon the shift
    # would be infinite.
    dead = symmetric_kl(np.zeros(1), np.zeros(1), np.zeros(1), np.full(1, 1e-3), 1e-3)
    assert np.isfinite(dead.shift[0])
    assert dead.shift[0] == pytest.approx((0.5 + 2.0 - 2.0) / 4)


def test_running_moments_equal_the_moments_of_all_pixels():
    rng = np.random.default_rng(0)
    # 11 images of 5x5 pixels, 3 channels, far from zero mean (cancellation-prone).
    maps = rng.normal(loc=500.0, scale=2.0, size=(11, 5, 5, 3))
    running = RunningMoments(3)
    for start, stop in [(0, 4), (4, 8), (8, 11)]:
        batch = maps[start:stop]
        running.add(batch.mean(axis=(1, 2)), batch.var(axis=(1, 2)))
    assert running.count == 11
    np.testing.assert_allclose(running.mean, maps.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(running.variance, maps.var(axis=(0, 1, 2)), rtol=1e-9)


def test_a_resample_has_the_moments_of_the_images_it_draws():
    rng = np.random.default_rng(1)
    maps = rng.normal(loc=3.0, scale=2.0, size=(6, 4, 4, 2))
    # Resample 0 draws every image once, resample 1 image 0 three times and image 5
    # once, resample 2 nothing.
    weights = np.array([[1, 1, 1, 1, 1, 1], [3, 0, 0, 0, 0, 1], [0] * 6], np.float64)
    running = RunningMoments(2, resamples=3)
    for start, stop in [(0, 4), (4, 6)]:
        batch = maps[start:stop]
        running.add(
            batch.mean(axis=(1, 2)), batch.var(axis=(1, 2)), weights[:, start:stop]
        )
    drawn = np.concatenate([maps[[0, 0, 0]], maps[[5]]])
    np.testing.assert_allclose(running.resampled_means[0], running.mean)
    np.testing.assert_allclose(running.resampled_variances[0], running.variance)
    np.testing.assert_allclose(running.resampled_means[1], drawn.mean(axis=(0, 1, 2)))
    np.testing.assert_allclose(
        running.resampled_variances[1], drawn.var(axis=(0, 1, 2)), rtol=1e-9
    )
    assert np.isnan(running.resampled_means[2]).all()


def test_the_shift_interval_spans_the_resamples_and_is_nan_without_them():
    channels = 8
    layer = batch_norm("block8_1", np.ones(channels))
    means = {"bn": np.full(channels, 1.0)}
    variances = {"bn": np.ones(channels)}
    # 20 resamples whose means move from 0.5 to 1.5: shifts (d**2 / 2) 0.125 to 1.125.
    moved = np.linspace(0.5, 1.5, 20)[:, None] * np.ones(channels)
    profile = shift_profile(
        [layer],
        means,
        variances,
        True,
        resampled_means={"bn": moved},
        resampled_variances={"bn": np.ones((20, channels))},
    )
    row = profile.iloc[0]
    shifts = np.linspace(0.5, 1.5, 20) ** 2 / 2
    assert row["shift"] == pytest.approx(0.5, rel=1e-3)
    assert row["shift_low"] == pytest.approx(np.percentile(shifts, 5), rel=1e-3)
    assert row["shift_high"] == pytest.approx(np.percentile(shifts, 95), rel=1e-3)
    assert row["shift_low"] < row["shift"] < row["shift_high"]
    alone = shift_profile([layer], means, variances, True).iloc[0]
    assert np.isnan(alone["shift_low"]) and np.isnan(alone["shift_high"])


def test_a_few_channels_silent_on_the_source_do_not_set_a_layers_shift():
    """62 channels with their mean moved by 1.4 SD, 2 nearly silent on the source
    (variance 1e-4) that any target wakes: the layer's shift is the moved channels'."""
    channels = 64
    stored_variance = np.ones(channels)
    stored_variance[:2] = 1e-4
    layer = batch_norm("block35_1", stored_variance)
    target_mean = np.full(channels, np.sqrt(2.0))  # d**2 / 2 = 1 with unit variances
    target_variance = np.ones(channels)
    profile = shift_profile([layer], {"bn": target_mean}, {"bn": target_variance}, True)
    per_channel = symmetric_kl(
        target_mean, target_variance, layer.moving_mean, stored_variance, 1e-3
    ).shift
    # The mean over channels is set by the two silent ones.
    assert per_channel.mean() > 20
    assert profile.loc[0, "shift"] == pytest.approx(1.0, rel=0.01)
    assert profile.loc[0, "shift"] == pytest.approx(
        profile.loc[0, "mean_part"] + profile.loc[0, "variance_part"]
    )
