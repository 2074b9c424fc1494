"""Arrays kept between runs with the key of what they were computed from.

A node that can skip work when its inputs have not changed reads the file as the run
found it and writes what it used. Kedro forbids a node reading and writing one
dataset, so the catalog names the one file twice: a ``stored_...`` entry the node
reads (``None`` when the file is absent, so a first run needs nothing) and the entry
it writes. Both are this class, with the same ``filepath``.

The file is a NumPy ``.npz`` archive (read without pickle: no code in it runs) of the
arrays, plus the key and a JSON description of what went into it. A save is atomic
(:func:`irv2_pipeline.atomic.replaced_atomically`: the file is the old one or the new
one, never half), and a save of data whose key the file already holds writes nothing:
a run that reused the file leaves it, and its modification time, as they were.

Example (``catalog.yml``)::

    reference_features:
      type: irv2_pipeline.datasets.FeatureCacheDataset
      filepath: data/07_model_output/reference_features.npz

    stored_reference_features:
      type: irv2_pipeline.datasets.FeatureCacheDataset
      filepath: data/07_model_output/reference_features.npz
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from kedro.io import AbstractDataset, DatasetError

from irv2_pipeline.atomic import replaced_atomically

logger = logging.getLogger(__name__)

KEY = "key"
ABOUT = "about"
# The archive's members for the key and the description; the arrays have their names.
_KEY_MEMBER = "__key__"
_ABOUT_MEMBER = "__about__"


class FeatureCacheDataset(AbstractDataset[dict[str, Any], dict[str, Any] | None]):
    """Named arrays with their key, in one ``.npz`` file on local disk.

    Saves and loads ``{"key": str, "about": dict, <name>: array, ...}``: ``key``
    says what the arrays were computed from (``keys.content_key``), ``about``
    (JSON-able) the parts of the key, for the log line that says why a stored file
    is not reused. Arrays must be numbers, booleans or strings (no objects: the file
    is read without pickle).

    Loading a missing file gives ``None``, and so does a file that cannot be read (a
    warning says so): either way the node computes the arrays again. Hence
    ``loads_none_when_absent``, which ``hooks.MissingInputsHook`` reads: such an
    input never stops a run before it starts.

    Args:
        filepath: The ``.npz`` file (local).
        metadata: Kedro-Viz and other plugins' settings, not used here.
    """

    loads_none_when_absent = True

    def __init__(self, *, filepath: str, metadata: dict[str, Any] | None = None):
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> dict[str, Any] | None:
        if not self._filepath.is_file():
            return None
        try:
            with np.load(self._filepath, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
            key = str(arrays.pop(_KEY_MEMBER))
            about = json.loads(str(arrays.pop(_ABOUT_MEMBER)))
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as error:
            logger.warning(
                "%s cannot be read (%s): it is treated as absent and computed again",
                self._filepath,
                error,
            )
            return None
        return {KEY: key, ABOUT: about, **arrays}

    def save(self, data: dict[str, Any]) -> None:
        key = str(data[KEY])
        if self._stored_key() == key:
            logger.info("%s already holds these arrays (key %s)", self._filepath, key)
            return
        arrays = {
            name: _checked_array(name, value)
            for name, value in data.items()
            if name not in (KEY, ABOUT)
        }
        arrays[_KEY_MEMBER] = np.asarray(key)
        arrays[_ABOUT_MEMBER] = np.asarray(json.dumps(data.get(ABOUT, {}), default=str))
        try:
            with (
                replaced_atomically(self._filepath) as temporary,
                open(temporary, "wb") as file,
            ):
                np.savez(file, **arrays)
        except OSError as error:
            raise DatasetError(
                f"Could not write {self._filepath}: {error}. The previous file, if "
                "there was one, is unchanged."
            ) from error

    def _stored_key(self) -> str | None:
        """The key of the file on disk, read alone; ``None`` for none or unreadable."""
        if not self._filepath.is_file():
            return None
        try:
            with np.load(self._filepath, allow_pickle=False) as archive:
                return str(archive[_KEY_MEMBER])
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):
            return None

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}


def _checked_array(name: str, value: Any) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype == object:
        raise DatasetError(
            f"The array {name!r} holds Python objects: save numbers, booleans or "
            "strings (the file is read without pickle)."
        )
    return array
