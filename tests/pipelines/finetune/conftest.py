"""Fixtures of the finetune tests: demo images, and a small stand-in for IRv2.

Tracing a training step of the real IRv2 costs one to three minutes on two CPU cores,
so the tests of the training mechanics use ``mini_irv2``: a tiny network whose layer
names follow IRv2's, so that ``backbone.unit_map``, ``set_trainable_from``, the
BatchNorm policies and the layer-wise learning rates treat it exactly as IRv2 (every
unit has a BatchNorm layer, all seven block groups are there). One test runs the
real IRv2 end to end (``test_finetune_irv2.py``).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import shutil
import tempfile
from pathlib import Path

import keras
import pandas as pd
import pytest
import yaml

from irv2_pipeline.classifier import Classifier, HeadSpec, build_classifier
from irv2_pipeline.datasets import GeneratedImageFolderDataset, ImageFolder
from irv2_pipeline.pipelines.augmentation.nodes import write_resized_images
from irv2_pipeline.pipelines.finetune.checkpoints import CheckpointStore
from irv2_pipeline.pipelines.finetune.examples import (
    Examples,
    ResizedImages,
    split_examples,
)
from irv2_pipeline.pipelines.finetune.stages import Stage
from irv2_pipeline.pipelines.finetune.training import TrainingSettings, run_stages
from tests.conftest import project_parameters

PROJECT_ROOT = Path(__file__).resolve().parents[3]
DEMO_IMAGES = PROJECT_ROOT / "data" / "01_raw" / "images"
IMAGE_SIZE = 75
# IRv2's units as mini_irv2 has them, input to output.
MINI_UNITS = [
    "stem",
    "mixed_5b",
    "block35_1",
    "mixed_6a",
    "block17_1",
    "mixed_7a",
    "block8_1",
    "block8_2",
    "conv_7b",
]


def mini_irv2(image_size: int = IMAGE_SIZE, seed: int = 0) -> keras.Model:
    """A tiny backbone with IRv2's layer names and units (see the module docstring)."""
    counter = iter(range(1000))

    def init():
        return keras.initializers.HeNormal(seed * 1000 + next(counter))

    def conv_bn(x, filters, strides=1):
        x = keras.layers.Conv2D(
            filters,
            3,
            strides=strides,
            padding="same",
            use_bias=False,
            kernel_initializer=init(),
        )(x)
        x = keras.layers.BatchNormalization()(x)
        return keras.layers.Activation("relu")(x)

    pixels = keras.Input((image_size, image_size, 3))
    x = conv_bn(pixels, 8, strides=2)
    x = keras.layers.MaxPooling2D(3, strides=2)(x)
    x = conv_bn(x, 8)
    x = keras.layers.MaxPooling2D(3, strides=2)(x)
    x = conv_bn(x, 8)
    x = keras.layers.Concatenate(name="mixed_5b")([x, x])
    for unit in ("block35_1", "mixed_6a", "block17_1", "mixed_7a", "block8_1"):
        x = conv_bn(x, 16, strides=2 if unit.startswith("mixed") else 1)
        if unit.startswith("mixed"):
            x = keras.layers.Concatenate(name=unit)([x, x])
        else:
            x = keras.layers.Conv2D(
                16, 1, kernel_initializer=init(), name=f"{unit}_conv"
            )(x)
            x = keras.layers.Activation("relu", name=f"{unit}_ac")(x)
    x = conv_bn(x, 16)
    x = keras.layers.Conv2D(16, 1, kernel_initializer=init(), name="block8_2_conv")(x)
    x = keras.layers.Activation("linear", name="block8_2_ac")(x)
    x = keras.layers.Conv2D(
        24, 1, use_bias=False, kernel_initializer=init(), name="conv_7b"
    )(x)
    x = keras.layers.BatchNormalization(name="conv_7b_bn")(x)
    x = keras.layers.Activation("relu", name="conv_7b_ac")(x)
    return keras.Model(pixels, x, name="mini_irv2")


def demo_manifest(train_per_class: int, val_per_class: int) -> pd.DataFrame:
    """A manifest of the first demo images of each class (28x28 Fashion-MNIST)."""
    rows = []
    for folder in sorted(DEMO_IMAGES.iterdir()):
        files = sorted(folder.glob("*.png"))[: train_per_class + val_per_class]
        for index, file in enumerate(files):
            rows.append(
                {
                    "path": f"{folder.name}/{file.name}",
                    "label": folder.name,
                    "split": "train" if index < train_per_class else "val",
                    "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
                }
            )
    return pd.DataFrame(rows)


