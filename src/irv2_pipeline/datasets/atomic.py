"""kedro-datasets' file datasets, with saves that are atomic on local disk.

kedro-datasets writes straight into the target file, so a run killed, or a disk that
fills up, during a save leaves a truncated file where the previous good output was,
and the next ``kedro run --pipeline ...`` reads it. The datasets here write to a
hidden temporary file next to the target and rename it into place
(:func:`irv2_pipeline.atomic.replaced_atomically`): the target is the old output or
the new one. Other protocols (``s3://``, ...) and versioned datasets, which never
overwrite, keep the parent's save. Loading, previews and arguments are the parent's.
The model file's dataset is in ``atomic_model``, so that these do not import
TensorFlow.

Example (``catalog.yml``)::

    image_manifest:
      type: irv2_pipeline.datasets.AtomicCSVDataset
      filepath: data/02_intermediate/image_manifest.csv
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io import DatasetError
from kedro.io.core import get_filepath_str
from kedro_datasets.json import JSONDataset
from kedro_datasets.matplotlib import MatplotlibDataset
from kedro_datasets.pandas import CSVDataset
from kedro_datasets.text import TextDataset

from irv2_pipeline.atomic import replaced_atomically


class AtomicSave:
    """Mixin for a single-file kedro-datasets class: the save is atomic on local disk.

    The parent's own save writes to the temporary path (its ``_filepath`` points
    there for the duration), so whatever the parent does to write is kept.
    """

    def save(self, data: Any) -> None:
        if self._protocol != "file" or self._version is not None:
            super().save(data)
            return
        target = Path(get_filepath_str(self._get_save_path(), self._protocol))
        final = self._filepath
        try:
            with replaced_atomically(target) as temporary:
                self._filepath = PurePosixPath(temporary)
                super().save(data)
        except DatasetError as error:
            # The parent's message names the temporary file; the user's is the target.
            cause = error.__cause__ or error
            raise DatasetError(
                f"Could not write {target}: {cause}. The previous file, if there was "
                "one, is unchanged."
            ) from cause
        finally:
            self._filepath = final
        self._invalidate_cache()


class AtomicCSVDataset(AtomicSave, CSVDataset):
    """``pandas.CSVDataset`` with an atomic save."""


class AtomicJSONDataset(AtomicSave, JSONDataset):
    """``json.JSONDataset`` with an atomic save."""


class AtomicMatplotlibDataset(AtomicSave, MatplotlibDataset):
    """``matplotlib.MatplotlibDataset`` (one figure per file) with an atomic save."""


class AtomicTextDataset(AtomicSave, TextDataset):
    """``text.TextDataset`` with an atomic save."""
