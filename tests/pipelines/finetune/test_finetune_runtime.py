"""Mixed precision and tf.distribute: the paths a GPU box takes, exercised on CPU."""

from __future__ import annotations

import importlib.util
import json

import keras
import numpy as np
import pytest

from irv2_pipeline.classifier import HeadSpec, build_classifier
from irv2_pipeline.pipelines.finetune.runtime import (
    distribution_strategy,
    dtype_policy,
    precision_policy,
)

from .conftest import CLASSES, PROJECT_ROOT, demo_examples, mini_irv2, stage, train
from .test_finetune_faults import run_child


def test_auto_precision_follows_the_gpus():
    assert precision_policy("auto", []) == "float32"
    assert precision_policy("auto", [(9, 0)]) == "mixed_bfloat16"
    assert precision_policy("auto", [(9, 0), (7, 5)]) == "mixed_float16"
    assert precision_policy("mixed_float16", []) == "mixed_float16"
    with pytest.raises(ValueError, match="finetune.mixed_precision = 'half'"):
        precision_policy("half", [])
    with pytest.raises(ValueError, match="finetune.distribution = 'tpu'"):
        distribution_strategy("tpu")


def test_mixed_precision_trains_with_float32_probabilities(tmp_path):
    with dtype_policy("mixed_bfloat16"):
        classifier = build_classifier(mini_irv2(), CLASSES, HeadSpec(), seed=0)
        state = train(
            classifier,
            [stage("head", None), stage("top", "block8_1", learning_rate=1e-4)],
            demo_examples(2, 1),
            tmp_path,
        )
    assert classifier.backbone.get_layer("conv_7b").compute_dtype == "bfloat16"
    assert classifier.model.output.dtype == "float32"
    assert all(np.isfinite(row["loss"]) for row in state.history)
    assert [row["stage"] for row in state.history] == ["head", "top"]


def test_mirrored_strategy_trains_on_two_logical_cpus(tmp_path):
    finished = run_child(
        tmp_path,
        "--logical-cpus",
        "2",
        "--distribution",
        "mirrored",
        "--top-epochs",
        "1",
        "--head-solver",
        "lbfgs",
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "MirroredStrategy on 2 replicas" in finished.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    # 4 images per replica: a global batch of 8.
    assert [r["global_batch_size"] for r in result["records"]] == [8, 8]
    assert [(h["stage"], h["epoch"]) for h in result["history"]] == [
        ("head", 1),
        ("top", 1),
    ]
    assert all(np.isfinite(h["loss"]) for h in result["history"])


def test_the_train_step_bench_trains_the_pipelines_model(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "train_step_bench", PROJECT_ROOT / "bench" / "train_step.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    backbone = mini_irv2()
    before = backbone.get_layer("conv_7b").kernel.numpy().copy()
    trainee = bench.build_trainee(backbone, "block8_1", "frozen", jit=False)
    assert trainee.get_layer("backbone_inference_mode") is not None
    figures = bench.measure(trainee, batch_size=2, warmup_steps=1, steps=2)
    assert figures["images_per_second"] > 0
    assert not np.array_equal(before, backbone.get_layer("conv_7b").kernel.numpy())


def test_the_train_step_bench_counts_flops_from_the_first_trainable_layer_on():
    spec = importlib.util.spec_from_file_location(
        "train_step_bench", PROJECT_ROOT / "bench" / "train_step.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pixels = keras.Input((8, 8, 3))
    frozen = keras.layers.Conv2D(4, 3, padding="same", trainable=False)
    trained = keras.layers.Conv2D(5, 1)
    logits = keras.layers.Dense(2)
    x = trained(frozen(pixels))
    model = keras.Model(pixels, logits(keras.layers.GlobalAveragePooling2D()(x)))
    macs = {"frozen": 8 * 8 * 3 * 3 * 3 * 4, "trained": 8 * 8 * 4 * 5, "dense": 5 * 2}
    training, forward = bench.model_flops_per_image(model)
    assert forward == 2 * sum(macs.values())
    # Input and weight gradients of the trained layers; none below them.
    assert training == forward + 4 * (macs["trained"] + macs["dense"])
