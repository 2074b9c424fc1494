"""Faults: a run killed mid-stage resumes there; NaN stops it; the model file is whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from kedro.io import DatasetError

from irv2_pipeline.datasets.atomic_model import AtomicTensorFlowModelDataset
from irv2_pipeline.pipelines.finetune.checkpoints import (
    CheckpointStore,
    remove_finished_checkpoints,
)
from irv2_pipeline.pipelines.finetune.training import TrainingDivergedError

from . import child_run
from .conftest import PROJECT_ROOT, demo_examples, mini_classifier, stage, train

CHILD = Path(child_run.__file__)


def run_child(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KEDRO_DISABLE_TELEMETRY": "1"}
    return subprocess.run(
        [sys.executable, str(CHILD), str(workdir), *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_a_run_killed_in_stage_two_resumes_there_without_redoing_stage_one(tmp_path):
    killed = run_child(tmp_path, "--kill-at", "1:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (folder,) = (tmp_path / "checkpoints").iterdir()
    saved = json.loads((folder / "state.json").read_text())
    assert (saved["stage_index"], saved["epochs_done"]) == (1, 1)
    log = tmp_path / "epochs.log"
    assert log.read_text().split("\n")[:-1] == [
        "head_on_features 0",
        "irv2_classifier_bn_frozen 0",
        "irv2_classifier_bn_frozen 1",
    ]
    log.unlink()

    result = child_run.run(tmp_path)

    # Only the rest of stage two was trained, from its second epoch on.
    assert log.read_text().split("\n")[:-1] == [
        "irv2_classifier_bn_frozen 1",
        "irv2_classifier_bn_frozen 2",
    ]
    history = result["history"]
    assert [(row["stage"], row["epoch"]) for row in history] == [
        ("head", 1),
        ("top", 1),
        ("top", 2),
        ("top", 3),
    ]
    assert history[:2] == saved["history"]
    assert [r["epochs_trained"] for r in result["records"]] == [1, 3]
    # The checkpoint stays, finished, until the model file is saved: a run killed
    # while saving it gets the same result again without training.
    assert json.loads((folder / "state.json").read_text())["finished"]
    log.unlink()
    again = child_run.run(tmp_path)
    assert not log.exists(), "no epoch is trained again"
    assert again["history"] == history
    assert remove_finished_checkpoints(tmp_path / "checkpoints") == [folder]
    assert not folder.exists()


def test_a_nan_loss_stops_training_and_checkpoints_nothing_of_it(tmp_path):
    classifier = mini_classifier()
    kernel = classifier.head.get_layer("logits").kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    with pytest.raises(
        TrainingDivergedError, match=r"stage 'head', epoch 1.*loss is nan"
    ):
        train(
            classifier,
            [stage("head", None)],
            demo_examples(2, 1),
            tmp_path,
            head_solver="minibatch",
        )
    state = CheckpointStore(tmp_path, "run").load()
    assert (state.stage_index, state.epochs_done, state.history) == (0, 0, [])


def test_the_saved_model_reloads_in_safe_mode_with_identical_predictions(tmp_path):
    classifier = mini_classifier()
    dataset = AtomicTensorFlowModelDataset(filepath=str(tmp_path / "model.keras"))
    dataset.save(classifier.model)
    reloaded = dataset.load()
    pixels = np.random.default_rng(0).uniform(0, 255, (5, 75, 75, 3)).astype("float32")
    np.testing.assert_array_equal(
        reloaded.predict(pixels, verbose=0), classifier.model.predict(pixels, verbose=0)
    )
    assert reloaded.layers[1].name == "irv2_preprocess"
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"]


def test_a_save_that_fails_leaves_the_previous_model_whole(tmp_path, monkeypatch):
    path = tmp_path / "model.keras"
    dataset = AtomicTensorFlowModelDataset(filepath=str(path))
    dataset.save(mini_classifier().model)
    before = path.read_bytes()

    def dies_half_way(model, filepath, **kwargs):
        Path(filepath).write_bytes(b"half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(keras.saving, "save_model", dies_half_way)
    with pytest.raises(DatasetError, match="disk full"):
        dataset.save(mini_classifier(seed=1).model)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"]


@pytest.mark.parametrize(
    ("restore_best_weights", "kept_epoch"), [(True, 1), (False, 2)]
)
def test_early_stopping_ends_the_stage_with_its_best_or_its_last_epoch(
    tmp_path, restore_best_weights, kept_epoch
):
    """Ours restores the best epoch; the textbook recipes keep the last, as Keras."""
    classifier = mini_classifier()
    initial = classifier.head.get_weights()
    # Raised for the first class only (a shift of every logit alike changes nothing).
    scrambled = [
        (w + 5.0 * (np.arange(w.shape[-1]) == 0)).astype(w.dtype) for w in initial
    ]

    class ScrambleBeforeSecondEpoch(keras.callbacks.Callback):
        # Epoch 2 trains (at rate 0) and is validated with these weights: its
        # val_loss is worse than epoch 1's, and patience 1 stops the stage there.
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                classifier.head.set_weights(scrambled)

    state = train(
        classifier,
        [stage("head", None, epochs=5, learning_rate=0.0)],
        demo_examples(2, 1),
        tmp_path,
        callbacks=(ScrambleBeforeSecondEpoch(),),
        patience=1,
        # The whole model trains, so the callback's weights are the ones trained.
        cache_head_features=False,
        restore_best_weights=restore_best_weights,
    )
    record = state.stage_records[0]
    first, second = (row["val_loss"] for row in state.history)
    assert second > first
    assert (record["epochs_trained"], record["best_epoch"]) == (2, kept_epoch)
    assert record["stopped_early"]
    assert record["best_val_loss"] == (first, second)[kept_epoch - 1]
    expected = (initial, scrambled)[kept_epoch - 1]
    for kept, weights in zip(classifier.head.get_weights(), expected, strict=True):
        np.testing.assert_array_equal(kept, weights)


class _Interrupted(Exception):
    """Stands in for a run that dies right after a checkpoint."""


class _StopAfterEpoch(keras.callbacks.Callback):
    """Raises once ``stage_model`` ends epoch ``epoch`` (after its checkpoint)."""

    def __init__(self, stage_model: str, epoch: int):
        super().__init__()
        self._stage_model, self._epoch = stage_model, epoch

    def on_epoch_end(self, epoch, logs=None):
        if self.model.name == self._stage_model and epoch == self._epoch:
            raise _Interrupted


@pytest.mark.parametrize(
    ("stage_model", "epoch", "head_solver"),
    [
        ("head_on_features", 0, "minibatch"),
        ("irv2_classifier_bn_frozen", 0, "lbfgs"),
    ],
)
def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights(
    tmp_path, stage_model, epoch, head_solver
):
    """Every epoch sees its own seeded order, so resuming changes no weight."""
    examples = demo_examples(2, 1)
    stages = [
        stage("head", None, epochs=3),
        stage("top", "block8_1", epochs=2, learning_rate=1e-3),
    ]
    uninterrupted = mini_classifier()
    train(uninterrupted, stages, examples, tmp_path / "whole", head_solver=head_solver)

    with pytest.raises(_Interrupted):
        train(
            mini_classifier(),
            stages,
            examples,
            tmp_path / "cut",
            callbacks=(_StopAfterEpoch(stage_model, epoch),),
            head_solver=head_solver,
        )
    resumed = mini_classifier()
    train(resumed, stages, examples, tmp_path / "cut", head_solver=head_solver)

    for whole, cut in zip(
        uninterrupted.model.get_weights(), resumed.model.get_weights(), strict=True
    ):
        np.testing.assert_allclose(cut, whole, rtol=0, atol=1e-6)
