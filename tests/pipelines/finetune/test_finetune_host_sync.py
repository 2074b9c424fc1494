"""No host sync per step: the training loop reads the loss once per execution."""

from __future__ import annotations

import threading

import keras
import numpy as np
import pytest
from keras.src import backend as keras_backend

from irv2_pipeline.pipelines.finetune.training import TrainingDivergedError

from .conftest import demo_examples, mini_classifier, stage, train

STEPS_PER_EXECUTION = 4


class _ReadCounter(keras.callbacks.Callback):
    """Counts tensors read into host arrays on the training thread while an epoch's
    training batches run (from the epoch's start to its validation)."""

    def __init__(self):
        super().__init__()
        self.reads = 0
        self._counting = False
        self._thread = threading.current_thread()

    def convert(self, convert):
        def counted(x):
            if (
                self._counting
                and keras_backend.is_tensor(x)
                and threading.current_thread() is self._thread
            ):
                self.reads += 1
            return convert(x)

        return counted

    def on_epoch_begin(self, epoch, logs=None):
        self._counting = True

    def on_test_begin(self, logs=None):
        self._counting = False


def _reads_while_training(tmp_path, monkeypatch, train_per_class: int) -> int:
    """Host reads during the training batches of one epoch of batch size 1."""
    counter = _ReadCounter()
    # keras.ops.convert_to_numpy and Keras's own log conversion both call this.
    monkeypatch.setattr(
        keras_backend,
        "convert_to_numpy",
        counter.convert(keras_backend.convert_to_numpy),
    )
    train(
        mini_classifier(),
        [stage("top", "block8_1")],
        demo_examples(train_per_class, 1),
        tmp_path / str(train_per_class),
        callbacks=(counter,),
        batch_size=1,
        steps_per_execution=STEPS_PER_EXECUTION,
    )
    monkeypatch.undo()
    return counter.reads


def test_the_host_reads_the_loss_less_than_once_per_step(tmp_path, monkeypatch):
    few = _reads_while_training(tmp_path, monkeypatch, train_per_class=3)  # 9 steps
    many = _reads_while_training(tmp_path, monkeypatch, train_per_class=8)  # 24
    # Keras reads its logs (loss, accuracy) after each execution of 4 steps: 0.5
    # reads a step here; 2 a step with one execution per step (the old loop).
    assert (many - few) / (24 - 9) < 1, (few, many)


def test_a_nan_loss_is_caught_at_the_first_execution_not_the_epoch_end(tmp_path):
    classifier = mini_classifier()
    kernel = classifier.head.get_layer("logits").kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    with pytest.raises(
        TrainingDivergedError, match=r"epoch 1, by batch 4: loss is nan"
    ):
        train(
            classifier,
            [stage("top", "block8_1")],
            demo_examples(8, 1),
            tmp_path,
            batch_size=1,
            steps_per_execution=STEPS_PER_EXECUTION,
        )
