"""Checkpoints that cost little: what a checkpoint holds, when, and written how."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from irv2_pipeline.pipelines.finetune import checkpoints
from irv2_pipeline.pipelines.finetune.checkpoints import (
    CheckpointStore,
    TrainingState,
    changing_variables,
)
from irv2_pipeline.pipelines.finetune.training import TrainingSettings

from .conftest import demo_examples, mini_classifier, stage, train


class _Interrupted(Exception):
    """Stands in for a run that dies at the end of an epoch."""


class _StopAfterEpoch(keras.callbacks.Callback):
    """Raises once stage two's model ends epoch ``epoch`` (after its record)."""

    def __init__(self, epoch: int):
        super().__init__()
        self._epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if self.model.name == "irv2_classifier_bn_frozen" and epoch == self._epoch:
            raise _Interrupted


STAGES = [
    stage("head", None, epochs=1),
    stage("top", "block8_1", epochs=3, learning_rate=1e-3),
]


def test_a_checkpoint_in_a_stage_holds_the_changing_weights_once(tmp_path):
    classifier = mini_classifier()
    with pytest.raises(_Interrupted):
        train(
            classifier,
            STAGES,
            demo_examples(2, 1),
            tmp_path,
            callbacks=(_StopAfterEpoch(0),),
        )
    store = CheckpointStore(tmp_path, "run")
    state = store.load()
    assert (state.stage_index, state.epochs_done, state.best_epoch) == (1, 1, 1)
    # The first epoch is the best so far: one file for both roles.
    assert state.files["best"] == state.files["progress"]
    changing = changing_variables(classifier.model)
    assert len(changing) < len(classifier.model.weights)
    for saved, variable in zip(store.arrays(state, "progress"), changing, strict=True):
        np.testing.assert_array_equal(saved, keras.ops.convert_to_numpy(variable))
    # The optimizer's state is there to resume from: AdamW's two moments at least.
    moments = sum(a.size for a in store.arrays(state, "optimizer"))
    assert moments >= 2 * (
        sum(int(np.prod(v.shape)) for v in classifier.model.trainable_weights)
    )
    # Only the latest checkpoint's files are kept.
    assert {p.name for p in store.folder.iterdir()} == {
        *state.files.values(),
        "state.json",
    }


@pytest.mark.parametrize(
    ("every_epochs", "every_minutes", "resumed_from"),
    [(2, None, 2), (None, 1e6, 0)],
)
def test_a_run_checkpointed_less_often_resumes_to_the_same_weights(
    tmp_path, every_epochs, every_minutes, resumed_from
):
    examples = demo_examples(2, 1)
    settings = {
        "checkpoint_every_epochs": every_epochs,
        "checkpoint_every_minutes": every_minutes,
    }
    uninterrupted = mini_classifier()
    train(uninterrupted, STAGES, examples, tmp_path / "whole", **settings)

    with pytest.raises(_Interrupted):
        train(
            mini_classifier(),
            STAGES,
            examples,
            tmp_path / "cut",
            callbacks=(_StopAfterEpoch(2),),
            **settings,
        )
    saved = json.loads((tmp_path / "cut" / "run" / "state.json").read_text())
    assert (saved["stage_index"], saved["epochs_done"]) == (1, resumed_from)
    resumed = mini_classifier()
    train(resumed, STAGES, examples, tmp_path / "cut", **settings)

    for whole, cut in zip(
        uninterrupted.model.get_weights(), resumed.model.get_weights(), strict=True
    ):
        np.testing.assert_allclose(cut, whole, rtol=0, atol=1e-6)


def test_a_background_write_that_fails_raises_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch
):
    store = CheckpointStore(tmp_path, "run")
    state = TrainingState()
    store.save(state, {"base": [np.zeros(3)]})
    before = (store.folder / "state.json").read_text()

    def disk_full(path, arrays):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "_write_npz", disk_full)
    state.epochs_done = 1
    store.save_in_background(state, {"progress": [np.ones(3)]})
    with pytest.raises(OSError, match="No space left"):
        store.wait()
    assert (store.folder / "state.json").read_text() == before
    store.wait()  # reported once


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"checkpoint_every_epochs": None, "checkpoint_every_minutes": None},
            "both null",
        ),
        ({"checkpoint_every_epochs": 0}, "must be at least 1"),
        ({"checkpoint_every_minutes": 0}, "above 0"),
        ({"steps_per_execution": 0}, "steps_per_execution = 0"),
    ],
)
def test_checkpoint_and_execution_settings_are_checked(settings, message):
    finetune = {"batch_size": 4, **settings}
    with pytest.raises(ValueError, match=message):
        TrainingSettings.from_params(
            finetune, {"image_size": 75, "seed": 0}, {}, tensorboard_dir=None
        )
