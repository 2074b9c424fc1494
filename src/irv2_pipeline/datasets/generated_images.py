"""A folder of images the pipeline generates: written incrementally, atomically, in parallel."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from kedro.io import AbstractDataset, DatasetError
from kedro_datasets._typing import ImagePreview
from PIL import Image

from irv2_pipeline.atomic import replaced_atomically
from irv2_pipeline.images import OpenPolicy, load_image
from irv2_pipeline.parallel import process_map, worker_count
from irv2_pipeline.progress import ProgressLog

from .image_folder import ImageFolder, _grid_png_base64

logger = logging.getLogger(__name__)

INDEX_NAME = ".generated_images.json"
# The index is rewritten after this many new files, so a killed run loses little.
INDEX_EVERY = 256


class ImageJob(Protocol):
    """Renders some files of a generated folder, for example all copies of one source.

    ``outputs`` maps each relative posix path the job owns to a key that changes
    whenever the file's content would change (policy, source, drawn values, ...).
    """

    outputs: Mapping[str, str]

    def render(self, wanted: Sequence[str]) -> dict[str, bytes]:
        """The encoded content of the ``wanted`` paths (a subset of ``outputs``)."""
        ...


@dataclass(frozen=True)
class ImageJobs:
    """Every file a generated folder must hold, as jobs that render them.

    Attributes:
        jobs: Picklable jobs; their ``outputs`` must not overlap.
        workers: Processes that render (``auto``: one per core; 1: this process).
        parameter: The name of the ``workers`` parameter, for error messages.
        initializer: Runs once in each worker process before its first job.
    """

    jobs: Sequence[ImageJob]
    workers: int | str = 1
    parameter: str = "workers"
    initializer: Callable[[], None] | None = None


class GeneratedImageFolderDataset(AbstractDataset[ImageJobs, ImageFolder]):
    """A folder this project writes images into, and owns.

    Saving takes :class:`ImageJobs`: the complete list of files the folder must hold.
    Files already there with the same key are kept, missing or stale ones are
    rendered (on worker processes) and every other file in the folder is deleted.
    Each file is written to a temporary name in its folder and renamed, and only
    files recorded in the folder's index (``.generated_images.json``) with their key
    count as written, so a killed run leaves nothing a later run accepts. A folder
    that holds files but no index was not made here and is never touched.

    Loading gives an :class:`ImageFolder` on the folder, to open the images through
    ``images.py``.

    Example (``catalog.yml``)::

        augmented_images:
          type: irv2_pipeline.datasets.GeneratedImageFolderDataset
          path: data/05_model_input/augmented
    """

    PREVIEW_IMAGES = 24
    PREVIEW_THUMBNAIL = 64
    PREVIEW_COLUMNS = 8

    def __init__(self, *, path: str, metadata: dict[str, Any] | None = None):
        """Creates the dataset.

        Args:
            path: The folder; created on the first save.
            metadata: Free-form metadata (Kedro-Viz reads its layer from here).
        """
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> ImageFolder:
        if not self._exists():
            raise DatasetError(
                f"The generated image folder {self._path} has not been written yet "
                f"(no {INDEX_NAME} in it)."
            )
        return ImageFolder(self._path)

    def save(self, data: ImageJobs) -> None:
        wanted = _wanted_files(data.jobs)
        index = self._read_index()
        removed = self._prune(set(wanted))
        # Entries of files about to be rewritten go first: the index never vouches
        # for a file whose content is being replaced.
        index = {
            rel: key
            for rel, key in index.items()
            if wanted.get(rel) == key and (self._path / rel).is_file()
        }
        self._write_index(index)
        todo = [
            (job, [rel for rel in job.outputs if rel not in index]) for job in data.jobs
        ]
        todo = [(job, missing) for job, missing in todo if missing]
        total = sum(len(missing) for _, missing in todo)
        logger.info(
            "%s: %d files wanted, %d up to date, %d to write, %d removed",
            self._path,
            len(wanted),
            len(index),
            total,
            removed,
        )
        if not todo:
            return
        progress = ProgressLog("generated images written", total, logger)
        # A worker costs its start-up: no more of them than there are jobs.
        workers = min(worker_count(data.workers, data.parameter), len(todo))
        unsaved = 0
        try:
            results = process_map(
                _render_and_write,
                ((job, missing, str(self._path)) for job, missing in todo),
                workers,
                parameter=data.parameter,
                chunksize=1,
                initializer=data.initializer,
            )
            for written in results:
                index.update((rel, wanted[rel]) for rel in written)
                unsaved += len(written)
                progress.advance(len(written))
                if unsaved >= INDEX_EVERY:
                    self._write_index(index)
                    unsaved = 0
        finally:
            self._write_index(index)

    def _exists(self) -> bool:
        return (self._path / INDEX_NAME).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}

    def preview(self) -> ImagePreview:
        """A grid of the first written images, as a base64 PNG for Kedro-Viz."""
        thumbs = []
        for rel in sorted(self._read_index())[: self.PREVIEW_IMAGES]:
            thumb = Image.fromarray(load_image(self._path / rel, OpenPolicy()).pixels)
            thumb.thumbnail((self.PREVIEW_THUMBNAIL, self.PREVIEW_THUMBNAIL))
            thumbs.append(thumb)
        return ImagePreview(
            _grid_png_base64(thumbs, self.PREVIEW_THUMBNAIL, self.PREVIEW_COLUMNS)
        )

    def _read_index(self) -> dict[str, str]:
        index_path = self._path / INDEX_NAME
        if index_path.is_file():
            try:
                return dict(json.loads(index_path.read_text())["files"])
            except (ValueError, KeyError, TypeError) as exc:
                raise DatasetError(
                    f"{index_path} is damaged ({exc}); delete the folder {self._path} "
                    "and run again to rewrite it."
                ) from exc
        if self._path.is_dir() and any(self._path.iterdir()):
            raise DatasetError(
                f"{self._path} holds files but no {INDEX_NAME}: it was not written by "
                "this pipeline, and saving deletes every file there that it did not "
                "write. Point the dataset's `path` at a new or empty folder."
            )
        return {}

    def _write_index(self, index: dict[str, str]) -> None:
        content = json.dumps({"files": dict(sorted(index.items()))}, indent=0)
        with replaced_atomically(self._path / INDEX_NAME) as temporary:
            temporary.write_text(content)

    def _prune(self, keep: set[str]) -> int:
        """Deletes every file under the folder that is not kept (and empty folders)."""
        removed = 0
        if not self._path.is_dir():
            return removed
        for folder, dirs, files in os.walk(self._path, topdown=False):
            for name in files + [d for d in dirs if Path(folder, d).is_symlink()]:
                path = Path(folder, name)
                rel = path.relative_to(self._path).as_posix()
                if rel != INDEX_NAME and rel not in keep:
                    path.unlink()
                    removed += 1
            if Path(folder) != self._path and not any(Path(folder).iterdir()):
                Path(folder).rmdir()
        return removed


def _wanted_files(jobs: Sequence[ImageJob]) -> dict[str, str]:
    wanted: dict[str, str] = {}
    for job in jobs:
        for rel, key in job.outputs.items():
            parts = PurePosixPath(rel).parts
            if (
                not parts
                or PurePosixPath(rel).is_absolute()
                or ".." in parts
                or any(part.startswith(".") for part in parts)
            ):
                raise DatasetError(f"{rel!r} is not a plain relative path for a file")
            if rel in wanted:
                raise DatasetError(f"Two jobs write {rel!r}")
            wanted[rel] = key
    return wanted


def _render_and_write(task: tuple[ImageJob, list[str], str]) -> list[str]:
    """Renders one job's missing files and writes each atomically (in a worker)."""
    job, missing, root = task
    contents = job.render(missing)
    for rel in missing:
        # Hidden temporaries are not in the index: a file cut short by a killed run
        # is never taken for a written one, and the next save prunes it.
        with replaced_atomically(
            Path(root, *PurePosixPath(rel).parts), bulk=True
        ) as temporary:
            temporary.write_bytes(contents[rel])
    return missing