@functools.cache
def resized_demo(image_size: int = IMAGE_SIZE) -> tuple[pd.DataFrame, Path]:
    """Every demo image at ``image_size``, as the augmentation pipeline writes them.

    Written once per test process (a second or two) into a temporary folder, by the
    pipeline's own node and dataset. Returns ``resized_manifest`` and the folder.
    """
    folder = Path(tempfile.mkdtemp(prefix="irv2_resized_demo_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    jobs, resized_manifest = write_resized_images(
        demo_manifest(10_000, 0),
        ImageFolder(DEMO_IMAGES),
        {},
        {"image_size": image_size},
        {"preset": "none", "copies": 0, "workers": 1},
    )
    GeneratedImageFolderDataset(path=str(folder)).save(jobs)
    return resized_manifest, folder


def demo_resized(manifest: pd.DataFrame) -> ResizedImages:
    """The resized files of a demo manifest's images (see :func:`resized_demo`)."""
    resized_manifest, folder = resized_demo()
    return ResizedImages.checked(
        resized_manifest, ImageFolder(folder), manifest, IMAGE_SIZE
    )


def load_parameters(name: str, env: str = "base") -> dict:
    """``conf/base/<name>.yml`` as written there; for another env, what a run gets."""
    if env != "base":
        return project_parameters(env)
    return yaml.safe_load((PROJECT_ROOT / "conf" / env / f"{name}.yml").read_text())


@pytest.fixture
def raw_images() -> ImageFolder:
    """The demo image folder (read only)."""
    return ImageFolder(DEMO_IMAGES)


@pytest.fixture
def plan_rules() -> dict:
    """``conf/base``'s learning-rate limits (feature_shift.plan_rules)."""
    return load_parameters("parameters_feature_shift")["feature_shift"]["plan_rules"]


@pytest.fixture
def finetune_params(tmp_path) -> dict:
    """``conf/smoke``'s finetune parameters, writing into ``tmp_path``."""
    params = load_parameters("parameters_finetune", "smoke")["finetune"]
    params["batch_size"] = 4
    params["checkpoint_dir"] = str(tmp_path / "checkpoints")
    params["tensorboard_dir"] = str(tmp_path / "tensorboard")
    return params


CLASSES = ["bag", "sneaker", "trouser"]


def mini_classifier(
    seed: int = 0, dropout: float = 0.0, input_scaling: str = "minus_one_to_one"
) -> Classifier:
    """``mini_irv2`` with a one-layer head over the demo classes."""
    return build_classifier(
        mini_irv2(seed=seed),
        CLASSES,
        HeadSpec(dropout=dropout),
        seed=seed,
        input_scaling=input_scaling,
    )


def demo_examples(
    train_per_class: int, val_per_class: int
) -> tuple[Examples, Examples]:
    """Training and validation examples of the first demo images."""
    manifest = demo_manifest(train_per_class, val_per_class)
    resized = demo_resized(manifest)
    return (
        split_examples(manifest, resized, CLASSES, "train"),
        split_examples(manifest, resized, CLASSES, "val"),
    )


def stage(name: str, unfreeze_from: str | None, **settings) -> Stage:
    """A stage of one epoch at learning rate 1e-2 unless ``settings`` say otherwise."""
    values = {
        "epochs": 1,
        "learning_rate": 1e-2,
        "bn_policy": "frozen",
        "warmup_epochs": 0,
        "weight_decay": 0.0,
        **settings,
    }
    return Stage(name=name, unfreeze_from=unfreeze_from, **values)


def train(
    classifier: Classifier,
    stages: list[Stage],
    examples: tuple[Examples, Examples],
    checkpoints: Path,
    callbacks: tuple = (),
    *,
    plan_rules: dict | None = None,
    **settings,
):
    """Runs ``training.run_stages`` with small settings; returns the final state."""
    values = {"image_size": IMAGE_SIZE, "seed": 3, "batch_size": 4, **settings}
    return run_stages(
        classifier,
        stages,
        train=examples[0],
        val=examples[1],
        settings=TrainingSettings(**values),
        store=CheckpointStore(checkpoints, "run"),
        callbacks=callbacks,
        plan_rules=plan_rules,
    )
