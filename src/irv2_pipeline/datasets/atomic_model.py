"""The model file's catalog entry; TensorFlow loads when the model does, not before.

kedro-datasets' ``TensorFlowModelDataset`` imports TensorFlow with its module, and
Kedro-Viz builds every dataset of the catalog to draw the pipeline. This dataset builds
the file's dataset (``keras_model_file.AtomicKerasModelFile``) on first use, so
listing or drawing the pipelines, or running those that do not touch the model, never
imports TensorFlow.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

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

    def __init__(
        self, *, filepath: str, metadata: dict[str, Any] | None = None, **options: Any
    ):
        self._filepath = filepath
        self._options = options
        self.metadata = metadata

    @cached_property
    def _file(self) -> AtomicKerasModelFile:
        """The file's dataset, built (and TensorFlow imported) on first use."""
        from .keras_model_file import AtomicKerasModelFile  # noqa: PLC0415

        return AtomicKerasModelFile(
            filepath=self._filepath, metadata=self.metadata, **self._options
        )

    def load(self) -> KerasModel:
        return self._file.load()

    def save(self, data: KerasModel) -> None:
        self._file.save(data)

    def _exists(self) -> bool:
        return self._file.exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath, **self._options}
