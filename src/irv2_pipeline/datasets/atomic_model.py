"""kedro-datasets' ``TensorFlowModelDataset``, with a save that is atomic on local disk."""

from __future__ import annotations

import os
from pathlib import Path

import keras
from kedro.io.core import get_filepath_str
from kedro_datasets.tensorflow import TensorFlowModelDataset


class AtomicTensorFlowModelDataset(TensorFlowModelDataset):
    """A ``.keras`` model file that is either the old model or the new one, never half.

    ``TensorFlowModelDataset`` writes the model to a temporary folder and then copies
    it over the target, so a run killed during the copy leaves a truncated file where
    the model was. This subclass writes ``.<name>.<pid>.tmp.keras`` next to the target
    and renames it over the target (``os.replace``, atomic on one file system). Other
    protocols (``s3://``, ...) keep the parent's save. Loading is the parent's:
    ``safe_mode`` on.

    Example (``catalog.yml``)::

        finetuned_model:
          type: irv2_pipeline.datasets.AtomicTensorFlowModelDataset
          filepath: data/06_models/finetuned_model.keras
    """

    def save(self, data: keras.Model) -> None:
        if self._protocol != "file" or self._is_h5:
            super().save(data)
            return
        target = Path(get_filepath_str(self._get_save_path(), self._protocol))
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp.keras")
        try:
            keras.saving.save_model(data, temporary, **self._save_args)
            with open(temporary, "rb") as written:
                os.fsync(written.fileno())
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
        self._invalidate_cache()
