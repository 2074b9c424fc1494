"""The model file's catalog entry; TensorFlow loads when the model does, not before.

kedro-datasets' ``TensorFlowModelDataset`` imports TensorFlow with its module, and
Kedro-Viz builds every dataset of the catalog to draw the pipeline. This dataset builds
the file's dataset (``keras_model_file.AtomicKerasModelFile``) on first use, so
listing or drawing the pipelines, or running those that do not touch the model, never
imports TensorFlow.

A run loads the file once: every node of the run that reads the model gets the same
model object while the file is unchanged (its size, modification time and inode), so
the model is built from the file once and ``predict.two_output_model``'s traced
prediction graph serves every node. Nodes read the model and never change it. The
object is let go when Kedro releases the dataset (no node of the run needs it any
more) or when a new model is saved.

A model the run saves is the one its later nodes read (``kedro run``: finetune
saves it, evaluation reads it): Keras's file keeps every weight, layer and setting,
so the object saved serves them as the file's model would, without building it again
from the file (seconds for IRv2). One saved model at most is kept this way, the
latest, whatever the number of models a run saves (the counterfactual variants);
a model whose variables belong to a ``tf.distribute`` strategy is not kept (its
replicas' variables are not a loaded model's), and another process always loads the
file.
"""

from __future__ import annotations

import os
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

from kedro.io import AbstractDataset

from irv2_pipeline.hints import KerasModel

if TYPE_CHECKING:
    from .keras_model_file import AtomicKerasModelFile


class AtomicTensorFlowModelDataset(AbstractDataset):
    """A ``.keras`` model file that is either the old model or the new one, never half.

    Takes the arguments of kedro-datasets' ``TensorFlowModelDataset`` (``load_args``,
    ``save_args``, ``fs_args``, ``credentials``); loading is in safe mode, saving
    atomic (see ``AtomicKerasModelFile``).

    Example (``catalog.yml``)::

        finetuned_model:
          type: irv2_pipeline.datasets.atomic_model.AtomicTensorFlowModelDataset
          filepath: data/06_models/finetuned_model.keras
    """

    # The dataset that keeps the model it saved last, if any.
    _keeping_saved: ClassVar[AtomicTensorFlowModelDataset | None] = None

    def __init__(
        self, *, filepath: str, metadata: dict[str, Any] | None = None, **options: Any
    ):
        self._filepath = filepath
        self._options = options
        self.metadata = metadata
        # (the file's identity when loaded, the model), or None.
        self._loaded: tuple[tuple[int, ...], KerasModel] | None = None

    @cached_property
    def _file(self) -> AtomicKerasModelFile:
        """The file's dataset, built (and TensorFlow imported) on first use."""
        from .keras_model_file import AtomicKerasModelFile  # noqa: PLC0415

        return AtomicKerasModelFile(
            filepath=self._filepath, metadata=self.metadata, **self._options
        )

    def load(self) -> KerasModel:
        identity = self._identity()
        if identity is not None and self._loaded and self._loaded[0] == identity:
            return self._loaded[1]
        model = self._file.load()
        self._loaded = None if identity is None else (identity, model)
        return model

    def save(self, data: KerasModel) -> None:
        self._release()
        self._file.save(data)
        identity = self._identity()
        if identity is None or not self._file.serves_as_loaded(data):
            return
        keeping = AtomicTensorFlowModelDataset._keeping_saved
        if keeping is not None:
            keeping._release()
        self._loaded = (identity, data)
        AtomicTensorFlowModelDataset._keeping_saved = self

    def _release(self) -> None:
        self._loaded = None
        if AtomicTensorFlowModelDataset._keeping_saved is self:
            AtomicTensorFlowModelDataset._keeping_saved = None

    def _exists(self) -> bool:
        return self._file.exists()

    def _identity(self) -> tuple[int, ...] | None:
        """The local file's device, inode, size and modification time; ``None`` for
        another protocol or a versioned dataset (loaded every time)."""
        if "://" in self._filepath or self._options.get("version") is not None:
            return None
        try:
            stat = os.stat(self._filepath)
        except OSError:
            return None
        return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath, **self._options}
