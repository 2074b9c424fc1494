"""The pipeline as Kedro runs it: its datasets, augmented copies, and what it writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.json import JSONDataset
from kedro_datasets.matplotlib import MatplotlibDataset
from kedro_datasets.pandas import CSVDataset

from irv2_pipeline.datasets import ImageFolder, ImageFolderDataset
from irv2_pipeline.datasets.atomic_model import AtomicTensorFlowModelDataset
from irv2_pipeline.pipelines.finetune import create_pipeline, nodes, training
from irv2_pipeline.pipelines.finetune.checkpoints import CheckpointStore, TrainingState
from irv2_pipeline.pipelines.finetune.examples import (
    ExamplesError,
    ResizedImages,
    training_examples,
)
from irv2_pipeline.pipelines.finetune.training import TrainingDivergedError
from tests.conftest import planned_source

from .conftest import (
    CLASSES,
    DEMO_IMAGES,
    IMAGE_SIZE,
    PROJECT_ROOT,
    demo_manifest,
    demo_resized,
    mini_irv2,
    resized_demo,
)

STAGES = [
    {
        "name": "head",
        "unfreeze_from": None,
        "epochs": 2,
        "learning_rate": 1e-3,
        "bn_policy": "frozen",
    },
    {
        "name": "top",
        "unfreeze_from": "block8_1",
        "epochs": 1,
        "learning_rate": 1e-4,
        "bn_policy": "frozen",
    },
]


@pytest.fixture
def augmented(tmp_path) -> tuple[Path, pd.DataFrame]:
    """One "augmented copy" (a plain copy) of the first training image of each class."""
    root = tmp_path / "augmented"
    rows = []
    manifest = demo_manifest(train_per_class=2, val_per_class=1)
    for source in manifest[manifest["split"] == "train"].groupby("label").head(1).path:
        label = source.split("/")[0]
        copy = f"{label}/{Path(source).stem}__c0.png"
        (root / label).mkdir(parents=True, exist_ok=True)
        shutil.copy2(DEMO_IMAGES / source, root / copy)
        rows.append({"path": copy, "source_path": source, "label": label, "copy": 0})
    return root, pd.DataFrame(rows)


def catalog_for(tmp_path, augmented, finetune_params, plan_rules) -> DataCatalog:
    root, augmented_manifest = augmented
    return DataCatalog(
        datasets={
            "image_manifest": MemoryDataset(demo_manifest(2, 1)),
            "augmented_manifest": MemoryDataset(augmented_manifest),
            "finetune_plan": MemoryDataset(
                {"stages": STAGES, "rationale": [], "source": planned_source()}
            ),
            "resized_manifest": MemoryDataset(resized_demo()[0]),
            "resized_images": ImageFolderDataset(path=str(resized_demo()[1])),
            "augmented_images": ImageFolderDataset(path=str(root)),
            "params:model": MemoryDataset(
                {"weights": None, "image_size": IMAGE_SIZE, "seed": 7}
            ),
            "params:images": MemoryDataset({}),
            "params:finetune": MemoryDataset(finetune_params),
            "params:feature_shift.plan_rules": MemoryDataset(plan_rules),
            "finetuned_model": AtomicTensorFlowModelDataset(
                filepath=str(tmp_path / "out" / "model.keras")
            ),
            "training_history": CSVDataset(filepath=str(tmp_path / "out/history.csv")),
            "finetune_stages": CSVDataset(filepath=str(tmp_path / "out/stages.csv")),
            "class_names": JSONDataset(filepath=str(tmp_path / "out/classes.json")),
            "training_curves_plot": MatplotlibDataset(
                filepath=str(tmp_path / "out/curves.png")
            ),
        }
    )


def test_pipeline_follows_the_plan_on_originals_and_copies_and_writes_it_all(
    tmp_path, augmented, finetune_params, plan_rules, monkeypatch
):
    monkeypatch.setattr(nodes, "load_irv2", lambda weights, size: mini_irv2(size))
    catalog = catalog_for(tmp_path, augmented, finetune_params, plan_rules)
    SequentialRunner().run(create_pipeline(), catalog)

    history = catalog.load("training_history")
    assert list(history.columns[:7]) == [
        "stage",
        "epoch",
        "loss",
        "accuracy",
        "val_loss",
        "val_accuracy",
        "learning_rate",
    ]
    # The head is fitted by L-BFGS (one row, no learning rate), whatever the plan's
    # head epochs; the top stage trains its epoch.
    assert list(zip(history["stage"], history["epoch"], strict=True)) == [
        ("head", 1),
        ("top", 1),
    ]
    assert np.isfinite(history[["loss", "val_loss"]]).all().all()
    assert history["learning_rate"].isna().tolist() == [True, False]
    stages = catalog.load("finetune_stages")
    assert list(stages["stage"]) == ["head", "top"]
    assert list(stages["solver"]) == ["lbfgs", "adamw"]
    assert stages["selected"].sum() == 1
    kept = stages[stages["selected"]].iloc[0]
    assert kept["best_val_loss"] == stages["best_val_loss"].min()
    assert "lowest validation loss" in kept["selection"]
    assert list(stages["train_images"]) == [9, 9]  # 6 originals + 3 copies
    assert list(stages["augmented_images"]) == [3, 3]
    assert list(stages["cached_features"]) == [True, False]
    assert list(stages["bn_policy"]) == ["frozen", "frozen"]
    assert stages["trainable_params"].iloc[1] > stages["trainable_params"].iloc[0]
    assert catalog.load("class_names") == CLASSES
    assert (tmp_path / "out/curves.png").stat().st_size > 0

    model = catalog.load("finetuned_model")
    pixels = np.full((2, IMAGE_SIZE, IMAGE_SIZE, 3), 200.0, "float32")
    probabilities = model.predict(pixels, verbose=0)
    assert probabilities.shape == (2, len(CLASSES))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    # Finished, and kept for hooks.FinishedCheckpointsHook to delete after the save.
    (state,) = (tmp_path / "checkpoints").glob("*/state.json")
    assert json.loads(state.read_text())["finished"]


def test_a_diverging_run_saves_no_model(
    tmp_path, augmented, finetune_params, plan_rules, monkeypatch
):
    def poisoned(weights, size):
        backbone = mini_irv2(size)
        kernel = backbone.get_layer("conv_7b").kernel
        kernel.assign(np.full(kernel.shape, np.inf, "float32"))
        return backbone

    monkeypatch.setattr(nodes, "load_irv2", poisoned)
    catalog = catalog_for(tmp_path, augmented, finetune_params, plan_rules)
    with pytest.raises(TrainingDivergedError, match="No model was saved"):
        SequentialRunner().run(create_pipeline(), catalog)
    assert not (tmp_path / "out").exists()


def test_augmented_copies_of_non_training_images_are_refused(augmented):
    root, copies = augmented
    manifest = demo_manifest(train_per_class=2, val_per_class=1)
    leaked = copies.copy()
    val_image = manifest.loc[manifest["split"] == "val", "path"].iloc[0]
    leaked.loc[0, "source_path"] = val_image
    with pytest.raises(ExamplesError, match="not in the training split"):
        training_examples(
            manifest, leaked, demo_resized(manifest), ImageFolder(root), CLASSES
        )
    relabelled = copies.copy()
    relabelled.loc[0, "label"] = (
        "trouser" if copies.loc[0, "label"] != "trouser" else "bag"
    )
    with pytest.raises(ExamplesError, match="another label than their source"):
        training_examples(
            manifest, relabelled, demo_resized(manifest), ImageFolder(root), CLASSES
        )


def test_the_catalog_declares_every_output_and_the_inputs_come_from_upstream():
    pipeline = create_pipeline()
    catalog = yaml.safe_load(
        (PROJECT_ROOT / "conf/base/catalog_finetune.yml").read_text()
    )
    assert set(pipeline.outputs()) <= set(catalog)
    assert catalog["finetuned_model"]["filepath"].startswith("data/06_models/")
    assert set(pipeline.inputs()) == {
        "image_manifest",
        "augmented_manifest",
        "finetune_plan",
        "resized_manifest",
        "resized_images",
        "augmented_images",
        "params:model",
        "params:images",
        "params:finetune",
        "params:feature_shift.plan_rules",
    }


class _Stop(Exception):
    """Ends train_classifier where it hands its inputs to training."""


@pytest.mark.parametrize("transductive", [False, True])
def test_bn_adaptation_sees_held_out_pixels_only_when_asked(
    tmp_path, finetune_params, plan_rules, monkeypatch, transductive
):
    manifest = demo_manifest(train_per_class=2, val_per_class=2)
    # The second validation image of each class is a test image.
    held_out = manifest.index[manifest["split"] == "val"][1::2]
    manifest.loc[held_out, "split"] = "test"
    seen = {}

    def hand_over(*args, adapt_on, **kwargs):
        seen["paths"] = list(adapt_on.paths)
        raise _Stop

    # The node imports run_stages from `training` when it runs: patch it there.
    monkeypatch.setattr(training, "run_stages", hand_over)
    monkeypatch.setattr(nodes, "load_irv2", lambda weights, size: mini_irv2(size))
    with pytest.raises(_Stop):
        nodes.train_classifier(
            image_manifest=manifest,
            augmented_manifest=manifest.iloc[0:0],
            finetune_plan={
                "stages": STAGES,
                "rationale": [],
                "source": planned_source(),
            },
            resized_manifest=resized_demo()[0],
            resized_images=ImageFolder(resized_demo()[1]),
            augmented_images=ImageFolder(tmp_path / "none"),
            model={"weights": None, "image_size": IMAGE_SIZE, "seed": 7},
            images={},
            finetune={**finetune_params, "adapt_bn_transductive": transductive},
            plan_rules=plan_rules,
        )
    splits = ("train", "val", "test") if transductive else ("train",)
    resized = demo_resized(manifest)
    expected = [
        resized.path_of(path)
        for split in splits
        for path in manifest.loc[manifest["split"] == split, "path"]
    ]
    assert seen["paths"] == expected


def test_a_changed_resized_set_starts_training_afresh_instead_of_resuming(
    tmp_path, finetune_params, plan_rules, monkeypatch
):
    manifest = demo_manifest(train_per_class=2, val_per_class=1)
    resized_manifest, folder = resized_demo()
    stores: list[CheckpointStore] = []

    def hand_over(*args, store, **kwargs):
        stores.append(store)
        raise _Stop

    monkeypatch.setattr(training, "run_stages", hand_over)
    monkeypatch.setattr(nodes, "load_irv2", lambda weights, size: mini_irv2(size))

    def checkpoint_store(resized: pd.DataFrame) -> CheckpointStore:
        with pytest.raises(_Stop):
            nodes.train_classifier(
                image_manifest=manifest,
                augmented_manifest=manifest.iloc[0:0],
                finetune_plan={
                    "stages": STAGES,
                    "rationale": [],
                    "source": planned_source(),
                },
                resized_manifest=resized,
                resized_images=ImageFolder(folder),
                augmented_images=ImageFolder(tmp_path / "none"),
                model={"weights": None, "image_size": IMAGE_SIZE, "seed": 7},
                images={},
                finetune=finetune_params,
                plan_rules=plan_rules,
            )
        return stores[-1]

    # A run stopped in its second stage left a checkpoint; the same inputs resume it.
    checkpoint_store(resized_manifest).save(
        TrainingState(stage_index=1), {"base": [np.zeros(3)]}
    )
    assert checkpoint_store(resized_manifest).load().stage_index == 1
    # The resized files of two training images of one class swapped: every check
    # passes, but training would read other pixels.
    swapped = resized_manifest.copy()
    rows = swapped.index[swapped["path"].isin(manifest["path"][:2])]
    swapped.loc[rows, "file"] = swapped.loc[rows[::-1], "file"].to_numpy()
    assert checkpoint_store(swapped).load() is None


def test_training_refuses_resized_images_of_other_bytes_or_size():
    manifest = demo_manifest(train_per_class=2, val_per_class=1)
    resized_manifest, folder = resized_demo()
    changed = manifest.copy()
    changed.loc[0, "sha256"] = "0" * 64  # the raw file changed after augmentation
    with pytest.raises(ExamplesError, match="no up-to-date resized image"):
        ResizedImages.checked(
            resized_manifest, ImageFolder(folder), changed, IMAGE_SIZE
        )
    with pytest.raises(ExamplesError, match="written at \\[75\\] px"):
        ResizedImages.checked(resized_manifest, ImageFolder(folder), manifest, 299)
