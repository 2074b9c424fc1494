"""Fixtures of the evaluation tests: small real images, a tiny model, upstream outputs.

The images are noisy red, green and blue squares, and the model classifies them by
their mean colour, so every prediction is known in advance. One test image in the
``red`` folder is green: the model is confidently wrong about it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import imagehash
import keras
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from irv2_pipeline.backbone import PREPROCESS_LAYER, group_of
from irv2_pipeline.classifier import HEAD_MODEL, LOGITS_LAYER, POOLING_LAYERS
from irv2_pipeline.datasets import ImageFolder
from irv2_pipeline.images import OpenPolicy, fingerprint
from irv2_pipeline.pipelines.evaluation.metrics import prediction_table
from tests.conftest import (
    kedro,
    planned_source,
    project_parameters,
    with_smoke_stages,
)

PROJECT_ROOT = Path(__file__).resolve().parents[3]
IMAGE_SIZE = 32
COLOURS = {"blue": (40, 40, 220), "green": (40, 200, 40), "red": (220, 40, 40)}
CLASSES = sorted(COLOURS)
# Per class: images 0 and 1 train, 2 val, 3 and 4 test.
SPLIT_OF_INDEX = ("train", "train", "val", "test", "test")
MISLABELLED = "red/red_4.png"
# The manifest's columns that ingestion takes from images.fingerprint's statistics.
IMAGE_STATISTICS = ("mean_colour", "pixel_std", "brightness", "contrast")


# A planted cause's run: the whole smoke DAG with training cut to what the findings
# need. They read the test predictions, the occlusions and the training images'
# embeddings of whatever model training leaves, and a linear head fitted to convergence
# on cached pooled features (the smoke run's first stage, BatchNorm adapted) is such a
# model. Cut: the smoke run's second stage (one epoch from block8_1, with its range
# test), the augmented copies (they add training images to every class alike) and
# the feature_shift figures no finding here reads, on fewer images and permutations
# (random weights: the plan is feature_shift.default_stages).
CUT_TO_THE_FINDING = (
    "augmentation.preset=none,"
    "feature_shift.max_images_per_split=50,"
    "feature_shift.split_shift.permutations=100"
)
# For a finding the occlusion test does not feed: 4 random squares, not 16, each one
# forward pass over the test split fewer (the shortcut rule can still fire at 1 / 5).
WITHOUT_THE_OCCLUSION_NULL = (
    "evaluation.attribution.occlusion.random_patches=4,"
    "evaluation.diagnosis.shortcut.max_p_value=0.2"
)
HEAD_ONLY = [
    {
        "name": "head",
        "unfreeze_from": None,
        "epochs": 1,
        "learning_rate": 1.0e-3,
        "bn_policy": "adapt",
    }
]


def run_cut_to_the_finding(project: Path, *, reads_occlusion: bool = True) -> None:
    """``kedro run --env smoke`` in ``project``, cut as :data:`CUT_TO_THE_FINDING` says
    (the head-only stages through the copy's ``conf/smoke``), and for a finding that
    does not read the occlusion test, as :data:`WITHOUT_THE_OCCLUSION_NULL` says."""
    with_smoke_stages(project, HEAD_ONLY)
    params = CUT_TO_THE_FINDING
    if not reads_occlusion:
        params = f"{params},{WITHOUT_THE_OCCLUSION_NULL}"
    result = kedro(["run", "--env", "smoke", "--params", params], project, 1500)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]


def textured(colour: tuple[int, int, int], seed: int, size: int = 24) -> np.ndarray:
    """A square of ``colour`` with seeded noise, so every image hashes differently."""
    noise = np.random.default_rng(seed).integers(0, 80, size=(size, size, 3))
    return np.clip(np.array(colour) * 0.7 + noise, 0, 255).astype(np.uint8)


def load_parameters(name: str, env: str = "base") -> dict:
    """``conf/base/<name>.yml`` as written there; for another env, what a run gets."""
    if env != "base":
        return project_parameters(env)
    return yaml.safe_load((PROJECT_ROOT / "conf" / env / f"{name}.yml").read_text())


def pipeline_parameters() -> dict:
    """What the pipeline reads, by catalog name: conf/base's, for the tiny model.

    The model block fits the tiny model (pretrained weights, 32 px), and so does the
    Grad-CAM layer (its backbone's one convolution); the bootstrap is shortened.
    """
    evaluation = load_parameters("parameters_evaluation")["evaluation"]
    evaluation["bootstrap"] = {"resamples": 50, "seed": 7}
    evaluation["batch_size"] = 4
    evaluation["attribution"]["grad_cam"]["layer"] = "conv_colour"
    feature_shift = load_parameters("parameters_feature_shift")["feature_shift"]
    return {
        "params:model": {"weights": "imagenet", "image_size": IMAGE_SIZE, "seed": 1},
        "params:images": load_parameters("parameters")["images"],
        "params:feature_shift.plan_rules": feature_shift["plan_rules"],
        "params:evaluation": evaluation,
    }


@pytest.fixture
def evaluation_params() -> dict:
    """``conf/base``'s evaluation parameters, with a quick bootstrap."""
    return pipeline_parameters()["params:evaluation"]


@pytest.fixture
def plan_rules() -> dict:
    """``conf/base``'s learning-rate limits of every plan (feature_shift.plan_rules)."""
    return pipeline_parameters()["params:feature_shift.plan_rules"]


@pytest.fixture
def image_params() -> dict:
    """``conf/base``'s image-opening parameters."""
    return pipeline_parameters()["params:images"]


@pytest.fixture
def model_params() -> dict:
    """The model block the tiny model fits: pretrained weights, 32 px."""
    return pipeline_parameters()["params:model"]


@pytest.fixture
def colour_images(tmp_path) -> tuple[ImageFolder, pd.DataFrame]:
    """Five images per class on disk and their manifest, ingestion's columns."""
    return write_colour_images(tmp_path / "images")


def write_colour_images(root: Path) -> tuple[ImageFolder, pd.DataFrame]:
    """Writes five images per class under ``root``; returns it and its manifest."""
    rows = []
    for class_index, label in enumerate(CLASSES):
        (root / label).mkdir(parents=True)
        for index, split in enumerate(SPLIT_OF_INDEX):
            path = f"{label}/{label}_{index}.png"
            colour = COLOURS["green" if path == MISLABELLED else label]
            pixels = textured(colour, seed=10 * class_index + index)
            Image.fromarray(pixels).save(root / path)
            data = (root / path).read_bytes()
            record = fingerprint(root / path, OpenPolicy())
            rows.append(
                {
                    "path": path,
                    "label": label,
                    "split": split,
                    "group": f"g{class_index}{index}",
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "phash": str(imagehash.phash(Image.fromarray(pixels))),
                    "width": pixels.shape[1],
                    "height": pixels.shape[0],
                    "format": "PNG",
                    "mode": "RGB",
                    **{name: record[name] for name in IMAGE_STATISTICS},
                    "label_conflict": False,
                }
            )
    return ImageFolder(root), pd.DataFrame(rows)


def predictions_of(
    paths: list[str], labels: list[str], predicted: list[str], classes=CLASSES
) -> pd.DataFrame:
    """``test_predictions`` in which each image is predicted ``predicted``, surely."""
    probabilities = np.full((len(paths), len(classes)), 0.05 / (len(classes) - 1))
    probabilities[np.arange(len(paths)), [classes.index(p) for p in predicted]] = 0.95
    return prediction_table(paths, labels, classes, probabilities)


def colour_predictions(manifest: pd.DataFrame) -> pd.DataFrame:
    """What the colour classifier predicts for the test images: each one's colour."""
    test = manifest[manifest["split"] == "test"]
    predicted = [
        "green" if path == MISLABELLED else label
        for path, label in zip(test["path"], test["label"], strict=True)
    ]
    return predictions_of(list(test["path"]), list(test["label"]), predicted)


def colour_classifier(
    image_size: int = IMAGE_SIZE, activation: str = "softmax", classes: int = 3
) -> keras.Model:
    """Takes ``[0, 255]`` RGB, classifies blue/green/red by the mean colour.

    Built as ``classifier.build_classifier`` builds IRv2's classifier (preprocessing,
    a nested backbone, average pooling, a nested head with its logits layer), so
    Grad-CAM can take it apart: the backbone is one 1x1 convolution that passes the
    scaled colours through unchanged, with ReLU.
    """
    inputs = keras.Input((image_size, image_size, 3))
    scaled = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name=PREPROCESS_LAYER)(
        inputs
    )
    pixels = keras.Input((image_size, image_size, 3))
    convolution = keras.layers.Conv2D(3, 1, activation="relu", name="conv_colour")
    backbone = keras.Model(pixels, convolution(pixels), name="colour_backbone")
    convolution.set_weights(
        [np.eye(3, dtype=np.float32)[None, None], np.ones(3, dtype=np.float32)]
    )
    pooled = keras.layers.GlobalAveragePooling2D(name=POOLING_LAYERS[0])(
        backbone(scaled)
    )
    features = keras.Input((3,))
    dense = keras.layers.Dense(classes, name=LOGITS_LAYER)
    head = keras.Model(
        features, keras.layers.Activation(activation)(dense(features)), name=HEAD_MODEL
    )
    kernel = np.zeros((3, classes), dtype=np.float32)
    # Channels R, G, B vote for the classes red, green, blue (sorted: blue, green, red).
    for channel, label in enumerate(("red", "green", "blue")):
        kernel[channel, CLASSES.index(label)] = 6.0
    dense.set_weights([kernel, np.zeros(classes, dtype=np.float32)])
    return keras.Model(inputs, head(pooled))


@pytest.fixture
def colour_model() -> keras.Model:
    """The colour classifier with a softmax output."""
    return colour_classifier()


def history_frame(stages: dict[str, list[tuple[float, float, float, float]]]):
    """A training history: per stage, (loss, accuracy, val_loss, val_accuracy) rows.

    Epochs count from 1 within each stage, as finetune writes them.
    """
    rows = [
        {
            "stage": stage,
            "epoch": epoch,
            "loss": loss,
            "accuracy": accuracy,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "learning_rate": 1e-3 if stage == "head" else 1e-4,
        }
        for stage, epochs in stages.items()
        for epoch, (loss, accuracy, val_loss, val_accuracy) in enumerate(
            epochs, start=1
        )
    ]
    return pd.DataFrame(rows)


def healthy_history() -> pd.DataFrame:
    """Two stages that train well: losses fall, train and validation agree."""
    return history_frame(
        {
            "head": [(0.9, 0.70, 0.85, 0.72), (0.5, 0.86, 0.52, 0.84)],
            "block8_1": [(0.4, 0.90, 0.45, 0.88), (0.3, 0.93, 0.38, 0.90)],
        }
    )


def shift_profile(
    unit_shift: dict[str, float], low: dict[str, float] | None = None
) -> pd.DataFrame:
    """A BN shift profile (feature_shift's columns): two layers per unit.

    ``low``: a unit's bootstrap 5th percentile (default: its shift, a certain one).
    """
    rows = []
    for unit, shift in unit_shift.items():
        for part in range(2):
            rows.append(
                {
                    "layer": f"{unit}_bn_{part}",
                    "unit": unit,
                    "block": group_of(unit),
                    "depth": len(rows),
                    "shift": shift,
                    "shift_low": (low or {}).get(unit, shift),
                    "shift_high": shift,
                    "mean_part": shift / 2,
                    "variance_part": shift / 2,
                }
            )
    return pd.DataFrame(rows)


def plan(*unfreeze_from: str | None) -> dict:
    """A fine-tune plan whose stages unfreeze from the given units."""
    return {
        "stages": [
            {
                "name": start or "head",
                "unfreeze_from": start,
                "epochs": 2,
                "learning_rate": 1e-3 if start is None else 1e-4,
                "bn_policy": "frozen",
            }
            for start in unfreeze_from
        ],
        "rationale": ["the shift is small (mean 0.1 < 1.0)"],
        "source": planned_source("imagenet"),
        "source_reason": "Source `imagenet`, the only candidate.",
    }


def stages_frame(*unfreeze_from: str | None) -> pd.DataFrame:
    """``finetune_stages`` as finetune writes it, for the stages of :func:`plan`.

    Every stage's best epoch is its last; the model is saved from the last stage.
    """
    stages = plan(*unfreeze_from)["stages"]
    rows = [
        {
            "stage_index": index,
            "stage": stage["name"],
            **{key: value for key, value in stage.items() if key != "name"},
            "warmup_epochs": 0,
            "weight_decay": 1e-5,
            "epochs_trained": stage["epochs"],
            "best_epoch": stage["epochs"],
            "best_val_loss": 0.4,
            "selected": index == len(stages) - 1,
            "stopped_early": False,
            "trainable_params": 1000 * (index + 1),
            "cached_features": stage["unfreeze_from"] is None,
            "seconds": 1.0,
        }
        for index, stage in enumerate(stages)
    ]
    return pd.DataFrame(rows)


def stages_after(history: pd.DataFrame) -> pd.DataFrame:
    """``finetune_stages`` as finetune writes it after training ``history``.

    A stage is named after its ``unfreeze_from`` (``head``: head only). Each stage
    restores its epoch of lowest validation loss; the model is saved from the stage
    whose restored validation loss is lowest, the earlier one on a tie.
    """
    names = list(dict.fromkeys(history["stage"]))
    frame = stages_frame(*(None if name == "head" else name for name in names))
    lowest = history.groupby("stage", sort=False)["val_loss"].idxmin()
    best = history.loc[lowest].set_index("stage").loc[names]
    frame["best_epoch"] = best["epoch"].to_numpy()
    frame["best_val_loss"] = best["val_loss"].to_numpy()
    frame["selected"] = np.arange(len(names)) == best["val_loss"].to_numpy().argmin()
    return frame


@pytest.fixture
def upstream(colour_images) -> dict:
    """The outputs of the pipelines before evaluation, for a healthy run."""
    return upstream_outputs(colour_images[1])


def upstream_outputs(manifest: pd.DataFrame) -> dict:
    """The outputs of the pipelines before evaluation, for a healthy run."""
    return {
        "training_history": healthy_history(),
        "bn_shift_profile": shift_profile(
            {"stem": 0.1, "block35_1": 0.2, "block17_3": 0.3, "block8_2": 0.4}
        ),
        "split_shift": pd.DataFrame(
            {
                "pair": ["train-vs-val", "train-vs-test"],
                "frechet": [1.2, 1.4],
                "mmd2": [0.001, 0.002],
                "p_value": [0.6, 0.4],
                "verdict": ["no shift detected", "no shift detected"],
            }
        ),
        "transferability": pd.DataFrame(
            {"layer": ["mixed_5b", "conv_7b"], "logme": [-0.5, 0.3]}
        ),
        "source_ranking": pd.DataFrame(
            {"rank": [1], "source": ["imagenet"], "chosen": [True], "logme": [0.3]}
        ),
        "finetune_plan": plan(None, "block8_1"),
        "finetune_stages": stages_after(healthy_history()),
        "class_names": list(CLASSES),
        "duplicate_report": pd.DataFrame(
            columns=["group", "kind", "size", "labels", "label_conflict", "paths"]
        ),
        "dataset_summary": {
            "n_images": len(manifest),
            "n_rejected": 0,
            "counts": {label: {"train": 2, "val": 1, "test": 2} for label in CLASSES},
            "duplicate_groups": 0,
            "images_in_duplicate_groups": 0,
            "label_conflict_groups": 0,
            "label_conflict_images_kept": 0,
            "rejected_by_reason": {},
            "warnings": [],
        },
    }


def noise_estimate(**changes) -> dict:
    """``label_noise_estimate`` of a clean run of the colour images, with ``changes``.

    A dict in ``changes["classes"]`` updates that class's row (by class name).
    """
    estimate = {
        "method": "confident learning",
        "features": "pooled features",
        "folds": 2,
        "c": 0.1,
        "seed": 42,
        "estimated": True,
        "n_images": 60,
        "n_flagged": 0,
        "out_of_sample_accuracy": 0.95,
        "estimated_noise_rate": 0.0,
        "classes": [
            {
                "class": label,
                "training_images": 20,
                "noise_rate": 0.0,
                "mislabelled_share": 0.0,
                "flagged": 0,
            }
            for label in CLASSES
        ],
        "statement": "0 of 60 training images flagged",
    }
    rows = changes.pop("classes", {})
    for row in estimate["classes"]:
        row.update(rows.get(row["class"], {}))
    return {**estimate, **changes}
