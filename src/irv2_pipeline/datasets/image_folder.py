"""A folder of images as a Kedro dataset, with a thumbnail-grid preview."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io import AbstractDataset, DatasetError
from kedro_datasets._typing import ImagePreview
from PIL import Image

from irv2_pipeline.images import (
    ImageRejected,
    LoadedImage,
    OpenPolicy,
    TreeEntry,
    load_image,
    walk_image_tree,
)


@dataclass(frozen=True)
class ImageFolder:
    """A handle on an image root: walk it, open its images, never write to it."""

    root: Path

    def entries(self) -> Iterator[TreeEntry]:
        """Every file under the root, usable or rejected (see ``walk_image_tree``)."""
        return walk_image_tree(self.root)

    def path_of(self, relative: str) -> Path:
        """The absolute path of a manifest ``path``, refused if it leaves the root."""
        rel = PurePosixPath(relative)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"{relative!r} is not a path inside {self.root}")
        return self.root.joinpath(*rel.parts)

    def load(self, relative: str, policy: OpenPolicy) -> LoadedImage:
        """Opens one image of the folder through ``images.load_image``."""
        return load_image(self.path_of(relative), policy)


class ImageFolderDataset(AbstractDataset[None, ImageFolder]):
    """A read-only folder of images: ``root/<label>/**``, or unlabelled ``root/**``.

    Loading gives an :class:`ImageFolder`, so nodes walk and open images through
    ``images.py`` and the folder itself is declared in the catalog. Saving is refused:
    nothing in a user's image folder is ever changed.

    Example (``catalog.yml``)::

        raw_images:
          type: irv2_pipeline.datasets.ImageFolderDataset
          path: data/01_raw/images

        new_images:
          type: irv2_pipeline.datasets.ImageFolderDataset
          path: data/01_raw/new_images
          labelled: false
    """

    PREVIEW_IMAGES = 24
    PREVIEW_THUMBNAIL = 64
    PREVIEW_COLUMNS = 8

    def __init__(
        self,
        *,
        path: str,
        labelled: bool = True,
        metadata: dict[str, Any] | None = None,
    ):
        """Creates the dataset.

        Args:
            path: The image root.
            labelled: Whether the images sit in one folder per label (training
                images) or anywhere under the root (images to predict); it only
                changes what a missing folder's error asks for.
            metadata: Free-form metadata (Kedro-Viz reads its layer from here).
        """
        self._path = Path(path)
        self._labelled = labelled
        self.metadata = metadata

    def load(self) -> ImageFolder:
        if not self._path.is_dir():
            if self._labelled:
                what = f"Put your images in {self._path}/<label>/"
            else:
                what = (
                    "Create it and put the images to predict in it (any names, "
                    "sub-folders allowed, no label folders needed)"
                )
            raise DatasetError(
                f"The image folder {self._path} does not exist. {what}, or point "
                "this dataset's `path` in conf/local/catalog.yml at your folder."
            )
        return ImageFolder(self._path)

    def save(self, data: None) -> None:
        raise DatasetError(
            f"{self._path} is read-only: the pipeline never writes to it."
        )

    def _exists(self) -> bool:
        return self._path.is_dir()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "labelled": self._labelled}

    def preview(self) -> ImagePreview:
        """A grid of the first images of each label, as a base64 PNG for Kedro-Viz."""
        folder = self.load()
        policy = OpenPolicy()
        by_label: dict[str, list[str]] = {}
        for entry in folder.entries():
            if entry.reason is None:
                by_label.setdefault(entry.path.split("/", 1)[0], []).append(entry.path)
        per_label = max(1, self.PREVIEW_IMAGES // max(1, len(by_label)))
        thumbs = []
        for paths in by_label.values():
            for path in paths[:per_label]:
                try:
                    pixels = folder.load(path, policy).pixels
                except ImageRejected:
                    continue
                thumb = Image.fromarray(pixels)
                thumb.thumbnail((self.PREVIEW_THUMBNAIL, self.PREVIEW_THUMBNAIL))
                thumbs.append(thumb)
        return ImagePreview(
            _grid_png_base64(thumbs, self.PREVIEW_THUMBNAIL, self.PREVIEW_COLUMNS)
        )


def _grid_png_base64(thumbs: list[Image.Image], cell: int, columns: int) -> str:
    rows = max(1, -(-len(thumbs) // columns))
    canvas = Image.new("RGB", (columns * cell, rows * cell), (255, 255, 255))
    for index, thumb in enumerate(thumbs):
        row, col = divmod(index, columns)
        canvas.paste(thumb, (col * cell, row * cell))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
