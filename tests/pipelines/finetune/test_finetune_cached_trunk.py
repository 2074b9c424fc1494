"""A stage that unfreezes from a unit trains on the frozen layers' outputs, cached."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from irv2_pipeline.backbone import unit_map
from irv2_pipeline.pipelines.finetune.training import TrainingSettings

from .conftest import demo_examples, mini_classifier, stage, train


def trained(checkpoints, stages, **settings):
    """The final weights and state of training a fresh ``mini_classifier``."""
    classifier = mini_classifier()
    state = train(classifier, stages, demo_examples(3, 1), checkpoints, **settings)
    return classifier.model.get_weights(), state


@pytest.mark.parametrize("bn_policy", ["frozen", "train"])
def test_training_on_cached_trunk_outputs_gives_the_model_training_on_images_does(
    tmp_path, bn_policy
):
    stages = [stage("top", "block8_1", epochs=2, bn_policy=bn_policy)]
    cached, cached_state = trained(tmp_path / "cached", stages)
    images, image_state = trained(
        tmp_path / "images", stages, cache_trunk_outputs=False
    )
    assert cached_state.stage_records[0]["cached_trunk"] == "block8_1"
    assert image_state.stage_records[0]["cached_trunk"] is None
    # Training changed the unfrozen layers, and both ways alike.
    assert not np.allclose(cached[-1], mini_classifier().model.get_weights()[-1])
    for with_cache, without in zip(cached, images, strict=True):
        np.testing.assert_allclose(with_cache, without, rtol=1e-4, atol=1e-6)
    for row, other in zip(cached_state.history, image_state.history, strict=True):
        assert row["loss"] == pytest.approx(other["loss"], rel=1e-4)
        assert row["val_loss"] == pytest.approx(other["val_loss"], rel=1e-4)


def test_the_head_stages_pass_serves_the_later_stages_whose_layers_stay_frozen(
    tmp_path, caplog
):
    # mixed_7a's stage trains the layers below block8_1: the outputs the head pass
    # computed for block8_1 are no longer theirs, and that stage computes its own.
    # (A plan refuses this order; run_stages itself takes any.)
    stages = [
        stage("head", None),
        stage("lower", "mixed_7a"),
        stage("upper", "block8_1"),
    ]
    with caplog.at_level(logging.INFO):
        cached, cached_state = trained(tmp_path / "cached", stages)
    log = caplog.text
    images, image_state = trained(
        tmp_path / "images", stages, cache_trunk_outputs=False
    )
    # The head's pass (9 training images) gave both; block8_1's stage ran its own.
    assert "Cached 9 inputs of mixed_7a" in log
    assert log.count("Cached 9 inputs of block8_1") == 2
    assert (
        "Stage 'lower' trains on the outputs of the frozen layers below mixed_7a, "
        "computed in the head stage's backbone pass" in log
    )
    assert (
        "Stage 'upper' trains on the outputs of the frozen layers below block8_1 ("
        in log
    )
    assert [r["cached_trunk"] for r in cached_state.stage_records] == [
        None,
        "mixed_7a",
        "block8_1",
    ]
    for with_cache, without in zip(cached, images, strict=True):
        np.testing.assert_allclose(with_cache, without, rtol=1e-4, atol=1e-6)
    for row, other in zip(cached_state.history, image_state.history, strict=True):
        assert row["val_loss"] == pytest.approx(other["val_loss"], rel=1e-4)


def test_statistics_adapted_again_drop_the_outputs_the_head_stage_computed(
    tmp_path, caplog
):
    # The smoke plan's kind: every stage adapts BatchNorm. block8_1's stage keeps the
    # head's statistics (nothing trained since); mixed_7a's re-estimates them after
    # block8_1's stage trained the backbone, so its inputs are computed again.
    stages = [
        stage(name, unfreeze_from, bn_policy="adapt")
        for name, unfreeze_from in [
            ("head", None),
            ("upper", "block8_1"),
            ("lower", "mixed_7a"),
        ]
    ]
    with caplog.at_level(logging.INFO):
        cached, cached_state = trained(tmp_path / "cached", stages)
    log = caplog.text
    images, _ = trained(tmp_path / "images", stages, cache_trunk_outputs=False)
    assert log.count("BatchNorm statistics re-estimated (adapt)") == 2
    assert (
        "Stage 'upper' trains on the outputs of the frozen layers below block8_1, "
        "computed in the head stage's backbone pass" in log
    )
    assert (
        "Stage 'lower' trains on the outputs of the frozen layers below mixed_7a ("
        in log
    )
    assert cached_state.stage_records[2]["cached_trunk"] == "mixed_7a"
    for with_cache, without in zip(cached, images, strict=True):
        np.testing.assert_allclose(with_cache, without, rtol=1e-4, atol=1e-6)


def test_outputs_over_the_memory_limit_are_not_cached(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        _, state = trained(
            tmp_path, [stage("top", "block8_1")], trunk_cache_max_mb=1e-6
        )
    assert state.stage_records[0]["cached_trunk"] is None
    assert "over finetune.trunk_cache_max_mb = 1e-06" in caplog.text
    assert "runs its frozen layers in every step" in caplog.text


def test_a_layer_index_that_cuts_a_block_trains_on_images(tmp_path):
    backbone = mini_classifier().backbone
    units = unit_map(backbone)
    # The BatchNorm after block8_1's first convolution: the cut splits the block.
    first = next(
        index
        for index, layer in enumerate(backbone.layers)
        if units[layer.name] == "block8_1"
    )
    _, state = trained(tmp_path, [stage("top", first + 1)])
    assert state.stage_records[0]["cached_trunk"] is None


def test_a_negative_memory_limit_is_refused():
    with pytest.raises(ValueError, match="trunk_cache_max_mb = -1 must be at least 0"):
        TrainingSettings.from_params(
            {"batch_size": 4, "trunk_cache_max_mb": -1},
            {"image_size": 75, "seed": 0},
            {},
            tensorboard_dir=None,
        )
