"""The files of the portable export: a SavedModel folder and a LiteRT (TFLite) file.

Neither module-level import here pulls in TensorFlow: the node that builds the
SavedModel returns an object with a ``write_out(path)`` method (Keras 3's
``keras.export.ExportArchive``), which this dataset calls on a temporary folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from kedro.io import AbstractDataset, DatasetError

from irv2_pipeline.atomic import replaced_atomically, replaced_folder


class Exportable(Protocol):
    """What ``keras.export.ExportArchive`` offers: writes a SavedModel folder."""

    def write_out(self, filepath: str, *, verbose: bool = ...) -> None: ...


class SavedModelDataset(AbstractDataset[Exportable, Path]):
    """A TensorFlow SavedModel folder, replaced whole on save.

    Saving calls ``data.write_out`` on a hidden temporary folder and renames it into
    place (see ``atomic.replaced_folder``). Loading gives the folder's path, which
    ``tf.saved_model.load`` or the TFLite converter read; it fails with the pipeline
    to run when the folder is missing.

    Example (``catalog.yml``)::

        export_saved_model:
          type: irv2_pipeline.datasets.exported_model.SavedModelDataset
          path: data/06_models/export/saved_model
    """

    def __init__(self, *, path: str, metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> Path:
        if not (self._path / "saved_model.pb").is_file():
            raise DatasetError(
                f"No SavedModel at {self._path}: run `kedro run --pipeline export`."
            )
        return self._path

    def save(self, data: Exportable) -> None:
        with replaced_folder(self._path) as temporary:
            data.write_out(str(temporary), verbose=False)

    def _exists(self) -> bool:
        return (self._path / "saved_model.pb").is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}


class BytesFileDataset(AbstractDataset[bytes, bytes]):
    """A binary file (e.g. a ``.tflite`` model), written atomically.

    Example (``catalog.yml``)::

        export_litert:
          type: irv2_pipeline.datasets.exported_model.BytesFileDataset
          filepath: data/06_models/export/model.tflite
    """

    def __init__(self, *, filepath: str, metadata: dict[str, Any] | None = None):
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> bytes:
        return self._filepath.read_bytes()

    def save(self, data: bytes) -> None:
        with replaced_atomically(self._filepath) as temporary:
            temporary.write_bytes(data)

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
