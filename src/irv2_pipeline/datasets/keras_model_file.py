"""kedro-datasets' ``TensorFlowModelDataset``, with a save that is atomic on local disk.

Importing this module imports TensorFlow: the catalog's entry is
``atomic_model.AtomicTensorFlowModelDataset``, which imports it on first use.
"""

from __future__ import annotations

from pathlib import Path

import keras
import tensorflow as tf
from kedro.io.core import get_filepath_str
from kedro_datasets.tensorflow import TensorFlowModelDataset

from irv2_pipeline.atomic import replaced_atomically

# Registers the models' preprocessing layer, which loading must find by name.
from irv2_pipeline.preprocessing import Preprocess  # noqa: F401


class AtomicKerasModelFile(TensorFlowModelDataset):
    """A ``.keras`` model file that is either the old model or the new one, never half.

    ``TensorFlowModelDataset`` writes the model to a temporary folder and then copies
    it over the target, so a run killed during the copy leaves a truncated file where
    the model was. This subclass saves straight to a temporary file next to the target
    and renames it. Loading is the parent's: ``safe_mode`` on, so a model with a
    ``Lambda`` layer is refused, not executed.
    """

    def save(self, data: keras.Model) -> None:
        if self._protocol != "file" or self._is_h5 or self._version is not None:
            super().save(data)
            return
        target = Path(get_filepath_str(self._get_save_path(), self._protocol))
        with replaced_atomically(target) as temporary:
            keras.saving.save_model(data, temporary, **self._save_args)
        self._invalidate_cache()

    @staticmethod
    def serves_as_loaded(model: keras.Model) -> bool:
        """Whether ``model``, once saved, can serve as the model loaded from its
        file: not when its variables belong to a ``tf.distribute`` strategy (built in
        its scope, mirrored across replicas or workers), which a loaded model's are
        not."""
        strategy = getattr(model, "distribute_strategy", None)
        return strategy is None or strategy is tf.distribute.get_strategy()
