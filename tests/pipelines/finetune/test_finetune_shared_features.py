"""Pooled features shared between runs (``finetune.feature_cache_dir``).

Counterfactual variants whose frozen backbones map the same images to the same
features compute them once; anything that changes the features (the weights, the
input scaling or the grayscale rule) must give another file.
"""

from __future__ import annotations

import logging

import numpy as np

from irv2_pipeline.classifier import HeadSpec, build_classifier
from irv2_pipeline.images import OpenPolicy
from irv2_pipeline.pipelines.finetune.cached_head import (
    pooled_features,
    shared_pooled_features,
)

from .conftest import CLASSES, IMAGE_SIZE, demo_examples, mini_classifier, mini_irv2

SETTINGS = {"image_size": IMAGE_SIZE, "policy": OpenPolicy(), "batch_size": 4}


def test_the_same_frozen_backbone_computes_features_once(tmp_path, caplog):
    train, _ = demo_examples(train_per_class=2, val_per_class=1)
    caplog.set_level(logging.INFO)
    first = shared_pooled_features(
        mini_classifier(), train, cache_dir=tmp_path, **SETTINGS
    )
    assert "Cached 6 pooled features" in caplog.text
    caplog.clear()
    # Another run, built the same way: its features come from the first's file...
    other = mini_classifier()
    second = shared_pooled_features(other, train, cache_dir=tmp_path, **SETTINGS)
    assert "read from" in caplog.text and "Cached" not in caplog.text
    # ... and are what it would have computed itself.
    np.testing.assert_allclose(second, pooled_features(other, train, **SETTINGS))
    np.testing.assert_array_equal(first, second)
    assert len(list(tmp_path.iterdir())) == 1


def test_other_weights_scaling_or_grayscale_give_other_features(tmp_path):
    train, _ = demo_examples(train_per_class=2, val_per_class=1)
    shared_pooled_features(
        mini_classifier(seed=0), train, cache_dir=tmp_path, **SETTINGS
    )
    shared_pooled_features(
        mini_classifier(seed=1), train, cache_dir=tmp_path, **SETTINGS
    )
    scaled = build_classifier(
        mini_irv2(seed=0), CLASSES, HeadSpec(dropout=0.0), 0, "zero_to_one"
    )
    shared_pooled_features(scaled, train, cache_dir=tmp_path, **SETTINGS)
    grey = build_classifier(
        mini_irv2(seed=0), CLASSES, HeadSpec(dropout=0.0), 0, grayscale="luminance"
    )
    shared_pooled_features(grey, train, cache_dir=tmp_path, **SETTINGS)
    assert len(list(tmp_path.iterdir())) == 4
